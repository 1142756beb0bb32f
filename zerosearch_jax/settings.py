"""Config sections -> frozen dataclasses, each value declared once.

A run's `ml_collections` config is the one place its values are written; the typed, frozen
dataclasses the code runs on are filled from it by field name, by one function:

    rollout = build(agent.RolloutConfig, c.rollout, "rollout")
    update = build(UpdateConfig, c.algorithm, "algorithm", remat=c.remat)

A field reads the key of its own name; a key the section lacks keeps the dataclass's default;
lists become tuples; `overrides` bring values from elsewhere in the config (the run's seed, a
key of another section) or values derived from it. A dataclass field whose type is itself a
dataclass is built the same way from the same section (one flat section fills a nested
config) unless an override gives it. Each dataclass checks its own values in
`__post_init__`; a ValueError or TypeError there becomes a `ConfigError` naming the section
(and the key, when the message starts with a field's name).
Checks that span sections are stated with `check(condition, key, value, expected)`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections

T = TypeVar("T")
V = TypeVar("V")


class ConfigError(ValueError):
    """A config value is invalid or inconsistent; the message names the key."""


def check(condition: bool, key: str, value: Any, expected: str) -> None:
    """Raises a ConfigError `config.<key> = <value>: expected <expected>` unless `condition`."""
    if not condition:
        raise ConfigError(f"config.{key} = {value!r}: expected {expected}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type[T], section: ml_collections.ConfigDict, key: str, **overrides: Any) -> T:
    """The frozen dataclass `cls` filled from the config `section` (at `config.<key>`)."""
    types = _field_types(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(types[f.name]):
            values[f.name] = build(types[f.name], section, key)
        elif f.name in section:
            value = section[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    unknown = set(overrides) - set(values)
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        # "b2 = 1.0: expected ..." from the dataclass -> "config.optim.b2 = 1.0: expected ...".
        message = str(e)
        first = message.split(" ", 1)[0]
        if first in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(f"config.{key}.{message}") from None
        raise ConfigError(f"config.{key}: {message}") from None


def lookup(registry: Mapping[str, V], name: str, what: str) -> V:
    """`registry[name]` (an estimator, a schedule, ...), or a ValueError naming the valid
    names: `unknown <what> 'x'; valid names: [...]`."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; valid names: {sorted(registry)}") from None
