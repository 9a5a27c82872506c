"""A 2-D mixture of Gaussians with closed-form noisy scores and class posteriors (test helper).

Class k is mixture component k: x0 | y=k ~ N(mu_k, S_k). Under q(x_t | x0) = N(sqrt(abar) x0,
(1 - abar) I) the noised class-k density is N(sqrt(abar) mu_k, abar S_k + (1 - abar) I), so
the conditional score, the unconditional (mixture) score and p(y | x_t) are all exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.schedules import make_schedule

WEIGHTS = np.array([0.3, 0.3, 0.4])
MEANS = np.array([[-0.4, -0.2], [0.4, -0.2], [0.0, 0.45]])
COVS = np.array([
    [[0.06, 0.02], [0.02, 0.05]],
    [[0.05, -0.015], [-0.015, 0.07]],
    [[0.08, 0.0], [0.0, 0.04]],
])
K = len(WEIGHTS)
NULL = K  # the "no label" class of the exact CFG-capable model


class GMM:
    def __init__(self, schedule: str = "cosine", num_timesteps: int = 1000):
        base = make_schedule(schedule, num_timesteps)
        self.abar_table = base.alphas_cumprod  # indexed by ORIGINAL timesteps
        self.log_w = jnp.log(jnp.asarray(WEIGHTS, jnp.float32))
        self.mu = jnp.asarray(MEANS, jnp.float32)
        self.S = jnp.asarray(COVS, jnp.float32)

    def _noisy(self, t):
        abar = self.abar_table[t][:, None, None]                      # [B,1,1]
        m = jnp.sqrt(abar) * self.mu[None]                            # [B,K,2]
        C = abar[..., None] * self.S[None] + (1 - abar[..., None]) * jnp.eye(2)  # [B,K,2,2]
        return abar[:, 0, 0], m, C

    def _comp(self, x, t):
        """Per-component log-densities [B,K] and scores [B,K,2] at x_t (2x2 algebra in closed form)."""
        abar, m, C = self._noisy(t)
        a, b, c, d_ = C[..., 0, 0], C[..., 0, 1], C[..., 1, 0], C[..., 1, 1]
        det = a * d_ - b * c
        d = x[:, None, :] - m
        u, v = d[..., 0], d[..., 1]
        score = -jnp.stack([d_ * u - b * v, -c * u + a * v], axis=-1) / det[..., None]
        logp = 0.5 * jnp.sum(d * score, axis=-1) - 0.5 * jnp.log(det) - jnp.log(2 * jnp.pi)
        return abar, logp, score

    def logits(self, x, t):
        """log p(y=k, x_t) up to a constant: log_softmax of these is the exact log p(y | x_t)."""
        _, logp, _ = self._comp(x, t)
        return self.log_w[None] + logp

    def cond_score(self, x, t, y):
        _, _, score = self._comp(x, t)
        return jnp.take_along_axis(score, y[:, None, None], axis=1)[:, 0]

    def uncond_score(self, x, t):
        _, logp, score = self._comp(x, t)
        r = jax.nn.softmax(self.log_w[None] + logp, axis=-1)
        return jnp.einsum("bk,bki->bi", r, score)

    def eps(self, x, t, y=None):
        abar = self.abar_table[t][:, None]
        if y is None:
            s = self.uncond_score(x, t)
        else:
            yc = jnp.minimum(y, K - 1)
            s = jnp.where((y == NULL)[:, None], self.uncond_score(x, t), self.cond_score(x, t, yc))
        return -jnp.sqrt(1 - abar) * s

    # guided-diffusion style pluggable functions
    def model_fn(self, x, t, cond):
        """Exact eps; label NULL (or no label) gives the unconditional model."""
        return self.eps(x, t, cond.get("y"))

    def uncond_model_fn(self, x, t, cond):
        return self.eps(x, t, None)

    def logits_fn(self, x, t):
        return self.logits(x, t)

    def classify_clean(self, x):
        """Bayes classifier on clean data (abar = 1)."""
        Sinv = np.linalg.inv(COVS)
        d = np.asarray(x)[:, None, :] - MEANS[None]
        maha = np.einsum("bki,kij,bkj->bk", d, Sinv, d)
        logp = np.log(WEIGHTS)[None] - 0.5 * maha - 0.5 * np.linalg.slogdet(COVS)[1][None]
        return np.argmax(logp, axis=-1)
