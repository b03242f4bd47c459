"""The options beyond Algorithm 1, in plain NumPy beside it (:mod:`.algorithm1`), each written from its paper or its
format's definition:

- ``outer_optimizer``: "sgd" (Algorithm 1's slow momentum), "nesterov" (torch's SGD with Nesterov momentum beta on
  the outer gradient: the same formula as slow momentum's Nesterov form) or "adam" (Kingma & Ba, with bias
  correction; betas (beta, adam_beta2), adam_eps), with the outer gradient G = Delta_bar / gamma_t and lr
  alpha gamma_t (raw: Delta_bar and alpha);
- ``clip_norm``: Delta_bar <- Delta_bar min(1, c / (||Delta_bar||_2 + 1e-6)) first;
- ``compression`` (and ``error_feedback``): the two-phase compressed mean of p_i = Delta_i + e_i (:mod:`.codes`);
- ``eager``: Delta~_i^t = (Delta_i^t + sum_{j != i} c_j^{t-1}) / m, c_j what rank j contributed to the last mean
  (Delta_j, or its decoded codes with a compression), Kale, Douillard & Donchev 2025;
- ``fragments`` P, ``sync_delay`` d, ``fragment_mix``: parameter j (x, then c) in fragment j mod P, launched after
  the steps k with (k + 1) mod tau = p tau / P, its mean (exact or compressed) applied d steps later, mixed:
  x_p <- mix x~_p + (1 - mix) x_p, x_{0,p} <- x~_p (Streaming DiLoCo, 2025). Over push-sum, x_p is the de-biased z
  and the weights go on; they are reset to 1 only by an outer step of the whole model at once.
"""

from __future__ import annotations

import numpy as np

from .algorithm1 import Problem, base_buffers, slow_momentum
from .codes import compressed_mean


class Beyond:
    """The outer state of every rank and the steps of the options, after each inner step."""

    def __init__(self, s: Problem, x0: np.ndarray) -> None:
        self.s, self.cfg = s, s.outer
        n, dim = x0.shape
        self.x0, self.u = x0.copy(), np.zeros((n, dim))
        self.second, self.t_adam = np.zeros((n, dim)), np.zeros(dim)  # outer Adam's v and step count (per value)
        self.residual = np.zeros((n, dim))  # error feedback's e_i
        self.total, self.own = np.zeros(dim), np.zeros((n, dim))  # eager: sum_j c_j^{t-1}, c_i^{t-1}
        cfg = self.cfg
        self.count, self.delay = cfg.get("fragments", 1), cfg.get("sync_delay", 0)
        self.mix = cfg.get("fragment_mix", 1.0)
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
        n = len(fresh)
        codec = self.cfg.get("compression", "none")
        if self.cfg.get("eager", False):
            others = self.total - self.own  # sum_{j != i} c_j^{t-1}
            if codec == "none":
                self.own, self.total = fresh.copy(), fresh.sum(axis=0)
            else:
                sent = fresh + self.residual
                mean, decoded = compressed_mean(sent, codec)
                if self.cfg.get("error_feedback", False):
                    self.residual = sent - decoded
                self.own, self.total = decoded, n * mean
            return (fresh + others) / n
        if codec == "none" or self.s.mixing == "gradient_mean":  # (equal replicas: nothing to compress)
            return np.tile(fresh.mean(axis=0), (n, 1))
        sent = fresh + self.residual[:, e]
        mean, decoded = compressed_mean(sent, codec)
        if self.cfg.get("error_feedback", False):
            self.residual[:, e] = sent - decoded
        return np.tile(mean, (n, 1))

    def _clip(self, delta: np.ndarray) -> np.ndarray:
        if self.cfg.get("clip_norm") is None:
            return delta
        norms = np.linalg.norm(delta, axis=1, keepdims=True)
        return delta * np.minimum(1.0, self.cfg["clip_norm"] / (norms + 1e-6))

    def _update(self, delta: np.ndarray, gamma: np.ndarray, e: np.ndarray) -> np.ndarray:
        """x_{t+1,0} of the values ``e`` on every rank, from their x_{t,0} and Delta_bar."""
        cfg = self.cfg
        alpha, beta = cfg.get("alpha", 1.0), cfg.get("beta", 0.0)
        raw = cfg.get("pseudo_gradient", "scaled") == "raw"
        optimizer = cfg.get("outer_optimizer", "sgd")
        if optimizer != "adam":  # sgd, or torch's Nesterov SGD: slow momentum (in its Nesterov form)
            nesterov = cfg.get("nesterov", False) or optimizer == "nesterov"
            new, self.u[:, e] = slow_momentum(self.x0[:, e], self.u[:, e], delta, gamma, alpha, beta, nesterov, raw)
            return new
        g, lr = (delta, alpha) if raw else (delta / gamma, alpha * gamma)
        self.t_adam[e] += 1
        beta2, eps = cfg.get("adam_beta2") or 0.999, cfg.get("adam_eps") or 1e-8
        self.u[:, e] = beta * self.u[:, e] + (1 - beta) * g
        self.second[:, e] = beta2 * self.second[:, e] + (1 - beta2) * g**2
        m_hat, v_hat = self.u[:, e] / (1 - beta ** self.t_adam[e]), self.second[:, e] / (1 - beta2 ** self.t_adam[e])
        return self.x0[:, e] - lr * m_hat / (np.sqrt(v_hat) + eps)
