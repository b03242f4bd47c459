"""The parts beyond Algorithm 1, in plain NumPy beside it (:mod:`.algorithm1`), each written from its paper or its
format's definition; one outer-step hook for :func:`.algorithm1.reference`. The settings are those of the harness's
``slowmo`` section:

- ``update``: slow momentum (``alpha``, ``beta``, ``nesterov``, ``pseudo_gradient``: Algorithm 1's), or a torch
  optimizer (``name: torch``): ``SGD`` with ``options`` momentum and Nesterov (torch's Nesterov SGD on the outer
  gradient: the same formula as slow momentum's Nesterov form, beta = momentum) or ``Adam`` (Kingma & Ba, with bias
  correction; ``options`` betas and eps); the outer gradient G = Delta_bar / gamma_t and lr alpha gamma_t (raw:
  Delta_bar and alpha);
- ``clip_norm``: Delta_bar <- Delta_bar min(1, c / (||Delta_bar||_2 + 1e-6)) first;
- ``mean``: exact; ``compressed`` (``codec``, ``error_feedback``): the two-phase compressed mean of
  p_i = Delta_i + e_i (:mod:`.codes`); ``eager``: Delta~_i^t = (Delta_i^t + sum_{j != i} c_j^{t-1}) / m, c_j what
  rank j contributed to the last mean (Delta_j, or its decoded codes with a codec), Kale, Douillard & Donchev 2025;
- ``fragments`` (``count`` P, ``delay`` d, ``mix``): parameter j (x, then c) in fragment j mod P, launched after
  the steps k with (k + 1) mod tau = p tau / P, its mean (exact or compressed) applied d steps later, mixed:
  x_p <- mix x~_p + (1 - mix) x_p, x_{0,p} <- x~_p (Streaming DiLoCo, 2025). Over push-sum, x_p is the de-biased z
  and the weights go on; they are reset to 1 only by an outer step of the whole model at once;
- ``mean: sharded``: the exact mean, where the state is kept (1/m per rank) not what is computed.

    from slowmo.reference import Problem
    from slowmo.reference.beyond import reference
    theta = reference(Problem("localsgd", outer=dict(tau=4, mean=dict(name="compressed", codec="int8"))))
"""

from __future__ import annotations

import numpy as np

from . import algorithm1
from .algorithm1 import Problem, base_buffers, slow_momentum
from .codes import compressed_mean


def reference(s: Problem) -> np.ndarray:
    """:func:`.algorithm1.reference` with this file's outer step."""
    return algorithm1.reference(s, Beyond)


