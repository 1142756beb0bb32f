"""Packing episodes into fixed-shape micro-batches (host plan, device gathers).

A rollout batch holds B episodes as [B, T] rows, each padded to the step's longest; an update
over those rows pays for the padding (a third of the slots in the default job). Here several
episodes share a row of `row_length` tokens, separated by segment ids (attention stays within
an episode: `training.segment_attention_mask`), and rows are grouped into micro-batches of
`rows` rows:

    batch [B, T]  --plan (host, numpy)-->  Layout: index maps, [M, rows, L] micro-batches
    ref/old/value forwards:  gather [B, T] -> packed micro-batches, run, scatter back to [B, T]
    estimators (GRPO groups, GAE scans):   on [B, T], unchanged
    update: each mini-batch's micro-batches gathered from the scored [B, T] arrays

Shapes are fixed per run (M is the worst case, one episode per row); a loop runs only the
micro-batches in use (`*_used`), so the work follows the real tokens and nothing recompiles when
a step's episodes are longer or shorter. `row_length=0` gives the unpacked layout (one episode
per row of T tokens, `rows` rows per micro-batch), the update as it was before packing.

Mini-batches partition episodes (a fresh host permutation each PPO epoch, as veRL shuffles its
mini-batches), and each is packed on its own, so which episodes share an optimizer step does not
depend on the packing or the micro-batch size.

Every index is global (into the whole [B, T] batch), and the plan is a pure function of the
attention mask and a seed, so on several processes each builds the same plan from the gathered
masks.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class Layout:
    """Where each real token of a [B, T] batch sits in the packed micro-batches.

    score_index    [M, R, L] int32  flat index (b * T + t) of the token in each packed slot
    score_segment  [M, R, L] int32  episode b + 1 in each slot (> B: a shared prompt), 0 = pad
    score_prefix   [M, R, L] int32  the shared prompt a slot also sees (its segment id), 0: none
    score_used     []        int32  micro-batches holding tokens (the first score_used)
    unpack_index   [B, T]    int32  flat index into [M * R * L] of each batch slot (0 for padding)
    update_index, update_segment, update_prefix  [E, N, Mb, R, L] per PPO epoch and mini-batch
    update_used    [E, N]    int32  micro-batches in use in each mini-batch
    """

    score_index: Array
    score_segment: Array
    score_prefix: Array
    score_used: Array
    unpack_index: Array
    update_index: Array
    update_segment: Array
    update_prefix: Array
    update_used: Array


_P = jax.sharding.PartitionSpec
_ROWS3, _ROWS5 = _P(None, "batch", None), _P(None, None, None, "batch", None)
# Logical axes of a Layout's arrays (sharding.Placement.shardings maps them to a mesh).
LAYOUT_AXES = Layout(
    score_index=_ROWS3, score_segment=_ROWS3, score_prefix=_ROWS3, score_used=_P(),
    unpack_index=_P("batch", None), update_index=_ROWS5, update_segment=_ROWS5,
    update_prefix=_ROWS5, update_used=_P())


@dataclasses.dataclass
class _Unit:
    """Tokens placed together in a row: an optional shared prompt (columns of its first
    episode), then episodes (each from the column after the shared part)."""

    shared: np.ndarray  # columns of the shared prompt (of episodes[0]); empty: none
    episodes: list[int]


def _units(real: list[np.ndarray], episodes: np.ndarray, shared: dict[int, np.ndarray],
           group: np.ndarray | None, row_length: int) -> list[tuple[int, _Unit]]:
    """Rows of units, best fit. An episode whose group's prompt is shared (`shared[b]`: the
    columns all of the group hold the same tokens in) costs only its own part in a row that
    already holds that prompt; the episodes of a group in one row form a unit (the prompt once,
    then each episode's part); other episodes are units alone.

    Two orders are tried and the one with fewer rows (then fewer tokens) kept: episodes by
    decreasing length, and groups by decreasing total length, each group's episodes in turn
    (they then share their prompt more often: 5.9 rows a batch against 6.5 in 2,000 simulated
    batches shaped as the default's, 4 groups of 4 episodes of 270-630 tokens; 6 rows against
    7 on a real rollout's batch, `benchmarks/update_phase.py`)."""
    def key(b: int) -> int:
        return int(group[b]) if group is not None and b in shared else -1 - b

    def fill(order: list[int]) -> tuple[list[dict[int, list[int]]], int]:
        rows: list[dict[int, list[int]]] = []
        room: list[int] = []
        for b in order:
            k, part = key(b), len(real[b]) - len(shared.get(b, ()))
            cost = [part if k in r else len(real[b]) for r in rows]
            fits = [i for i in range(len(rows)) if room[i] >= cost[i]]
            if fits:
                i = min(fits, key=lambda i: room[i] - cost[i])
            else:
                rows.append({})
                room.append(row_length)
                cost.append(len(real[b]))
                i = len(rows) - 1
            rows[i].setdefault(k, []).append(b)
            room[i] -= cost[i]
        return rows, len(rows) * row_length - sum(room)

    members = episodes.tolist()
    total: dict[int, int] = {}
    for b in members:
        total[key(b)] = total.get(key(b), 0) + len(real[b])
    by_length = sorted(members, key=lambda b: (-len(real[b]), b))
    by_group = sorted(members, key=lambda b: (-total[key(b)], key(b), -len(real[b]), b))
    rows, _ = min((fill(by_group), fill(by_length)), key=lambda r: (len(r[0]), r[1]))
    return [(r, _Unit(shared[eps[0]] if k >= 0 else np.zeros(0, np.int32), eps))
            for r, units in enumerate(rows) for k, eps in units.items()]


def _place(real: list[np.ndarray], units: list[tuple[int, _Unit]], n_rows: int, row_length: int,
           T: int, B: int):
    """Index, segment and prefix arrays [n_rows, row_length] for units in rows, and each
    episode's column -> flat packed slot map (as {b: (columns, slots)})."""
    index = np.zeros((n_rows, row_length), np.int32)
    segment = np.zeros((n_rows, row_length), np.int32)
    prefix = np.zeros((n_rows, row_length), np.int32)
    at = np.zeros(n_rows, np.int64)
    slots: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for u, (r, unit) in enumerate(units):
        base = r * row_length
        n_pre = len(unit.shared)
        if n_pre:
            first = unit.episodes[0]
            sl = slice(at[r], at[r] + n_pre)
            index[r, sl] = first * T + unit.shared
            segment[r, sl] = B + 1 + u
            pre_slots = base + np.arange(at[r], at[r] + n_pre)
            at[r] += n_pre
        for b in unit.episodes:
            cols = real[b][n_pre:]
            sl = slice(at[r], at[r] + len(cols))
            index[r, sl] = b * T + cols
            segment[r, sl] = b + 1
            if n_pre:
                prefix[r, sl] = B + 1 + u
            own = base + np.arange(at[r], at[r] + len(cols))
            slots[b] = (real[b], np.concatenate([pre_slots, own]) if n_pre else own)
            at[r] += len(cols)
    return index, segment, prefix, slots


def plan(attention_mask: np.ndarray, rows: int, row_length: int = 0, num_minibatches: int = 1,
         ppo_epochs: int = 1, seed: int = 0, tokens: np.ndarray | None = None,
         group: np.ndarray | None = None, prompt_length: int = 0) -> Layout:
    """The packing of one batch (numpy arrays; place them with `Placement` or pass to jit).

    attention_mask [B, T]: real tokens (an episode's need not be contiguous; they keep their
    order). rows: rows per micro-batch. row_length: tokens per packed row, 0 for one episode per
    row of T tokens. B / num_minibatches episodes per mini-batch (the caller checks it divides).
    With tokens [B, T], group [B] and prompt_length (the prompt's columns come first), a
    packed row holds a GRPO group's prompt once for several of its episodes: all but the
    prompt's last token are shared (each episode keeps that one, whose logits predict its
    first response token), and those episodes attend to the shared part as to their own.
    """
    mask = np.asarray(attention_mask).astype(bool)
    B, T = mask.shape
    real = [np.flatnonzero(m).astype(np.int32) for m in mask]
    lengths = np.array([len(r) for r in real])
    packed = row_length > 0
    L = row_length if packed else T
    if packed and lengths.max(initial=0) > L:
        b = int(lengths.argmax())
        raise ValueError(f"episode {b} has {lengths[b]} tokens, more than the packed row length "
                         f"{L} (pack_length): raise it to at least the longest episode")
    shared: dict[int, np.ndarray] = {}
    if packed and tokens is not None and group is not None and prompt_length > 1:
        tokens = np.asarray(tokens)
        for g in np.unique(group):
            eps = np.flatnonzero(group == g)
            pre = real[eps[0]][real[eps[0]] < prompt_length][:-1]
            same = all(np.array_equal(real[b][:len(pre)], pre)
                       and np.array_equal(tokens[b, pre], tokens[eps[0], pre]) for b in eps)
            if same and len(pre):
                shared.update({int(b): pre for b in eps})

    def micro_batches(episodes: np.ndarray, max_micro: int):
        if packed:
            units = _units(real, episodes, shared, group, L)
        else:
            units = [(i, _Unit(np.zeros(0, np.int32), [int(b)])) for i, b in enumerate(episodes)]
        n_rows = max((r for r, _ in units), default=-1) + 1
        index, segment, prefix, slots = _place(real, units, max_micro * rows, L, T, B)
        shape = (max_micro, rows, L)
        return (index.reshape(shape), segment.reshape(shape), prefix.reshape(shape),
                -(-n_rows // rows), slots)

    # Worst case: every episode alone in a row (a shared unit is never longer than that).
    m_score = -(-B // rows)
    score_index, score_segment, score_prefix, score_used, slots = micro_batches(np.arange(B),
                                                                                m_score)
    unpack = np.zeros((B, T), np.int32)
    for b, (cols, where) in slots.items():
        unpack[b, cols] = where

    per_mini = B // num_minibatches
    m_mini = -(-per_mini // rows)
    rng = np.random.default_rng(seed)
    u_index = np.zeros((ppo_epochs, num_minibatches, m_mini, rows, L), np.int32)
    u_segment = np.zeros_like(u_index)
    u_prefix = np.zeros_like(u_index)
    u_used = np.zeros((ppo_epochs, num_minibatches), np.int32)
    for e in range(ppo_epochs):
        if num_minibatches == 1:  # every epoch's one mini-batch is the whole batch, as scored
            u_index[e, 0], u_segment[e, 0] = score_index, score_segment
            u_prefix[e, 0], u_used[e, 0] = score_prefix, score_used
            continue
        perm = rng.permutation(B)
        for n in range(num_minibatches):
            (u_index[e, n], u_segment[e, n], u_prefix[e, n], u_used[e, n],
             _) = micro_batches(np.sort(perm[n * per_mini:(n + 1) * per_mini]), m_mini)
    return Layout(score_index, score_segment, score_prefix, np.int32(score_used), unpack,
                  u_index, u_segment, u_prefix, u_used)


def padding_fraction(layout: Layout) -> float:
    """Share of the token slots the score pass runs that hold no token."""
    used = int(layout.score_used)
    seg = np.asarray(layout.score_segment)[:used]
    return float((seg == 0).mean()) if seg.size else 0.0


def gather(x: Array, index: Array, segment: Array) -> Array:
    """Packed slots of x [B, T, ...] at index [..., L] (flat b * T + t); padding slots read 0."""
    flat = x.reshape(-1, *x.shape[2:])
    out = jnp.take(flat, index, axis=0)
    valid = (segment > 0).reshape(segment.shape + (1,) * (x.ndim - 2))
    return jnp.where(valid, out, jnp.zeros((), x.dtype))


def unpack(packed: Array, layout: Layout) -> Array:
    """[M, R, L] packed values back to the batch's [B, T] (padding slots of the batch read the
    value of packed slot 0; every consumer masks them)."""
    return jnp.take(packed.reshape(-1), layout.unpack_index, axis=0)
