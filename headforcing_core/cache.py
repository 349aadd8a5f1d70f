"""The head-wise KV cache: one store per head *type*, spanning every layer, all in one K/V arena.

Every head of a type keeps the same frames (the rules depend on frame indices; see
:mod:`headforcing_core.retention`), so a type's heads — across all layers — share one
bookkeeping (a :class:`~headforcing_core.retention.Tracker` and a page table) and one set
of buffers, indexed by ``(layer, head)`` pairs in layer order:

* :class:`FramePool` — whole frames, K and V ``[B, N, pages, tokens, D]``; a page per held
  frame (sinks, recent, strided / cyclic frames are the same page when they are the same
  frame).
* :class:`BlockPool` — Pyramid Forcing's merged blocks (pooled tokens) and the running sum
  of the block being filled.
* :class:`EpisodicMemory` — Head Forcing's memory heads: pooled episodes with their
  bookkeeping *on the device*; every decision (join the newest episode, open one, merge the
  two most similar neighbours) is taken per batch row and per layer with tensor ops, so a
  commit never synchronises with the host and batch rows are independent.

Every type has a frame pool; a rule whose middle needs a tier of its own gets it from
:data:`MIDDLE_TIERS`, keyed by the middle's ``kind``.

**One arena.** All of a cache's K and V live in one buffer ``kv [2, B, rows, D]`` (K then V);
every store is a view of it, each head a contiguous run of rows (its frame pages, then its
merged blocks or episode slots). So one index op gathers any set of keys *and* their values
for a layer (the plan's per-layer gather, :mod:`headforcing_core.plan`).

**Keys are stored rotated at their own time.** A frame's keys are rotated (RoPE) at its own
frame index and token positions — what Self Forcing keeps; a merged block's at its own time
and pooled positions; an episode's at its pooled positions only (its time is decided when it
is read). Attention therefore re-rotates only the keys a policy re-times (sinks, Pyramid
Forcing's anchors, episodes), by the difference of times. Pooling (blocks, episodes) works
on raw keys: a frame is un-rotated first.

**Memory is fixed by the policy**, not the video length (except ``full``'s all-frames pool).
A pool read in place by attention (``prerotated``: ``absolute`` RoPE, one type, no middle)
also holds the current chunk, written by every model call. Otherwise the chunk lives in the
plan's scratch and its clean pass writes the frames the commit keeps into the pages of the
frames it evicts, layer by layer after that layer's attention (:meth:`HeadwiseKVCache.reserve`
decides the pages before the chunk): the pool holds no chunk headroom (only the episodic
memory keeps the pages of the frames it will fold in, read after the pass).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .errors import StateError
from .policies import Episodic, Merge, Rule
from .retention import Commit, Tracker, make_tracker, pages_at_commit
from .rope import pool_tokens, pooled_grid, rotate_entries, spatial_positions

KEY_FORMAT = "rotated"  # how an AR_STATE's cache stores keys (see the module docstring)
COMMIT_SLICE_BYTES = 64 * 2**20  # the most of a frame (as float32) a commit un-rotates and pools at once


def _head_slices(x: torch.Tensor) -> list[slice | None]:
    """Slices of the heads (dim 1) of ``x`` ``[B, N, ...]``, each within :data:`COMMIT_SLICE_BYTES` as float32;
    ``[None]`` when all of them fit (no slicing at all)."""
    per_head = max(1, x.numel() // max(1, x.shape[1]) * 4)
    n = x.shape[1]
    step = max(1, min(n, COMMIT_SLICE_BYTES // per_head))
    if step >= n:
        return [None]
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _heads_of(x: torch.Tensor, heads: slice | None) -> torch.Tensor:
    """``x[:, heads]``, or ``x`` itself for all heads (no op dispatched)."""
    return x if heads is None else x[:, heads]


class FramePool:
    """Whole frames of one head type: ``k``/``v`` ``[B, N, pages, tokens, D]`` (views of the arena) and the
    page of each frame. ``pending``: pages decided for the frames of the chunk being made (committed by
    :meth:`HeadwiseKVCache.commit`)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.page_of: dict[int, int] = {}
        self.free: list[int] = list(range(k.shape[2]))
        self.pending: dict[int, int] = {}

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, frames: list[int]) -> list[int]:
        """Pages for new frames, lowest free first (so pages fill in order while the video is short)."""
        if len(self.free) < len(frames):
            raise RuntimeError(f"frame pool full: {len(self.free)} free pages for {len(frames)} frames")
        self.free.sort()
        pages = [self.free.pop(0) for _ in frames]
        for f, p in zip(frames, pages):
            self.page_of[f] = p
        return pages

    def plan_pages(self, frames: list[int], reusable: set[int]) -> dict[int, int]:
        """Pages for the chunk's ``frames`` that a commit keeps: free pages first (lowest first), then the
        pages of ``reusable`` held frames (evicted by this commit, unread after its clean pass)."""
        candidates = sorted(self.free) + sorted(self.page_of[f] for f in reusable)
        if len(candidates) < len(frames):
            raise RuntimeError(f"frame pool full: {len(candidates)} pages for {len(frames)} frames")
        self.pending = dict(zip(frames, candidates))
        return self.pending

    def adopt_pending(self) -> None:
        """The chunk's frames take their planned pages (a reused page is briefly shared with the evicted frame
        it held, until :meth:`release`)."""
        taken = set(self.pending.values())
        self.page_of.update(self.pending)
        self.free = [p for p in self.free if p not in taken]
        self.pending = {}

    def release(self, keep: set[int]) -> None:
        for f in [f for f in self.page_of if f not in keep]:
            page = self.page_of.pop(f)
            if page not in self.page_of.values():
                self.free.append(page)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class BlockPool:
    """Merged blocks of one head type (pooled tokens; views of the arena) and the running sum of the block
    being filled (raw keys, float32)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        batch, heads, capacity, tokens, head_dim = k.shape
        acc = (batch, heads, tokens, head_dim)
        self.acc_k = torch.zeros(acc, dtype=torch.float32 if k.dtype != torch.float64 else k.dtype, device=k.device)
        self.acc_v = torch.zeros_like(self.acc_k)
        self.acc_frames = 0
        self.page_of: dict[int, int] = {}
        self.free: list[int] = list(range(capacity))

    @property
    def nbytes(self) -> int:
        return 2 * (self.k.numel() * self.k.element_size() + self.acc_k.numel() * self.acc_k.element_size())


class EpisodicMemory:
    """Pooled episodes of one head type with device-side bookkeeping per (batch row, layer).

    ``k``/``v`` ``[B, N, slots, tokens, D]`` (views of the arena; keys rotated at their pooled token
    positions, not in time: an episode's time is decided when it is read); ``sig`` ``[B, N, slots, D]``
    (float32 running mean of each head's mean raw key); per ``[B, layers, slots]``: ``valid``, ``first`` /
    ``last`` frame, ``count``. Episodes are contiguous runs of evicted frames, so ``(first, last)`` says
    which frames an episode holds and its time is their mean. A running mean of keys rotated at the same
    positions is the rotation of the running mean, so episodes merge as raw keys would.
    """

    def __init__(self, rule, k: torch.Tensor, v: torch.Tensor, layer_of_head: list[int], layers: int,
                 pooled_grid_hw: tuple[int, int]):
        self.cap, self.pool, self.similarity = rule.cap, rule.pool, float(rule.similarity)
        batch, heads, slots, tokens, head_dim = k.shape  # slots: cap + 1, a new episode opens before a merge
        device = k.device
        self.k, self.v = k, v
        self.sig = torch.zeros(batch, heads, slots, head_dim, dtype=torch.float32, device=device)
        self.valid = torch.zeros(batch, layers, slots, dtype=torch.bool, device=device)
        self.first = torch.zeros(batch, layers, slots, dtype=torch.int64, device=device)
        self.last = torch.zeros_like(self.first)
        self.count = torch.zeros(batch, layers, slots, dtype=torch.float64, device=device)
        self.layer_of_head = torch.tensor(layer_of_head, dtype=torch.int64, device=device)
        self.layers = layers
        self.positions = pooled_grid_hw  # the pooled token grid (h, w)

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v)) + self.bookkeeping_bytes

    @property
    def bookkeeping_bytes(self) -> int:
        """What the memory holds besides its K/V (which live in the cache's arena)."""
        return sum(t.numel() * t.element_size() for t in (self.sig, self.valid, self.first, self.last, self.count,
                                                            self.layer_of_head))

    # ---- helpers over (batch, layer) ------------------------------------------------------
    def _per_layer(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``[B, N, ...]`` over the heads of each layer → ``[B, layers, ...]``."""
        out = x.new_zeros((x.shape[0], self.layers) + tuple(x.shape[2:]))
        return out.index_add_(1, self.layer_of_head, x)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """Broadcast ``[B, layers, ...]`` to ``[B, N, ...]``."""
        return x.index_select(1, self.layer_of_head)

    def _cosine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity per (row, layer) of the concatenated per-head vectors ``[B, N, ..., D]``."""
        dot = self._per_layer((a * b).sum(-1))
        na = self._per_layer((a * a).sum(-1))
        nb = self._per_layer((b * b).sum(-1))
        return dot / torch.clamp(torch.sqrt(na * nb), min=1e-12)

    def _slot_index(self, x: torch.Tensor, slot: torch.Tensor, heads: slice | None) -> torch.Tensor:
        idx = _heads_of(self._heads(slot), heads)
        return idx.view(idx.shape + (1,) * (x.dim() - 2)).expand((-1, -1, 1) + tuple(x.shape[3:]))

    def _gather_slots(self, x: torch.Tensor, slot: torch.Tensor, heads: slice | None = None) -> torch.Tensor:
        """``x[b, n, slot[b, layer(n)]]`` for ``x`` ``[B, N, slots, ...]`` and ``slot`` ``[B, layers]`` (the heads
        ``heads`` only, when given)."""
        part = _heads_of(x, heads)
        return part.gather(2, self._slot_index(x, slot, heads)).squeeze(2)

    def _scatter_slots(self, x: torch.Tensor, slot: torch.Tensor, value: torch.Tensor,
                       heads: slice | None = None) -> None:
        part = _heads_of(x, heads)
        part.scatter_(2, self._slot_index(x, slot, heads), value.unsqueeze(2).to(x.dtype))

    def time_order(self) -> torch.Tensor:
        """Slots of every (row, layer) sorted by time, valid episodes first: ``[B, layers, slots]``."""
        big = torch.iinfo(torch.int64).max
        return torch.argsort(torch.where(self.valid, self.first, big), dim=-1, stable=True)

    def times(self) -> torch.Tensor:
        """Each slot's time (the mean of its frames), ``[B, layers, slots]`` float64."""
        return (self.first + self.last).to(torch.float64) / 2

    # ---- one evicted frame ---------------------------------------------------------------
    def accept(self, pk: torch.Tensor, pv: torch.Tensor, sig: torch.Tensor, frame: int, opens: bool) -> None:
        """Fold one evicted frame into every (row, layer)'s memory: ``pk`` / ``pv`` ``[B, N, pooled tokens, D]``
        its keys pooled (stored rotated at the pooled positions) and values, ``sig`` ``[B, N, D]`` each head's
        mean raw key (:meth:`HeadwiseKVCache.pooled_frame`)."""
        n_valid = self.valid.sum(-1)  # [B, L]
        order = self.time_order()
        newest = order.gather(-1, torch.clamp(n_valid - 1, min=0).unsqueeze(-1)).squeeze(-1)
        similar = self._cosine(sig, self._gather_slots(self.sig, newest)) >= self.similarity
        join = (n_valid > 0) & similar if not opens else torch.zeros_like(similar)
        free = torch.argmax((~self.valid).to(torch.int8), dim=-1)
        target = torch.where(join, newest, free)
        count = self.count.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        w_old = torch.where(join, count / (count + 1), torch.zeros_like(count))  # [B, L] float64
        new = {"k": pk, "v": pv, "sig": sig}
        self._fold(target, lambda name, heads: _heads_of(new[name], heads), w_old)
        first = torch.where(join, self.first.gather(-1, target.unsqueeze(-1)).squeeze(-1),
                            torch.full_like(target, frame))
        self._set(target, first=first, last=torch.full_like(target, frame), count=count * join + 1)
        self._merge_when_full()

    def _fold(self, target, new, w_old) -> None:
        """Running mean of the target slots with new values at weight ``1 - w_old``; ``new(store, heads)``
        gives them for a slice of heads (the fold goes a slice at a time: bounded temporaries)."""
        w_all = self._heads(w_old)  # [B, N]
        for name in ("k", "v", "sig"):
            store = getattr(self, name)
            for heads in _head_slices(store):
                old = self._gather_slots(store, target, heads)
                w_h = _heads_of(w_all, heads)
                w = w_h.view(w_h.shape + (1,) * (old.dim() - 2)).to(torch.float32 if store.dtype != torch.float64
                                                                      else torch.float64)
                mixed = old.to(w.dtype) * w + new(name, heads).to(w.dtype) * (1 - w)
                del old
                self._scatter_slots(store, target, mixed, heads)

    def _set(self, slot, *, first, last, count) -> None:
        i = slot.unsqueeze(-1)
        self.first.scatter_(-1, i, first.unsqueeze(-1))
        self.last.scatter_(-1, i, last.unsqueeze(-1))
        self.count.scatter_(-1, i, count.unsqueeze(-1).to(self.count.dtype))
        self.valid.scatter_(-1, i, torch.ones_like(i, dtype=torch.bool))

    def _merge_when_full(self) -> None:
        """Where a (row, layer) holds more than ``cap`` episodes, merge its two most similar neighbours."""
        need = self.valid.sum(-1) > self.cap  # [B, L]
        order = self.time_order()
        sig_sorted = self.sig.gather(2, self._heads(order)[..., None].expand(-1, -1, -1, self.sig.shape[-1]))
        sims = self._cosine(sig_sorted[:, :, :-1], sig_sorted[:, :, 1:])  # [B, L, slots-1]
        pair_ok = torch.arange(self.slots - 1, device=sims.device) + 1 < self.valid.sum(-1, keepdim=True)
        best = torch.argmax(torch.where(pair_ok, sims, torch.full_like(sims, -torch.inf)), dim=-1)
        a = order.gather(-1, best.unsqueeze(-1)).squeeze(-1)
        b = order.gather(-1, (best + 1).unsqueeze(-1)).squeeze(-1)
        ca = self.count.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        cb = self.count.gather(-1, b.unsqueeze(-1)).squeeze(-1)
        w_old = torch.where(need, ca / (ca + cb), torch.ones_like(ca))  # rows that need no merge keep a as it is
        self._fold(a, lambda name, heads: self._gather_slots(getattr(self, name), b, heads), w_old)
        first = self.first.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        last_b = self.last.gather(-1, b.unsqueeze(-1)).squeeze(-1)
        last_a = self.last.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        self._set(a, first=first, last=torch.where(need, last_b, last_a), count=torch.where(need, ca + cb, ca))
        keep_b = self.valid.gather(-1, b.unsqueeze(-1)) & ~need.unsqueeze(-1)
        self.valid.scatter_(-1, b.unsqueeze(-1), keep_b)

    def episodes(self, batch_row: int = 0) -> list[list[tuple[int, ...]]]:
        """Per layer (with heads of this type): the frames of each episode in time order (host; for tests)."""
        valid, first, last = (t[batch_row].cpu() for t in (self.valid, self.first, self.last))
        out = []
        for layer in range(self.layers):
            eps = sorted((int(first[layer, s]), int(last[layer, s])) for s in range(self.slots) if valid[layer, s])
            out.append([tuple(range(a, b + 1)) for a, b in eps])
        return out


@dataclass
class TypeStore:
    """Everything one head type keeps: its tracker, its heads, its buffers, and where its heads sit in the
    arena (``base``: first row; ``head_rows``: rows per head)."""

    head_type: str
    rule: Rule
    tracker: Tracker
    heads: list[tuple[int, int]]  # (layer, head) in layer order
    frames: FramePool
    blocks: BlockPool | None = None
    episodes: EpisodicMemory | None = None
    base: int = 0
    head_rows: int = 0
    block_offset: int = 0  # rows into a head's run where its merged blocks start
    episode_offset: int = 0

    @property
    def nbytes(self) -> int:
        return self.frames.nbytes + (self.blocks.nbytes if self.blocks else 0) + (
            self.episodes.nbytes if self.episodes else 0)


@dataclass(frozen=True)
class _Layout:
    """Rows of one type in the arena: ``heads`` runs of ``frame_pages·tokens + block_pages·block_tokens +
    episode_slots·episode_tokens`` rows."""

    heads: int
    frame_pages: int
    block_pages: int = 0
    block_tokens: int = 0
    episode_slots: int = 0
    episode_tokens: int = 0

    def head_rows(self, tokens: int) -> int:
        return self.frame_pages * tokens + self.block_pages * self.block_tokens + self.episode_slots * self.episode_tokens


def _merged_blocks(cache: "HeadwiseKVCache", middle: Merge, tracker: Tracker, layout: _Layout,
                   views, heads: list[tuple[int, int]]) -> dict:
    return {"blocks": BlockPool(*views(layout.block_pages, layout.block_tokens))}


def _episodes(cache: "HeadwiseKVCache", middle: Episodic, tracker: Tracker, layout: _Layout, views,
              heads: list[tuple[int, int]]) -> dict:
    layers = sorted({li for li, _ in heads})
    slot = {li: i for i, li in enumerate(layers)}
    k, v = views(layout.episode_slots, layout.episode_tokens)
    episodes = EpisodicMemory(middle, k, v, [slot[li] for li, _ in heads], len(layers),
                              pooled_grid(*cache.grid, middle.pool))
    episodes.layer_ids = layers  # type: ignore[attr-defined]
    return {"episodes": episodes}


# the device tier a middle needs besides the frame pool, by the middle's ``kind`` (Stride / Cyclic keep
# whole frames, in the frame pool): a builder returning the :class:`TypeStore` fields it fills
MIDDLE_TIERS = {"Merge": _merged_blocks, "Episodic": _episodes}


def type_layout(rule: Rule, tracker: Tracker, heads: int, grid: tuple[int, int], frames_per_block: int,
                total_frames: int, in_place: bool) -> _Layout:
    """How many pages, blocks and episode slots one head of a type holds (what the cache allocates and
    what an AR_STATE's tensors must be)."""
    pages = tracker.frame_capacity(frames_per_block, total_frames, in_place)
    middle = rule.middle
    if isinstance(middle, Merge):
        ph, pw = pooled_grid(*grid, middle.patch)
        return _Layout(heads, pages, block_pages=tracker.block_capacity(), block_tokens=ph * pw)
    if isinstance(middle, Episodic):
        ph, pw = pooled_grid(*grid, middle.pool)
        return _Layout(heads, pages, episode_slots=middle.cap + 1, episode_tokens=ph * pw)
    return _Layout(heads, pages)


class HeadwiseKVCache:
    """Per-type stores for a policy's head types over all layers, in one K/V arena (module docstring).

    ``prerotated``: attention reads the frame pool in place (one type, no middle, ``absolute`` RoPE): the
    pool also holds the current chunk, written by every model call. Otherwise the plan gathers what each
    layer attends into a scratch buffer and the clean pass writes the kept frames into the pages
    :meth:`reserve` planned.
    """

    def __init__(self, head_types: tuple[tuple[str, ...], ...], rules: dict[str, Rule], *, batch: int,
                 grid: tuple[int, int], head_dim: int, frames_per_block: int, total_frames: int,
                 dtype: torch.dtype, device: torch.device, prerotated: bool = False):
        self.num_layers = len(head_types)
        self.num_heads = len(head_types[0])
        self.head_types = head_types
        self.grid = grid
        self.tokens = grid[0] * grid[1]
        self.head_dim = head_dim
        self.frames_per_block = frames_per_block
        self.total_frames = total_frames
        self.batch = batch
        self.dtype = dtype
        self.device = torch.device(device)
        self.prerotated = prerotated
        order = [t for t in rules if any(t in row for row in head_types)]
        heads_of = {t: [(li, hi) for li, row in enumerate(head_types) for hi, x in enumerate(row) if x == t]
                    for t in order}
        trackers = {t: make_tracker(rules[t], frames_per_block) for t in order}
        layouts = {t: type_layout(rules[t], trackers[t], len(heads_of[t]), grid, frames_per_block, total_frames,
                                  prerotated) for t in order}
        rows = sum(lay.heads * lay.head_rows(self.tokens) for lay in layouts.values())
        self.kv = torch.zeros(2, batch, rows, head_dim, dtype=dtype, device=self.device)  # K then V
        self.kv_flat = self.kv.view(2, batch * rows, head_dim)
        self.rows = rows
        self.types: list[TypeStore] = []
        base = 0
        for t in order:
            self.types.append(self._make_store(t, rules[t], trackers[t], heads_of[t], layouts[t], base))
            base += layouts[t].heads * layouts[t].head_rows(self.tokens)
        # where each (layer, head) lives: (type index, index among that type's heads)
        self.slot_of: dict[tuple[int, int], tuple[int, int]] = {}
        for ti, ts in enumerate(self.types):
            for n, lh in enumerate(ts.heads):
                self.slot_of[lh] = (ti, n)
        self._native = spatial_positions(*grid)

    def _make_store(self, head_type: str, rule: Rule, tracker: Tracker, heads: list[tuple[int, int]],
                    layout: _Layout, base: int) -> TypeStore:
        n, per_head = layout.heads, layout.head_rows(self.tokens)
        runs = self.kv[:, :, base:base + n * per_head].unflatten(2, (n, per_head))  # [2, B, N, rows, D]
        offset = [0]

        def views(entries: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
            part = runs[:, :, :, offset[0]:offset[0] + entries * tokens].unflatten(3, (entries, tokens))
            offset[0] += entries * tokens
            return part[0], part[1]  # [B, N, entries, tokens, D] each

        frames = FramePool(*views(layout.frame_pages, self.tokens))
        block_offset = episode_offset = offset[0]
        tier = MIDDLE_TIERS.get(rule.middle.kind) if rule.middle is not None else None
        extra = tier(self, rule.middle, tracker, layout, views, heads) if tier is not None else {}
        return TypeStore(head_type, rule, tracker, heads, frames, base=base, head_rows=per_head,
                         block_offset=block_offset, episode_offset=episode_offset, **extra)

    # ---- bookkeeping ----------------------------------------------------------------------
    def reserve(self, start: int, frames: int) -> dict[str, dict[int, int]]:
        """Decide, before the chunk ``[start, start + frames)`` runs, where its frames go; returns
        ``{head type: {frame: page}}``. A pool read in place gets pages for every frame of the chunk now (every
        model call writes them). Otherwise only the frames the commit keeps (or reads after the pass) get
        pages — free ones, or those of the frames this commit evicts — and the clean pass writes them there."""
        out = {}
        for ts in self.types:
            chunk = list(range(start, start + frames))
            if self.prerotated:
                out[ts.head_type] = dict(zip(chunk, ts.frames.reserve(chunk)))
                continue
            effects = copy.deepcopy(ts.tracker).commit(start, frames)  # the tracker's commit, previewed
            needed = pages_at_commit(effects)
            written = [f for f in effects.new_frames if f in needed]
            reusable = {f for f in ts.frames.page_of if f not in needed}
            out[ts.head_type] = ts.frames.plan_pages(written, reusable)
        return out

    def on_prompt_switch(self, first_frame: int) -> None:
        for ts in self.types:
            ts.tracker.on_prompt_switch(first_frame)

    def move_sinks(self, frames: list[int]) -> None:
        """Make ``frames`` the sink of every type with sink frames (LongLive's recache without a global sink:
        the recached window's first frames become the sink). Their K/V are written by :meth:`replace_frames`."""
        for ts in self.types:
            sinks = ts.tracker.move_sinks(frames)
            if sinks is None:
                continue
            ts.frames.release(ts.tracker.stored_frames())
            ts.frames.reserve([f for f in sinks if f not in ts.frames.page_of])

    # ---- committing ------------------------------------------------------------------------
    def commit(self, start: int, frames: int, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        """After the clean pass, whose K/V are already in the pages :meth:`reserve` decided (written by the
        pass), let every type's rule update its stores: merged blocks, episodes, pages released.

        ``k`` / ``v`` (``[layers, B, frames·tokens, heads, D]``, raw keys) write the chunk's K/V here
        instead (synthetic caches: benchmarks, tests); :meth:`reserve` is then made here if it was not."""
        if k is not None and not any(ts.frames.pending or start in ts.frames.page_of for ts in self.types):
            self.reserve(start, frames)
        for ts in self.types:
            effects: Commit = ts.tracker.commit(start, frames)
            ts.frames.adopt_pending()
            written = [f for f in effects.new_frames if f in ts.frames.page_of]
            if k is not None:
                self._write_frames(ts, written, start, k, v)
            if ts.blocks is not None and effects.merge_frames:
                self._merge(ts, effects)
            if ts.episodes is not None:
                ep = ts.episodes
                for frame, opens in effects.to_episodes:
                    pk, pv, sig = self.pooled_frame(ts, frame, ep.pool, spatial_positions(*self.grid, ep.pool,
                                                                                           "centroid"))
                    ep.accept(pk, pv, sig, frame, opens)
            ts.frames.release(effects.keep_frames)

    def raw_frame(self, head_type: str, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A held frame's raw (un-rotated) keys and its values, ``[B, N, tokens, D]`` (for inspection)."""
        ts = self.store(head_type)
        page = ts.frames.page_of[frame]
        k = rotate_entries(ts.frames.k[:, :, page].unsqueeze(2), float(frame), self._native, inverse=True)
        return k.squeeze(2), ts.frames.v[:, :, page]

    def pooled_frame(self, ts: TypeStore, frame: int, pool: int, placed: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A held frame pooled ``pool×pool``: its keys un-rotated to raw keys and pooled — rotated again at
        ``placed`` pooled positions (time 0) when given —, its values pooled, and with ``placed`` each head's
        mean raw pooled key ``[B, N, D]`` (float32; the episodic memory's signature). ``[B, N, pooled tokens,
        D]`` each, made a slice of heads at a time so the temporaries stay within :data:`COMMIT_SLICE_BYTES`."""
        page = ts.frames.page_of[frame]
        k, v = ts.frames.k[:, :, page], ts.frames.v[:, :, page]  # [B, N, T, D]
        b, n, _, d = k.shape
        ph, pw = pooled_grid(*self.grid, pool)
        slices = _head_slices(k)
        if slices != [None]:  # the outputs, filled a slice at a time
            out_k = k.new_empty(b, n, ph * pw, d)
            out_v = v.new_empty(b, n, ph * pw, d)
            sig = torch.empty(b, n, d, dtype=torch.float32, device=k.device) if placed is not None else None
        for heads in slices:
            raw = rotate_entries(_heads_of(k, heads).unsqueeze(2), float(frame), self._native, inverse=True).squeeze(2)
            pk = pool_tokens(raw, *self.grid, pool)
            del raw
            mean = pk.float().mean(dim=2) if placed is not None else None
            if placed is not None:
                pk = rotate_entries(pk.unsqueeze(2), 0.0, placed).squeeze(2)
            pv = pool_tokens(_heads_of(v, heads), *self.grid, pool)
            if heads is None:
                return pk, pv, mean
            out_k[:, heads], out_v[:, heads] = pk, pv
            if sig is not None:
                sig[:, heads] = mean
        return out_k, out_v, sig

    def _type_heads(self, ts: TypeStore, x: torch.Tensor) -> torch.Tensor:
        """``[layers, B, S, heads, D]`` → ``[B, N, S, D]`` for the (layer, head) pairs of ``ts``."""
        idx = getattr(ts, "_flat_heads", None)
        if idx is None:
            idx = torch.tensor([li * self.num_heads + hi for li, hi in ts.heads], device=x.device)
            ts._flat_heads = idx  # type: ignore[attr-defined]
        flat = x.permute(1, 0, 3, 2, 4).reshape(x.shape[1], -1, x.shape[2], x.shape[4])
        return flat.index_select(1, idx)

    def _write_frames(self, ts: TypeStore, written: list[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the raw K/V of chunk frames ``written`` (rotated at their own time)."""
        if not written:
            return
        page_idx = torch.tensor([ts.frames.page_of[f] for f in written], device=self.device)
        sel = torch.tensor([f - start for f in written], device=self.device)
        frames = k.shape[2] // self.tokens
        src_k = self._type_heads(ts, k).unflatten(2, (frames, self.tokens)).index_select(2, sel)
        src_k = rotate_entries(src_k, torch.tensor([float(f) for f in written], dtype=torch.float64), self._native)
        src_v = self._type_heads(ts, v).unflatten(2, (frames, self.tokens)).index_select(2, sel)
        ts.frames.k.index_copy_(2, page_idx, src_k.to(self.dtype))
        ts.frames.v.index_copy_(2, page_idx, src_v.to(self.dtype))

    def _merge(self, ts: TypeStore, effects: Commit) -> None:
        """Accumulate the committed frames (raw) into their aligned blocks; store completed blocks rotated at
        their own time and pooled positions."""
        bp, rule = ts.blocks, ts.rule.middle
        n = rule.block_frames
        for frame in effects.merge_frames:
            pk, pv, _ = self.pooled_frame(ts, frame, rule.patch)
            if bp.acc_frames == 0:
                bp.acc_k.copy_(pk)
                bp.acc_v.copy_(pv)
            else:
                bp.acc_k.add_(pk)
                bp.acc_v.add_(pv)
            bp.acc_frames += 1
            if bp.acc_frames == n:
                block = frame // n
                for b in [b for b in bp.page_of if b not in effects.keep_blocks]:
                    bp.free.append(bp.page_of.pop(b))
                bp.free.sort()
                page_b = bp.free.pop(0)
                bp.page_of[block] = page_b
                first = block * n
                own = float((first + first + n - 1) // 2)  # the block's own time (retention.Key of a block)
                placed = spatial_positions(*self.grid, rule.patch, "top_left")
                kb = rotate_entries((bp.acc_k / n).unsqueeze(2), own, placed)
                bp.k[:, :, page_b].copy_(kb.squeeze(2))
                bp.v[:, :, page_b].copy_(bp.acc_v / n)
                bp.acc_frames = 0
        for b in [b for b in bp.page_of if b not in effects.keep_blocks]:
            bp.free.append(bp.page_of.pop(b))

    def held_whole(self, start: int, frames: int) -> int:
        """(layer, head group, frame) entries of frames ``start…`` held whole (what a recache rewrites)."""
        return sum(sum(1 for j in range(frames) if start + j in ts.frames.page_of) * len({li for li, _ in ts.heads})
                   for ts in self.types)

    def replace_frames(self, start: int, frames: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Overwrite the stored K/V of frames ``start…`` wherever they are held whole (recache).

        ``k``/``v``: ``[layers, B, frames·tokens, heads, D]`` as the pool stores them (keys rotated at their own
        time). Returns how many (layer, head group, frame) entries were replaced."""
        n = 0
        for ts in self.types:
            held = [(j, ts.frames.page_of[start + j]) for j in range(frames) if start + j in ts.frames.page_of]
            if not held:
                continue
            page_idx = torch.tensor([p for _, p in held], device=self.device)
            sel = torch.tensor([j for j, _ in held], device=self.device)
            for store, x in ((ts.frames.k, k), (ts.frames.v, v)):
                src = self._type_heads(ts, x).unflatten(2, (frames, self.tokens)).index_select(2, sel)
                store.index_copy_(2, page_idx, src.to(store.dtype))
            n += len(held) * len({li for li, _ in ts.heads})
        return n

    # ---- sizes and snapshots ---------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes the cache holds on its device: the arena and each tier's own buffers (running sums,
        episode signatures and bookkeeping)."""
        extra = 0
        for ts in self.types:
            if ts.blocks is not None:
                extra += 2 * ts.blocks.acc_k.numel() * ts.blocks.acc_k.element_size()
            if ts.episodes is not None:
                extra += ts.episodes.bookkeeping_bytes
        return self.kv.numel() * self.kv.element_size() + extra

    def store(self, head_type: str) -> TypeStore:
        for ts in self.types:
            if ts.head_type == head_type:
                return ts
        raise KeyError(head_type)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(CPU copies of every buffer, JSON-able bookkeeping). Independent of this cache."""
        tensors: dict[str, torch.Tensor] = {}

        def put(name, t):
            tensors[name] = t.detach().to("cpu", copy=True).contiguous()

        types = []
        for ti, ts in enumerate(self.types):
            p = f"cache.{ts.head_type}"
            put(p + ".frames.k", ts.frames.k)
            put(p + ".frames.v", ts.frames.v)
            meta = {"head_type": ts.head_type, "heads": [list(h) for h in ts.heads], "tracker": ts.tracker.state(),
                    "frame_pages": {str(f): p_ for f, p_ in ts.frames.page_of.items()}}
            if ts.blocks is not None:
                for name in ("k", "v", "acc_k", "acc_v"):
                    put(f"{p}.blocks.{name}", getattr(ts.blocks, name))
                meta["block_pages"] = {str(b): p_ for b, p_ in ts.blocks.page_of.items()}
                meta["acc_frames"] = ts.blocks.acc_frames
            if ts.episodes is not None:
                for name in ("k", "v", "sig", "valid", "first", "last", "count"):
                    put(f"{p}.episodes.{name}", getattr(ts.episodes, name))
            types.append(meta)
        meta = {"grid": list(self.grid), "head_dim": self.head_dim, "frames_per_block": self.frames_per_block,
                "total_frames": self.total_frames, "prerotated": self.prerotated, "keys": KEY_FORMAT,
                "types": types}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Copy a :meth:`state_dict` into this (fresh) cache, built for the same policy, batch and size."""
        if list(meta["grid"]) != list(self.grid) or int(meta["head_dim"]) != self.head_dim:
            raise StateError(f"the saved cache is for a {tuple(meta['grid'])} token grid with {meta['head_dim']}-wide "
                             f"heads; this run has {self.grid} and {self.head_dim}")
        if bool(meta.get("prerotated", False)) != self.prerotated or meta.get("keys") != KEY_FORMAT:
            raise StateError("the saved cache stores keys another way than this policy does (another policy, or a "
                             "state saved by an older version of the pack)")
        saved = meta["types"]
        if [m["head_type"] for m in saved] != [ts.head_type for ts in self.types]:
            raise StateError("the saved cache has other head types than this policy makes: the AR_STATE was made "
                             "with another policy or head labels")
        for ts, m in zip(self.types, saved):
            if [tuple(h) for h in m["heads"]] != ts.heads:
                raise StateError(f"the saved cache's {ts.head_type!r} heads differ from this policy's head labels")
            p = f"cache.{ts.head_type}"
            _copy_in(ts.frames.k, tensors, p + ".frames.k", grow=True)
            _copy_in(ts.frames.v, tensors, p + ".frames.v", grow=True)
            pages = {int(f): int(pg) for f, pg in m["frame_pages"].items()}
            cap = ts.frames.capacity
            if any(not 0 <= pg < cap for pg in pages.values()) or len(set(pages.values())) != len(pages):
                raise StateError(f"saved cache {ts.head_type!r}: inconsistent page table (corrupt AR_STATE)")
            ts.frames.page_of = pages
            ts.frames.free = sorted(set(range(cap)) - set(pages.values()))
            ts.tracker.load_state(m["tracker"])
            if ts.blocks is not None:
                for name in ("k", "v", "acc_k", "acc_v"):
                    _copy_in(getattr(ts.blocks, name), tensors, f"{p}.blocks.{name}")
                ts.blocks.page_of = {int(b): int(pg) for b, pg in m["block_pages"].items()}
                ts.blocks.free = sorted(set(range(ts.blocks.k.shape[2])) - set(ts.blocks.page_of.values()))
                ts.blocks.acc_frames = int(m["acc_frames"])
            if ts.episodes is not None:
                for name in ("k", "v", "sig", "valid", "first", "last", "count"):
                    _copy_in(getattr(ts.episodes, name), tensors, f"{p}.episodes.{name}")


def _copy_in(dst: torch.Tensor, tensors: dict, name: str, grow: bool = False) -> None:
    if name not in tensors:
        raise StateError(f"the saved cache lacks tensor {name!r}: the AR_STATE is incomplete or corrupt")
    src = tensors[name]
    fits = src.dim() == dst.dim() and (src.shape == dst.shape or (
        grow and src.shape[:2] == dst.shape[:2] and src.shape[3:] == dst.shape[3:] and src.shape[2] <= dst.shape[2]))
    if not fits:
        raise StateError(f"saved cache buffer {name} has shape {tuple(src.shape)}, which does not fit this run's "
                         f"{tuple(dst.shape)} (another batch, size or policy?)")
    if src.shape == dst.shape:
        dst.copy_(src)
    else:  # a `full` cache continued with more frames: the saved pages go first
        dst[:, :, :src.shape[2]].copy_(src)
