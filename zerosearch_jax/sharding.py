"""Meshes and placement by logical axis rules: where the policy, reference, critic, simulator,
KV caches and batches live.

Every array in the project is described by logical axis names (the model's weights by
`models.param_logical_axes`, KV caches by `models.cache_logical_axes`, batches by `batch` on
their leading axis). A rule table maps each logical name to mesh axes of a
(data, fsdp, tensor) mesh, Flax style; a `Placement` (a mesh and its rules) turns names into
`NamedSharding`s, so one config decides the layout of everything:

    meshes = make_meshes((1, -1, 1), DEFAULT_RULES, simulator_devices=2)
    params = meshes.train.put(params, meshes.train.param_shardings(config))

A mesh axis that does not divide an array dimension is dropped for that array (a model with 3
KV heads on a tensor axis of 2 keeps its KV cache replicated along heads) rather than failing;
batches are the exception, sized by the caller to a multiple of `batch_shards`.

Multi-host (`jax.distributed`): the training mesh spans every process; rollouts and the
simulator run on process-local meshes (each process samples its own slice of the questions,
and the host loop between decode turns needs the tokens on its own host). `make_meshes` builds
all three; `Placement.put` moves a pytree between them (a global array reaches a local mesh
through one all-gather).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim")

# Data parallel over (data, fsdp), weights fully sharded over fsdp (ZeRO-3 style: gathered layer
# by layer), Megatron-style tensor parallel over tensor (heads and the MLP's hidden units; q|k|v
# rows are KV-head-major, so a GQA group stays on one device).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
)

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding


def check_rules(rules: Sequence) -> tuple:
    """Validates a rule table and returns it as nested tuples (hashable, so a `Placement` can be
    a static jit argument). Raises ValueError naming the bad entry."""
    out = []
    for rule in rules:
        if not isinstance(rule, Sequence) or isinstance(rule, str) or len(rule) != 2:
            raise ValueError(f"axis rule {rule!r}: expected a (logical axis, mesh axes) pair")
        name, target = rule
        if name not in LOGICAL_AXES:
            raise ValueError(f"axis rule {rule!r}: unknown logical axis {name!r}; known: "
                             f"{', '.join(LOGICAL_AXES)}")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [a for a in axes if a not in AXES]
        if bad or len(set(axes)) != len(axes):
            raise ValueError(f"axis rule {rule!r}: mesh axes must be distinct names among "
                             f"{AXES} (or None), got {target!r}")
        out.append((name, None if not axes else axes[0] if isinstance(target, str) else axes))
    return tuple(out)


def resolve_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) with at most one -1, inferred from `n_devices`."""
    shape = [int(s) for s in shape]
    if len(shape) != len(AXES) or shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: expected {len(AXES)} sizes "
                         f"(data, fsdp, tensor), each >= 1 or a single -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n_devices % known:
            raise ValueError(f"mesh shape {tuple(shape)}: {n_devices} devices do not divide "
                             f"into groups of {known}")
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                         f"have {n_devices}")
    return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all of them, every process's),
    in order: consecutive devices share the tensor axis, then fsdp, then data."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(shape, len(devices))
    # Auto axis types (jax.sharding.Mesh's default): shardings are annotations the compiler
    # propagates, not Explicit types that every op must agree with.
    return jax.sharding.Mesh(np.array(devices, dtype=object).reshape(shape), AXES)


