"""The head-wise KV cache: per layer, per head group, preallocated tiers of entries.

Within a layer, heads of the same type follow the same frame-index rule, so they
form one *group* that keeps the same entries: a group stores raw (pre-RoPE) K
and V for its heads in preallocated slot buffers, one per tier:

* ``sink``    — the first frames, kept for good;
* ``recent``  — a ring of the last frames of history;
* ``middle``  — what a middle rule keeps of frames leaving the recent ring
                (strided frames, phase-matched frames, merged pooled blocks, or
                episodic memory);
* ``all``     — for unbounded policies, every frame (capacity = video length).

Committing a chunk writes its frames into slots (evicting through the rules);
it never copies the whole cache. Noisy denoising calls only read. Memory is the
sum of the tier capacities, fixed by the policy, not by the video length.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .policies import Cyclic, Episodic, Merge, RetentionRule, Stride
from .rope import pool_tokens, pooled_grid


@dataclass
class Entry:
    """One retained item of a group: a whole frame or a pooled summary."""

    k: torch.Tensor  # [B, tokens, Hg, D], raw (pre-RoPE)
    v: torch.Tensor
    time: float  # absolute frame time (mean time for merged entries)
    pool: int = 1  # 1: full frame; p: p×p spatially pooled
    sink: bool = False
    frames: tuple[int, ...] = ()  # absolute frame indices summarised by this entry
    kind: str = "recent"


class SlotStore:
    """``capacity`` preallocated slots of ``[B, tokens, Hg, D]`` for K and V."""

    def __init__(self, capacity: int, batch: int, tokens: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, capacity, tokens, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[:, slot].copy_(k)
        self.v[:, slot].copy_(v)

    def view(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, slot], self.v[:, slot]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class FifoTier:
    """Up to ``capacity`` entries in arrival order over a slot ring."""

    def __init__(self, store: SlotStore, kind: str, pool: int = 1):
        self.store = store
        self.kind = kind
        self.pool = pool
        self.items: deque[tuple[int, float, tuple[int, ...]]] = deque()  # (slot, time, frames)
        self.free = list(range(store.capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) >= self.store.capacity

    def pop_oldest(self) -> tuple[int, float, tuple[int, ...]]:
        item = self.items.popleft()
        self.free.append(item[0])
        return item

    def push(self, k: torch.Tensor, v: torch.Tensor, time: float, frames: tuple[int, ...]) -> None:
        """Append; drops the oldest entry when full (call :meth:`pop_oldest` first to keep it)."""
        if self.store.capacity == 0:
            return
        if self.full():
            self.pop_oldest()
        slot = self.free.pop()
        self.store.write(slot, k, v)
        self.items.append((slot, time, frames))

    def entries(self, sink: bool = False) -> list[Entry]:
        out = []
        for slot, time, frames in self.items:
            k, v = self.store.view(slot)
            out.append(Entry(k, v, time, self.pool, sink, frames, self.kind))
        return out


class MiddleTier:
    """Base class: receives frames leaving the recent ring."""

    def accept(self, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        raise NotImplementedError

    def entries(self, chunk_start: int) -> list[Entry]:
        raise NotImplementedError

    def on_prompt_switch(self) -> None:
        """Called when the prompt changes; only episodic memory reacts."""

    stores: list[SlotStore]


class StrideTier(MiddleTier):
    def __init__(self, rule: Stride, make_store):
        self.rule = rule
        self.fifo = FifoTier(make_store(rule.cap, 1), "stride")
        self.stores = [self.fifo.store]

    def accept(self, k, v, frame):
        if frame % self.rule.every == 0:
            self.fifo.push(k, v, float(frame), (frame,))

    def entries(self, chunk_start):
        return self.fifo.entries()


class CyclicTier(MiddleTier):
    def __init__(self, rule: Cyclic, make_store, frames_per_block: int):
        self.rule = rule
        self.phase_step = math.gcd(frames_per_block, rule.period)  # phases a chunk can start on
        self.fifo = FifoTier(make_store(rule.cap, 1), "cyclic")
        self.stores = [self.fifo.store]

    def accept(self, k, v, frame):
        if frame % self.phase_step == 0:
            self.fifo.push(k, v, float(frame), (frame,))

    def entries(self, chunk_start):
        phase = chunk_start % self.rule.period
        return [e for e in self.fifo.entries() if int(e.time) % self.rule.period == phase]


class MergeTier(MiddleTier):
    """Blocks of ``block`` evicted frames, pooled and averaged into one entry each."""

    def __init__(self, rule: Merge, make_store):
        self.rule = rule
        self.fifo = FifoTier(make_store(rule.cap, rule.pool), "merged", pool=rule.pool)
        self.acc = make_store(1, rule.pool)  # running sum of the block being filled
        self.acc_frames: list[int] = []
        self.stores = [self.fifo.store, self.acc]

    def accept(self, k, v, frame):
        pk, pv = self._pool(k), self._pool(v)
        if not self.acc_frames:
            self.acc.write(0, pk, pv)
        else:
            self.acc.k[:, 0].add_(pk)
            self.acc.v[:, 0].add_(pv)
        self.acc_frames.append(frame)
        if len(self.acc_frames) == self.rule.block:
            n = len(self.acc_frames)
            k_mean, v_mean = self.acc.k[:, 0] / n, self.acc.v[:, 0] / n
            self.fifo.push(k_mean, v_mean, sum(self.acc_frames) / n, tuple(self.acc_frames))
            self.acc_frames = []

    def _pool(self, x):
        return pool_tokens(x, *self.grid, self.rule.pool)

    def entries(self, chunk_start):
        return self.fifo.entries()


class EpisodicTier(MiddleTier):
    """Hierarchical episodic memory for memory heads (see :class:`~headforcing_core.policies.Episodic`)."""

    def __init__(self, rule: Episodic, make_store):
        self.rule = rule
        self.store = make_store(rule.cap + 1, rule.pool)  # +1: headroom before a merge
        self.stores = [self.store]
        # each episode: dict(slot, count, time, frames, sig) in time order
        self.episodes: list[dict] = []
        self.free = list(range(self.store.capacity - 1, -1, -1))
        self.force_new = False

    def on_prompt_switch(self):
        self.force_new = True

    @staticmethod
    def _signature(k: torch.Tensor) -> torch.Tensor:
        return k.float().mean(dim=(0, 1)).flatten()  # mean key over batch and tokens, all heads

    @staticmethod
    def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.cosine_similarity(a, b, dim=0))

    def accept(self, k, v, frame):
        pk = pool_tokens(k, *self.grid, self.rule.pool)
        pv = pool_tokens(v, *self.grid, self.rule.pool)
        sig = self._signature(pk)
        last = self.episodes[-1] if self.episodes else None
        if last is not None and not self.force_new and self._cos(sig, last["sig"]) >= self.rule.similarity:
            self._fold(last, pk, pv, 1, float(frame), (frame,), sig)
        else:
            slot = self.free.pop()
            self.store.write(slot, pk, pv)
            self.episodes.append(dict(slot=slot, count=1, time=float(frame), frames=(frame,), sig=sig))
        self.force_new = False
        if len(self.episodes) > self.rule.cap:
            self._merge_most_similar_neighbours()

    def _fold(self, ep: dict, k, v, count: int, time: float, frames: tuple[int, ...], sig) -> None:
        """Running mean of ``ep`` with ``count`` more frames summarised by (k, v)."""
        total = ep["count"] + count
        w_old, w_new = ep["count"] / total, count / total
        ek, ev = self.store.view(ep["slot"])
        ek.mul_(w_old).add_(k.to(ek.dtype), alpha=w_new)
        ev.mul_(w_old).add_(v.to(ev.dtype), alpha=w_new)
        ep["time"] = ep["time"] * w_old + time * w_new
        ep["sig"] = ep["sig"] * w_old + sig * w_new
        ep["count"] = total
        ep["frames"] = ep["frames"] + frames

    def _merge_most_similar_neighbours(self) -> None:
        sims = [self._cos(a["sig"], b["sig"]) for a, b in zip(self.episodes, self.episodes[1:])]
        i = max(range(len(sims)), key=lambda j: sims[j])
        a, b = self.episodes[i], self.episodes.pop(i + 1)
        bk, bv = self.store.view(b["slot"])
        self._fold(a, bk, bv, b["count"], b["time"], b["frames"], b["sig"])
        self.free.append(b["slot"])

    def entries(self, chunk_start):
        out = []
        for ep in self.episodes:
            k, v = self.store.view(ep["slot"])
            out.append(Entry(k, v, ep["time"], self.rule.pool, False, ep["frames"], "episode"))
        return out


class GroupCache:
    """Retained history of one head group of one layer."""

    def __init__(self, head_type: str, heads: list[int], rule: RetentionRule, *, batch: int, grid: tuple[int, int],
                 head_dim: int, frames_per_block: int, total_frames: int, dtype: torch.dtype,
                 device: torch.device):
        self.head_type = head_type
        self.heads = heads
        self.rule = rule
        self.grid = grid
        gh, gw = grid

        def make_store(capacity: int, pool: int) -> SlotStore:
            ph, pw = pooled_grid(gh, gw, pool)
            return SlotStore(capacity, batch, ph * pw, len(heads), head_dim, dtype, device)

        hist = rule.history_frames(frames_per_block)
        self.sink = FifoTier(make_store(rule.sink if hist is not None else 0, 1), "sink")
        if hist is None:  # unbounded: every frame
            self.recent = FifoTier(make_store(total_frames, 1), "all")
        else:
            self.recent = FifoTier(make_store(hist, 1), "recent")
        m = rule.middle
        self.middle: MiddleTier | None
        if isinstance(m, Stride):
            self.middle = StrideTier(m, make_store)
        elif isinstance(m, Cyclic):
            self.middle = CyclicTier(m, make_store, frames_per_block)
        elif isinstance(m, Merge):
            self.middle = MergeTier(m, make_store)
        elif isinstance(m, Episodic):
            self.middle = EpisodicTier(m, make_store)
        else:
            self.middle = None
        if self.middle is not None:
            self.middle.grid = grid  # type: ignore[attr-defined]
        self.bounded = hist is not None

    def commit_frame(self, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        """Store one frame's raw K/V (``[B, tokens, Hg, D]``), evicting through the rules."""
        if self.bounded and frame < self.rule.sink:
            self.sink.push(k, v, float(frame), (frame,))
            return
        if self.recent.store.capacity and self.recent.full():
            slot, _, frames = self.recent.items[0]
            if self.middle is not None:
                ok, ov = self.recent.store.view(slot)
                self.middle.accept(ok, ov, frames[0])
            self.recent.pop_oldest()
        self.recent.push(k, v, float(frame), (frame,))

    def entries(self, chunk_start: int) -> list[Entry]:
        """What the chunk starting at ``chunk_start`` attends to, besides itself, in time order."""
        out = self.sink.entries(sink=True)
        if self.middle is not None:
            out += self.middle.entries(chunk_start)
        out += self.recent.entries()
        return out

    def on_prompt_switch(self) -> None:
        if self.middle is not None:
            self.middle.on_prompt_switch()

    def stores(self) -> list[SlotStore]:
        return [self.sink.store, self.recent.store] + (self.middle.stores if self.middle else [])

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stores())


