"""Sampling methods: tiny frozen dataclasses, static under `jax.jit`.

Each method maps next-token logits [B, V] (float32) and a PRNG key to (tokens [B] int32,
logprobs [B] float32). The log-probability is the *policy's* at the sampling temperature,
log softmax(logits / T)[token], before any top-k / top-p truncation: the quantity RL calls the
old log-prob (veRL recomputes it with the logits divided by the rollout temperature and no
truncation), so a rollout's log-probs can stand in for a scoring pass. Greedy decoding is a
point mass, so its log-probability is 0. `log_probs(logits)` exposes the full *sampling*
distribution (truncated and renormalized) for tests and for algorithms that need it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG_INF = -jnp.inf


def argmax(x: Array) -> Array:
    """First index of the maximum along the last axis. On XLA:CPU a max and a masked min are
    3.5x faster than `jnp.argmax`'s variadic reduce over a [32, 49152] vocabulary."""
    idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
    best = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == best, idx, x.shape[-1]), axis=-1)


def _sample_from(logp: Array, rng: Array, policy_logp: Array | None = None
                 ) -> tuple[Array, Array]:
    """Exact sampling from `logp` by inverting the CDF: one uniform per row instead of a Gumbel
    per vocabulary entry (4.5x faster than `jax.random.categorical` on CPU at [32, 49152]).
    u is in (0, 1], so a zero-probability token is never chosen. Returns the tokens and their
    log-probs under `policy_logp` (default: `logp`)."""
    cdf = jnp.cumsum(jnp.exp(logp), axis=-1)
    u = 1.0 - jax.random.uniform(rng, (logp.shape[0], 1))
    tokens = jnp.sum(cdf < u * cdf[:, -1:], axis=-1).astype(jnp.int32)
    tokens = jnp.minimum(tokens, logp.shape[-1] - 1)
    report = logp if policy_logp is None else policy_logp
    return tokens, jnp.take_along_axis(report, tokens[:, None], axis=-1)[:, 0]


def _check_temperature(t: float):
    if not t > 0:
        raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {t}")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """argmax decoding; deterministic, logprob 0."""

    def log_probs(self, logits: Array) -> Array:
        best = argmax(logits)
        return jnp.where(jnp.arange(logits.shape[-1]) == best[..., None], 0.0, _NEG_INF)

    def __call__(self, logits: Array, rng: Array) -> tuple[Array, Array]:
        del rng
        return argmax(logits), jnp.zeros(logits.shape[0])


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Samples softmax(logits / temperature)."""

    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)

    def log_probs(self, logits: Array) -> Array:
        return jax.nn.log_softmax(logits / self.temperature, axis=-1)

    def __call__(self, logits, rng):
        return _sample_from(self.log_probs(logits), rng)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Samples among the k most likely tokens, renormalized (ties at the k-th value kept)."""

    k: int = 50
    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)
        if self.k < 1:
            raise ValueError(f"top-k needs k >= 1, got {self.k}")

    def log_probs(self, logits: Array) -> Array:
        logits = logits / self.temperature
        kth = jax.lax.top_k(logits, min(self.k, logits.shape[-1]))[0][..., -1:]
        return jax.nn.log_softmax(jnp.where(logits >= kth, logits, _NEG_INF), axis=-1)

    def __call__(self, logits, rng):
        policy = jax.nn.log_softmax(logits / self.temperature, axis=-1)
        return _sample_from(self.log_probs(logits), rng, policy)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches p.

    A token is kept when the probability mass strictly above it is < p (so the most likely
    token is always kept), then the kept set is renormalized.
    """

    p: float = 0.95
    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(self.temperature)
        if not 0 < self.p <= 1:
            raise ValueError(f"top-p needs 0 < p <= 1, got {self.p}")

    def log_probs(self, logits: Array) -> Array:
        return self._truncate(jax.nn.log_softmax(logits / self.temperature, axis=-1))

    def _truncate(self, logp: Array) -> Array:
        if self.p >= 1:
            return logp
        probs = jnp.exp(logp)
        kept = probs >= _nucleus_threshold(probs, self.p)
        return jax.nn.log_softmax(jnp.where(kept, logp, _NEG_INF), axis=-1)

    def __call__(self, logits, rng):
        policy = jax.nn.log_softmax(logits / self.temperature, axis=-1)
        return _sample_from(self._truncate(policy), rng, policy)


def _nucleus_threshold(probs: Array, p: float) -> Array:
    """probs [B, V] -> [B, 1]: the smallest probability in the nucleus, found without a sort.

    mass(t) = sum of the probabilities > t is non-increasing in t, and the kept tokens are
    exactly those with probability >= t* = the smallest t with mass(t) < p (t* is always one of
    the probabilities). Non-negative float32s order like their bit patterns, so a binary search
    over the 31 bits finds t* exactly. A full sort of the vocabulary is ~50x slower on CPU.
    """
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)  # mass(lo) >= p (lo = 0.0)
    hi = jnp.full_like(lo, 0x3F800001)  # just above 1.0: mass(hi) = 0 < p

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below_p = jnp.sum(jnp.where(bits > mid, probs, 0.0), axis=-1, keepdims=True) < p
        return jnp.where(below_p, lo, mid), jnp.where(below_p, mid, hi)

    _, hi = jax.lax.fori_loop(0, 31, body, (lo, hi))
    # The smallest kept probability is the smallest value with bits >= hi.
    return jnp.min(jnp.where(bits >= hi, probs, jnp.inf), axis=-1, keepdims=True)


SAMPLERS = {"greedy": Greedy, "temperature": Temperature, "top_k": TopK, "top_p": TopP}


def make_sampler(name: str, **kwargs):
    """A sampler by name (config strings), e.g. make_sampler("top_p", p=0.95)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](**kwargs)
