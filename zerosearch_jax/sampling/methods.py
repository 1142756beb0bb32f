"""Sampling methods: tiny frozen dataclasses, static under `jax.jit`.

Each method maps next-token logits [B, V] (float32) and a PRNG key to (tokens [B] int32,
logprobs [B] float32), where the log-probability is taken under the distribution actually
sampled from (after temperature, top-k or top-p renormalization). Greedy decoding is a point
mass, so its log-probability is 0. `log_probs(logits)` exposes the full sampling distribution
for tests and for algorithms that need it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG_INF = -jnp.inf


def _sample_from(logp: Array, rng: Array) -> tuple[Array, Array]:
    tokens = jax.random.categorical(rng, logp, axis=-1).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _check_temperature(t: float):
    if not t > 0:
        raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {t}")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """argmax decoding; deterministic, logprob 0."""

    def log_probs(self, logits: Array) -> Array:
        best = jnp.argmax(logits, axis=-1)
        return jnp.where(jnp.arange(logits.shape[-1]) == best[..., None], 0.0, _NEG_INF)

    def __call__(self, logits: Array, rng: Array) -> tuple[Array, Array]:
        del rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[0])


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
        return _sample_from(self.log_probs(logits), rng)


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
        logp = jax.nn.log_softmax(logits / self.temperature, axis=-1)
        if self.p >= 1:
            return logp
        sorted_logp = jnp.sort(logp, axis=-1)[..., ::-1]
        mass_before = jnp.cumsum(jnp.exp(sorted_logp), axis=-1) - jnp.exp(sorted_logp)
        kept = mass_before < self.p
        # The smallest kept log-probability is the threshold; ties at it are kept too.
        threshold = jnp.min(jnp.where(kept, sorted_logp, jnp.inf), axis=-1, keepdims=True)
        return jax.nn.log_softmax(jnp.where(logp >= threshold, logp, _NEG_INF), axis=-1)

    def __call__(self, logits, rng):
        return _sample_from(self.log_probs(logits), rng)


SAMPLERS = {"greedy": Greedy, "temperature": Temperature, "top_k": TopK, "top_p": TopP}


def make_sampler(name: str, **kwargs):
    """A sampler by name (config strings), e.g. make_sampler("top_p", p=0.95)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](**kwargs)