class Beyond:
    """The outer state of every rank and the steps of the parts, after each inner step."""

    def __init__(self, s: Problem, theta0: np.ndarray) -> None:
        self.s, self.cfg = s, s.outer
        n, dim = s.world_size, len(theta0)
        self.x0, self.u = np.tile(theta0, (n, 1)), np.zeros((n, dim))  # one row per rank (they differ when eager)
        self.second, self.t_adam = np.zeros((n, dim)), np.zeros(dim)  # outer Adam's v and step count (per value)
        self.residual = np.zeros((n, dim))  # error feedback's e_i
        self.total, self.own = np.zeros(dim), np.zeros((n, dim))  # eager: sum_j c_j^{t-1}, c_i^{t-1}
        self.update, self.mean = self.cfg.get("update", {}), self.cfg.get("mean", {})
        fragments = self.cfg.get("fragments", {})
        self.count, self.delay = fragments.get("count", 1), fragments.get("delay", 0)
        self.mix = fragments.get("mix", 1.0)
        self.whole = self.count == 1 and self.delay == 0 and self.mix == 1.0
        members = [np.arange(s.d), np.array([s.d])]  # the parameters' values: x, c
        self.values = {
            p: np.concatenate([members[j] for j in range(len(members)) if j % self.count == p])
            for p in range(self.count)
        }
        self.in_flight: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # fragment -> (step, Delta_bar, gamma)

    def after_step(self, k: int, lr: np.ndarray, theta: np.ndarray, weight: np.ndarray, buf: list):
        tau = self.cfg["tau"]
        for p in range(self.count):
            if (k + 1) % tau == p * tau // self.count:  # launch: the fragment's mean of x_{0,p} - x^i_p
                e = self.values[p]
                self.in_flight[p] = (k, self._mean(self.x0[:, e] - theta[:, e], e), lr[e])
        for p in sorted(self.in_flight):
            start, delta, gamma = self.in_flight[p]
            if start + self.delay != k:
                continue
            del self.in_flight[p]
            e = self.values[p]
            new = self._update(self._clip(delta), gamma, e)
            theta[:, e] = self.mix * new + (1 - self.mix) * theta[:, e]
            self.x0[:, e] = new
            buf = base_buffers(self.cfg.get("base_buffers", "keep"), buf, self.s.momentum, e)
            if self.whole:
                weight = np.ones(len(weight))
        return theta, weight, buf

    def _mean(self, fresh: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Delta_bar of the values ``e``, one row per rank: exact, compressed or eager."""
        n, kind = len(fresh), self.mean.get("name", "exact")
        codec, error_feedback = self.mean.get("codec", "none"), self.mean.get("error_feedback", False)
        if kind == "eager":
            others = self.total - self.own  # sum_{j != i} c_j^{t-1}
            if codec == "none":
                self.own, self.total = fresh.copy(), fresh.sum(axis=0)
            else:
                sent = fresh + self.residual
                mean, decoded = compressed_mean(sent, codec)
                if error_feedback:
                    self.residual = sent - decoded
                self.own, self.total = decoded, n * mean
            return (fresh + others) / n
        if kind in ("exact", "sharded") or self.s.algorithm == "allreduce":  # (equal replicas: nothing to compress)
            return np.tile(fresh.mean(axis=0), (n, 1))
        sent = fresh + self.residual[:, e]
        mean, decoded = compressed_mean(sent, codec)
        if error_feedback:
            self.residual[:, e] = sent - decoded
        return np.tile(mean, (n, 1))

    def _clip(self, delta: np.ndarray) -> np.ndarray:
        if self.cfg.get("clip_norm") is None:
            return delta
        norms = np.linalg.norm(delta, axis=1, keepdims=True)
        return delta * np.minimum(1.0, self.cfg["clip_norm"] / (norms + 1e-6))

    def _update(self, delta: np.ndarray, gamma: np.ndarray, e: np.ndarray) -> np.ndarray:
        """x_{t+1,0} of the values ``e`` on every rank, from their x_{t,0} and Delta_bar."""
        get, options = self.update.get, self.update.get("options", {})
        alpha, raw = get("alpha", 1.0), get("pseudo_gradient", "scaled") == "raw"
        if get("optimizer", "SGD") == "SGD":  # slow momentum, or torch's SGD: its Nesterov form with beta = momentum
            beta = options.get("momentum", 0.0) if get("name") == "torch" else get("beta", 0.0)
            nesterov = options.get("nesterov", False) if get("name") == "torch" else get("nesterov", False)
            new, self.u[:, e] = slow_momentum(self.x0[:, e], self.u[:, e], delta, gamma, alpha, beta, nesterov, raw)
            return new
        g, lr = (delta, alpha) if raw else (delta / gamma, alpha * gamma)  # Adam
        self.t_adam[e] += 1
        beta1, beta2 = options.get("betas", (0.9, 0.999))
        eps = options.get("eps", 1e-8)
        self.u[:, e] = beta1 * self.u[:, e] + (1 - beta1) * g
        self.second[:, e] = beta2 * self.second[:, e] + (1 - beta2) * g**2
        m_hat, v_hat = self.u[:, e] / (1 - beta1 ** self.t_adam[e]), self.second[:, e] / (1 - beta2 ** self.t_adam[e])
        return self.x0[:, e] - lr * m_hat / (np.sqrt(v_hat) + eps)