class LayerCache:
    """The groups of one layer. Heads of one type form one group."""

    def __init__(self, head_types: tuple[str, ...], rules: dict[str, RetentionRule], **kw):
        by_type: dict[str, list[int]] = {}
        for h, t in enumerate(head_types):
            by_type.setdefault(t, []).append(h)
        self.num_heads = len(head_types)
        self.groups = [GroupCache(t, heads, rules[t], **kw) for t, heads in by_type.items()]

    def commit(self, k: torch.Tensor, v: torch.Tensor, chunk_start: int, frames: int) -> None:
        """Commit a chunk's raw ``[B, frames·tokens, heads, D]`` K/V."""
        for g in self.groups:
            gk = k if len(g.heads) == self.num_heads else k[:, :, g.heads]
            gv = v if len(g.heads) == self.num_heads else v[:, :, g.heads]
            gk = gk.unflatten(1, (frames, -1))
            gv = gv.unflatten(1, (frames, -1))
            for j in range(frames):
                g.commit_frame(gk[:, j], gv[:, j], chunk_start + j)

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups)


class HeadwiseKVCache:
    """Per-layer, per-head-group KV cache driven by a policy's head types and rules."""

    def __init__(self, head_types: tuple[tuple[str, ...], ...], rules: dict[str, RetentionRule], *, batch: int,
                 grid: tuple[int, int], head_dim: int, frames_per_block: int, total_frames: int,
                 dtype: torch.dtype, device: torch.device):
        kw = dict(batch=batch, grid=grid, head_dim=head_dim, frames_per_block=frames_per_block,
                  total_frames=total_frames, dtype=dtype, device=device)
        self.layers = [LayerCache(row, rules, **kw) for row in head_types]
        self.grid = grid
        self.head_dim = head_dim
        self.frames_per_block = frames_per_block
        self.committed_frames = 0

    def commit(self, layer: int, k: torch.Tensor, v: torch.Tensor, chunk_start: int, frames: int) -> None:
        self.layers[layer].commit(k, v, chunk_start, frames)

    def on_prompt_switch(self) -> None:
        for layer in self.layers:
            for g in layer.groups:
                g.on_prompt_switch()

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def chunk_slot_bytes(self, batch: int, frames: int, num_heads: int, dtype: torch.dtype) -> int:
        gh, gw = self.grid
        per_layer = batch * frames * gh * gw * num_heads * self.head_dim * 2 * torch.finfo(dtype).bits // 8
        return per_layer * len(self.layers)
