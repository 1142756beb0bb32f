"""Checkpoints that verify what they restore (orbax underneath).

A step is saved with a fingerprint of every leaf of the train state in its JSON metadata: two
wrapping uint32 sums of the leaf's bit pattern, one of them position-weighted, computed on
device in one pass. A restore recomputes them and also checks that every float leaf is finite;
a step that fails to load (a truncated array file, an emptied metadata file) or to verify (bytes
overwritten with garbage that still reads as numbers) is set aside (renamed `<step>.corrupt`,
never deleted) with a warning saying why, and the next newest step is tried. Only when no step
is intact does the restore raise.

A save first checks that the disk has room for the state (`require_free_space`): a full disk
stops the run with an error that says how much is needed and free, before anything is written,
and the steps already saved stay as they were. A save that fails part-way anyway (the disk
filled meanwhile) leaves no partial step behind.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_sums(x: jax.Array) -> jax.Array:
    """[2] uint32: sum of the bit pattern, and sum of bit pattern x (index + 1), both wrapping."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize in _UINT:
        bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    else:  # 8-byte leaves: both halves
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits.reshape(-1)
    weights = jnp.arange(1, bits.shape[0] + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _fingerprint(leaves):
    return jnp.stack([_leaf_sums(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree: Any) -> list[list[int]]:
    """Per leaf (in `jax.tree.leaves` order), its two checksums, as JSON-ready ints."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
    return np.asarray(jax.device_get(_fingerprint(leaves))).astype(int).tolist()


@jax.jit
def _all_finite(leaves):
    ok = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(ok)) if ok else jnp.bool_(True)


def verify(state: Any, meta: dict) -> str | None:
    """None if `state` is what was saved (its fingerprint matches `meta["fingerprint"]`, when
    the step has one) and finite; else what is wrong."""
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
    saved = meta.get("fingerprint")
    if saved is not None:
        now = fingerprint(state)
        if len(saved) != len(now):
            return f"{len(now)} leaves, but {len(saved)} were saved"
        bad = [i for i, (a, b) in enumerate(zip(saved, now, strict=True)) if list(a) != list(b)]
        if bad:
            return (f"{len(bad)} of {len(now)} leaves differ from the checksums written with the "
                    f"step (first: leaf {bad[0]})")
    if not bool(_all_finite(leaves)):
        return "non-finite values in the restored state"
    return None


class DiskSpaceError(OSError):
    """The disk holding a run's directory has no room for what the run is about to write."""


# Room kept free beyond the estimate: orbax's metadata, the step's JSON, the filesystem's own.
_MARGIN = 64 * 2**20


def state_bytes(tree: Any) -> int:
    """Bytes this process writes when it saves `tree`: each array once (orbax writes one
    replica), split evenly over the processes."""
    total = sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))
    return -(-total // jax.process_count())


def directory_bytes(path: str) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files if not os.path.islink(os.path.join(root, f)))


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def require_free_space(directory: str, need: int, what: str) -> None:
    """Raises `DiskSpaceError` unless the disk holding `directory` (or its nearest existing
    parent) has `need` bytes free beyond a small margin; the message says what needed them."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if free < need + _MARGIN:
        raise DiskSpaceError(
            errno.ENOSPC, f"not enough disk space for {what}: it needs {_gb(need + _MARGIN)}, "
            f"the disk holding {directory} has {_gb(free)} free. Free some space or point "
            "--workdir at a larger disk; nothing already saved there was changed")


def save(manager, step: int, state: Any, meta: dict) -> None:
    """Saves `state` and `meta` (plus the state's fingerprint) as `step`, and waits. Checks
    the disk's room first (`DiskSpaceError`, nothing written); a save that fails part-way is
    removed, so the next restore sees only the steps saved before it."""
    import orbax.checkpoint as ocp

    directory = os.fspath(manager.directory)
    require_free_space(directory, state_bytes(state),
                       f"checkpoint step {step} in {directory}")
    meta = dict(meta, fingerprint=fingerprint(state))
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()
    except Exception as e:
        _remove_partial(manager, step)
        if "No space left" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
            raise DiskSpaceError(errno.ENOSPC, f"the disk filled while checkpoint step {step} "
                                 f"was written to {directory}; the partial step was removed, "
                                 f"earlier steps {manager.all_steps()} are intact") from e
        raise


def _remove_partial(manager, step: int) -> None:
    """Deletes what a failed save of `step` left (orbax's temporary directory) on process 0."""
    if jax.process_index() == 0:
        for path in glob.glob(os.path.join(os.fspath(manager.directory), f"{step}.orbax-*")):
            shutil.rmtree(path, ignore_errors=True)
    manager.reload()


def restore_latest_intact(manager, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest step that loads and verifies; None when there is no
    step. Steps that fail are renamed `<step>.corrupt` (on process 0) with a warning."""
    import orbax.checkpoint as ocp

    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            problem = verify(restored["state"], dict(restored["meta"]))
        except Exception as e:  # orbax raises many kinds for damaged files; each one is a skip
            text = str(e).strip().splitlines()
            problem = f"{type(e).__name__}: {text[0][:300] if text else ''}"
        if problem is None:
            if failures:
                logger.warning("restored step %d; skipped %s", step,
                               "; ".join(f"step {s} ({why})" for s, why in failures))
            return step, restored["state"], dict(restored["meta"])
        logger.warning("checkpoint step %d is damaged, setting it aside: %s", step, problem)
        failures.append((step, problem))
        _set_aside(manager, step)
    if failures:
        raise RuntimeError(f"no intact checkpoint in {manager.directory}: " + "; ".join(
            f"step {s}: {why}" for s, why in failures))
    return None


def _set_aside(manager, step: int) -> None:
    if jax.process_index() == 0:
        path = os.path.join(os.fspath(manager.directory), str(step))
        if os.path.exists(path):
            target = path + ".corrupt"
            n = 1
            while os.path.exists(target):
                target, n = f"{path}.corrupt{n}", n + 1
            os.rename(path, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    manager.reload()