def _fit(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
    """Drops, per dimension, the trailing mesh axes that do not divide the dimension."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and the logical-axis rules that place arrays on it. Hashable (static under jit)."""

    mesh: jax.sharding.Mesh
    rules: tuple = DEFAULT_RULES

    @property
    def batch_axes(self):
        """The mesh axes a leading batch dimension is split over (None: replicated)."""
        return nn.logical_to_mesh_axes(("batch",), self.rules)[0]

    @property
    def batch_shards(self) -> int:
        """How many ways a batch is split; batch sizes must be a multiple of it."""
        axes = self.batch_axes
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return math.prod(self.mesh.shape[a] for a in axes)

    @property
    def is_local(self) -> bool:
        """True when every device of the mesh belongs to this process."""
        return all(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """[B, ...] arrays split along B."""
        return NamedSharding(self.mesh, P(self.batch_axes, *([None] * (ndim - 1))))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def shardings(self, logical_axes, shapes):
        """NamedShardings for a pytree of logical `PartitionSpec`s and a matching pytree of
        arrays or `ShapeDtypeStruct`s (whose shapes decide which mesh axes fit)."""
        def one(spec, x):
            mesh_spec = nn.logical_to_mesh_axes(tuple(spec), self.rules)
            return NamedSharding(self.mesh, _fit(mesh_spec, x.shape, self.mesh))

        return jax.tree.map(one, logical_axes, shapes, is_leaf=lambda x: isinstance(x, P))

    def param_shardings(self, config, logical_axes=None, shapes=None):
        """The model's weights (or, given its own logical axes and shapes, another tree with
        the same names, e.g. the critic)."""
        return self.shardings(_param_axes(config) if logical_axes is None else logical_axes,
                              _param_shapes(config) if shapes is None else shapes)

    def cache_shardings(self, config, cache):
        """A `models.KVCache` (arrays or shapes): batch along the batch axes, KV heads along
        theirs."""
        from zerosearch_jax import models

        return self.shardings(models.cache_logical_axes(config), cache)

    def constrain_cache(self, config, cache):
        """Inside jit: pins a KV cache to its sharding (so a donated cache keeps its layout
        across decode steps and turns instead of whatever propagation picks)."""
        return jax.lax.with_sharding_constraint(cache, self.cache_shardings(config, cache))

    def put(self, tree, shardings):
        """Moves a pytree onto `shardings` (on this placement's mesh) from wherever it is:
        host numpy arrays (the same on every process), arrays on another mesh of this
        process, or global arrays spanning processes (gathered once, then resharded)."""
        global_source = any(isinstance(x, jax.Array) and not x.is_fully_addressable
                            for x in jax.tree.leaves(tree))
        if self.is_local:
            if global_source:
                # A global array cannot be resharded onto a process-local mesh directly:
                # replicate it over its own mesh (one all-gather), then take this process's copy.
                mesh = next(x.sharding.mesh for x in jax.tree.leaves(tree)
                            if isinstance(x, jax.Array) and not x.is_fully_addressable)
                tree = jax.tree.map(lambda x: x.addressable_shards[0].data,
                                    _replicate(tree, mesh))
            return jax.device_put(tree, shardings)

        def to_global(x, s):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return jax.device_put(x, s)
            # A global array from process-local values (every process holds the same ones).
            return jax.make_array_from_callback(np.shape(x), s,
                                                functools.partial(_index, np.asarray(x)))

        return jax.tree.map(to_global, tree, shardings)

    def put_batch(self, local: dict[str, np.ndarray], global_rows: int) -> dict[str, jax.Array]:
        """Global [B, ...] arrays from this process's rows (`process_rows`) of each."""
        return {k: jax.make_array_from_process_local_data(
            self.batch_sharding(np.ndim(v)), np.asarray(v), (global_rows, *np.shape(v)[1:]))
            for k, v in local.items()}

    def process_rows(self, global_rows: int) -> tuple[int, int]:
        """[start, stop) of the batch rows this process's devices hold. Raises ValueError when
        they are not one contiguous block of global_rows / process_count rows (the batch must
        be split across processes, not replicated over them)."""
        sharding = self.batch_sharding(1)
        idx = sharding.addressable_devices_indices_map((global_rows,)).values()
        starts = sorted({s[0].indices(global_rows)[:2] for s in idx})
        start, stop = starts[0][0], starts[-1][1]
        n = global_rows // jax.process_count()
        covered = sum(b - a for a, b in starts)
        if covered != stop - start or stop - start != n or global_rows % jax.process_count():
            raise ValueError(
                f"the batch axes {self.batch_axes} of mesh {dict(self.mesh.shape)} give process "
                f"{jax.process_index()} rows {starts} of {global_rows}; each of the "
                f"{jax.process_count()} processes needs its own contiguous block")
        return start, stop


def _index(x: np.ndarray, idx):
    return x[idx]


@functools.partial(jax.jit, static_argnums=1)
def _replicate(tree, mesh):
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=16)
def _param_axes(config):
    from zerosearch_jax import models

    return models.param_logical_axes(config)


@functools.lru_cache(maxsize=16)
def _param_shapes(config):
    from zerosearch_jax import models

    return models.param_shapes(config)


@dataclasses.dataclass(frozen=True)
class Meshes:
    """The placements of one run.

    train:     every process's devices (minus the simulator's): the update, scoring, the
               reference policy, the critic.
    rollout:   this process's part of `train`: policy generation on its slice of the questions
               (the same placement as `train` in a single process).
    simulator: this process's simulator devices (its own sub-mesh), or `rollout`.
    """

    train: Placement
    rollout: Placement
    simulator: Placement


def _local_shape(shape: tuple[int, int, int], n_local: int) -> tuple[int, int, int]:
    """A process's share of a global (data, fsdp, tensor) shape: it keeps as much of the
    tensor and then fsdp axes as fits on its devices, the rest goes to data."""
    tensor = math.gcd(shape[2], n_local)
    fsdp = math.gcd(shape[1], n_local // tensor)
    return (n_local // (tensor * fsdp), fsdp, tensor)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The run's device layout (the config's `mesh` section): (data, fsdp, tensor) sizes with
    at most one -1 (the devices left), the logical-axis rules, and an optional simulator
    sub-mesh of the last `simulator_devices` devices of every process."""

    shape: tuple[int, int, int] = (-1, 1, 1)
    axis_rules: tuple = DEFAULT_RULES
    simulator_devices: int = 0
    simulator_shape: tuple[int, int, int] = (-1, 1, 1)

    def __post_init__(self):
        for name in ("shape", "simulator_shape"):
            shape = tuple(getattr(self, name))
            if not (len(shape) == 3 and shape.count(-1) <= 1 and all(
                    isinstance(x, int) and (x >= 1 or x == -1) for x in shape)):
                raise ValueError(f"{name} = {shape!r}: expected (data, fsdp, tensor) sizes >= 1, "
                                 "with at most one -1 (inferred)")
            object.__setattr__(self, name, shape)
        object.__setattr__(self, "axis_rules", check_rules(self.axis_rules))
        if self.simulator_devices < 0:
            raise ValueError(f"simulator_devices = {self.simulator_devices}: expected >= 0 (0: "
                             "the simulator shares the training devices)")

    def make(self) -> Meshes:
        return make_meshes(self.shape, self.axis_rules, self.simulator_devices,
                           self.simulator_shape)


def make_meshes(shape: Sequence[int], rules: Sequence = DEFAULT_RULES,
                simulator_devices: int = 0, simulator_shape: Sequence[int] = (-1, 1, 1),
                devices: Sequence | None = None) -> Meshes:
    """Splits the devices into the training mesh and, if `simulator_devices` > 0, a simulator
    sub-mesh of the last `simulator_devices` devices of every process, so rollout and
    simulation do not share devices. Raises ValueError naming the bad value."""
    rules = check_rules(rules)
    devices = list(jax.devices() if devices is None else devices)
    if simulator_devices < 0:
        raise ValueError(f"simulator_devices must be >= 0, got {simulator_devices}")
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    n_local = min(len(v) for v in by_process.values())
    if simulator_devices and simulator_devices >= n_local:
        raise ValueError(f"simulator_devices={simulator_devices} leaves no training device: "
                         f"each process has {n_local}")
    sim = {p: v[len(v) - simulator_devices:] if simulator_devices else [] for p, v in
           by_process.items()}
    train_devices = [d for d in devices if d not in sim[d.process_index]]
    train = Placement(make_mesh(shape, train_devices), rules)
    me = jax.process_index()
    if len(by_process) == 1:
        rollout = train
    else:
        mine = [d for d in train.mesh.devices.flat if d.process_index == me]
        rollout = Placement(make_mesh(_local_shape(train.mesh.devices.shape, len(mine)), mine),
                            rules)
    simulator = (Placement(make_mesh(simulator_shape, sim[me]), rules) if simulator_devices
                 else rollout)
    return Meshes(train, rollout, simulator)


def to_host(tree) -> Any:
    """numpy copies of a pytree of (possibly global, sharded) arrays, on every process.
    A collective across processes: every process must call it."""
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def allgather(x: np.ndarray) -> np.ndarray:
    """[process_count, *x.shape]: every process's `x` (the same shape on each), on every
    process."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x))).reshape(
        jax.process_count(), *np.shape(x))
