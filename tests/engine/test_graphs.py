"""Gossip graphs: the peer formulas, column-stochastic mixing, and every rank reached."""

import math

import numpy as np
import pytest

from slowmo.graphs import Complete, DirectedExponential, Ring

SIZES = [2, 3, 4, 5, 8, 12, 16]


@pytest.mark.parametrize("n", SIZES)
def test_directed_exponential_peers_follow_the_formula(n):
    g = DirectedExponential(n)
    levels = max(1, math.ceil(math.log2(n)))
    for k in range(3 * levels):
        for i in range(n):
            assert g.out_peers(i, k) == [(i + 2 ** (k % levels)) % n]
            assert g.in_peers(i, k) == [j for j in range(n) if i in g.out_peers(j, k)]


@pytest.mark.parametrize("graph", [DirectedExponential, Ring, Complete])
@pytest.mark.parametrize("n", SIZES)
def test_mixing_is_column_stochastic_and_in_out_consistent(graph, n):
    g = graph(n)
    for k in range(6):
        p = g.mixing_matrix(k)
        assert np.allclose(p.sum(axis=0), 1.0)
        assert (p >= 0).all()
        for i in range(n):
            assert sorted(g.in_peers(i, k)) == [j for j in range(n) if i in g.out_peers(j, k)]
            assert i not in g.out_peers(i, k)


@pytest.mark.parametrize("graph", [DirectedExponential, Ring, Complete])
@pytest.mark.parametrize("n", SIZES)
def test_every_rank_reaches_every_rank(graph, n):
    g = graph(n)
    product = np.eye(n)
    for k in range(n):  # within n steps every rank's mass has reached every other rank
        product = g.mixing_matrix(k) @ product
    assert (product > 0).all()


def test_directed_exponential_mixes_fast_on_a_power_of_two():
    n = 16
    g = DirectedExponential(n)
    product = np.eye(n)
    for k in range(4):  # log2(16) steps: the product is exactly uniform
        product = g.mixing_matrix(k) @ product
    assert np.allclose(product, 1.0 / n)


def test_a_graph_needs_two_ranks():
    with pytest.raises(ValueError, match="at least 2 ranks"):
        DirectedExponential(1)
