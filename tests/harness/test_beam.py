"""Beam search with fairseq's length penalty, against brute-force enumeration of every output on a tiny model and
vocabulary: a beam wide enough finds the exact best sequence under the same scoring; beam 1 is greedy decoding."""

import itertools

import pytest
import torch

from slowmo.models import Transformer

PAD, UNK, BOS, EOS = 0, 1, 2, 3
VOCAB = 6  # PAD, UNK, BOS, EOS and two words


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    net = Transformer(VOCAB, "transformer_tiny", PAD, dropout=0.0).eval()
    with torch.no_grad():  # sharper distributions than the small initialisation gives: real choices to make
        net.embed.weight.mul_(8.0)
    return net


SOURCES = torch.tensor([[4, 5, 3], [5, 3, PAD], [4, 4, 3]])


def log_prob(model, src_row, output):
    """sum_t log p(y_t | y_<t, x) of ``output`` (EOS included), one prefix at a time."""
    src = src_row[None]
    memory = model.encode(src)
    total = 0.0
    for t, token in enumerate(output):
        prev = torch.tensor([[BOS, *output[:t]]])
        total += torch.log_softmax(model.decode(memory, src, prev)[0, -1].double(), -1)[token].item()
    return total


def brute_force(model, src_row, max_len, lenpen):
    """Every output of at most max_len tokens ending in EOS (words and UNK before it), scored as fairseq scores."""
    words = [t for t in range(VOCAB) if t not in (PAD, BOS, EOS)]
    scored = {}
    for length in range(max_len):
        for body in itertools.product(words, repeat=length):
            output = [*body, EOS]
            scored[tuple(body)] = log_prob(model, src_row, output) / len(output) ** lenpen
    return scored


@pytest.mark.parametrize("lenpen", [0.0, 0.6, 1.0, 2.0])
@torch.no_grad()
def test_a_wide_beam_finds_the_best_sequence_of_the_enumeration(model, lenpen):
    extra = 1  # outputs of at most 3 + 1 tokens: 1 + 3 + 9 + 27 of them
    found = model.generate(SOURCES, BOS, EOS, extra, beam=64, lenpen=lenpen)
    for row, hyp in zip(SOURCES, found, strict=True):
        scored = brute_force(model, row, SOURCES.size(1) + extra, lenpen)
        best = max(scored.values())
        assert scored[tuple(hyp)] == pytest.approx(best, abs=1e-5), (hyp, max(scored, key=scored.get))
        assert len(set(round(v, 4) for v in scored.values())) > 10  # the scores do differ: a real search


@torch.no_grad()
def test_the_length_penalty_changes_the_choice(model):
    short, long_ = (model.generate(SOURCES, BOS, EOS, 1, beam=64, lenpen=p) for p in (0.0, 2.0))
    assert sum(map(len, short)) < sum(map(len, long_))  # dividing by length ** 2 favours longer outputs


@torch.no_grad()
def test_beam_1_is_greedy_decoding(model):
    extra = 2
    for row, hyp in zip(SOURCES, model.generate(SOURCES, BOS, EOS, extra, beam=1), strict=True):
        src = row[None]
        memory, output = model.encode(src), []
        for step in range(SOURCES.size(1) + extra):
            logits = model.decode(memory, src, torch.tensor([[BOS, *output]]))[0, -1]
            logits[[PAD, BOS]] = float("-inf")
            token = EOS if step == SOURCES.size(1) + extra - 1 else int(logits.argmax())
            if token == EOS:
                break
            output.append(token)
        assert hyp == output


@torch.no_grad()
def test_a_narrow_beam_returns_one_final_hypothesis_per_sentence(model):
    found = model.generate(SOURCES, BOS, EOS, 3, beam=2, lenpen=0.6)
    assert len(found) == 3 and all(EOS not in hyp and PAD not in hyp and BOS not in hyp for hyp in found)
    assert all(len(hyp) <= SOURCES.size(1) + 3 - 1 for hyp in found)


@torch.no_grad()
def test_at_the_length_limit_only_eos_may_follow(model):
    import copy

    reluctant, decode = copy.deepcopy(model), model.decode

    def never_eos(memory, src, prev):  # EOS never among the best tokens
        logits = decode(memory, src, prev)
        logits[..., EOS] -= 1e4
        return logits

    reluctant.decode = never_eos
    extra = 2
    found = reluctant.generate(SOURCES, BOS, EOS, extra, beam=2)
    assert [len(hyp) for hyp in found] == [SOURCES.size(1) + extra - 1] * 3  # ended by the forced EOS
