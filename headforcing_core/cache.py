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

Snapshots (AR_STATE, continuation): ``HeadwiseKVCache.state_dict()`` returns every
tier's slot buffers (CPU copies) and the bookkeeping that says which slot holds
which frames; ``load_state_dict()`` copies them into a freshly allocated cache of
the same policy (the unbounded ``all`` tier may be larger: it grows on continue).
``replace()`` overwrites the stored K/V of frames kept as whole frames (recache).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import StateError
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

    def export(self, prefix: str, tensors: dict) -> None:
        """CPU copies of both buffers (all slots) under ``prefix.k`` / ``prefix.v``."""
        tensors[prefix + ".k"] = self.k.detach().to("cpu", copy=True).contiguous()
        tensors[prefix + ".v"] = self.v.detach().to("cpu", copy=True).contiguous()

    def restore(self, prefix: str, tensors: dict) -> int:
        """Copy saved buffers into the first slots; the saved capacity may be smaller (growth)."""
        k, v = _tensor(tensors, prefix + ".k"), _tensor(tensors, prefix + ".v")
        n = k.shape[1] if k.ndim == 5 else -1
        if k.shape != v.shape or n < 0 or n > self.capacity or k.shape[0] != self.k.shape[0] \
                or k.shape[2:] != self.k.shape[2:]:
            raise StateError(f"saved cache buffer {prefix} has shape {tuple(k.shape)}, which does not fit this "
                             f"run's buffer {tuple(self.k.shape)} (another batch, size or policy?)")
        self.k[:, :n].copy_(k)
        self.v[:, :n].copy_(v)
        return n


def _tensor(tensors: dict, name: str) -> torch.Tensor:
    if name not in tensors:
        raise StateError(f"the saved cache lacks tensor {name!r}: the AR_STATE is incomplete or corrupt")
    return tensors[name]


def _frames(raw) -> tuple[int, ...]:
    return tuple(int(f) for f in raw)


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

    def state(self, prefix: str, tensors: dict) -> dict:
        self.store.export(prefix, tensors)
        return {"capacity": self.store.capacity, "free": list(self.free),
                "items": [[slot, time, list(frames)] for slot, time, frames in self.items]}

    def load_state(self, prefix: str, tensors: dict, meta: dict) -> None:
        old = int(meta["capacity"])
        if self.store.restore(prefix, tensors) != old:
            raise StateError(f"saved cache tier {prefix}: buffer and bookkeeping disagree (corrupt AR_STATE)")
        items = deque((int(s), float(t), _frames(fr)) for s, t, fr in meta["items"])
        free = [int(s) for s in meta["free"]]
        if sorted([i[0] for i in items] + free) != list(range(old)):
            raise StateError(f"saved cache tier {prefix}: inconsistent slot map (corrupt AR_STATE)")
        self.items = items
        # slots added by growth are used after the saved free ones (the list pops from the end)
        self.free = list(range(self.store.capacity - 1, old - 1, -1)) + free


class MiddleTier:
    """Base class: receives frames leaving the recent ring."""

    def accept(self, k: torch.Tensor, v: torch.Tensor, frame: int) -> None:
        raise NotImplementedError

    def entries(self, chunk_start: int) -> list[Entry]:
        raise NotImplementedError

    def on_prompt_switch(self, first_frame: int | None = None) -> None:
        """Called when the prompt changes at ``first_frame``; only episodic memory reacts."""

    def fifos(self) -> list[FifoTier]:
        """Tiers whose entries are kept frames or blocks (not episodes)."""
        return [self.fifo] if hasattr(self, "fifo") else []

    def state(self, prefix: str, tensors: dict) -> dict:
        return {"fifo": self.fifo.state(prefix + ".fifo", tensors)}

    def load_state(self, prefix: str, tensors: dict, meta: dict) -> None:
        self.fifo.load_state(prefix + ".fifo", tensors, meta["fifo"])

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

    def state(self, prefix, tensors):
        self.acc.export(prefix + ".acc", tensors)
        return {"fifo": self.fifo.state(prefix + ".fifo", tensors), "acc_frames": list(self.acc_frames)}

    def load_state(self, prefix, tensors, meta):
        self.fifo.load_state(prefix + ".fifo", tensors, meta["fifo"])
        self.acc.restore(prefix + ".acc", tensors)
        self.acc_frames = list(_frames(meta["acc_frames"]))

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
        # first frames generated under a new prompt: evicting one of them opens a new episode,
        # so an episode never spans a prompt switch (frames still in the recent ring when the
        # prompt changes belong to the old prompt's episode)
        self.switch_frames: list[int] = []

    def on_prompt_switch(self, first_frame: int | None = None):
        self.switch_frames.append(-1 if first_frame is None else int(first_frame))

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
        crosses_switch = any(b <= frame for b in self.switch_frames)
        if last is not None and not crosses_switch and self._cos(sig, last["sig"]) >= self.rule.similarity:
            self._fold(last, pk, pv, 1, float(frame), (frame,), sig)
        else:
            slot = self.free.pop()
            self.store.write(slot, pk, pv)
            self.episodes.append(dict(slot=slot, count=1, time=float(frame), frames=(frame,), sig=sig))
        self.switch_frames = [b for b in self.switch_frames if b > frame]
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

    def state(self, prefix, tensors):
        self.store.export(prefix, tensors)
        sig_dim = self.store.k.shape[3] * self.store.k.shape[4]
        tensors[prefix + ".sig"] = (torch.stack([ep["sig"].detach().to("cpu", torch.float32) for ep in self.episodes])
                                    if self.episodes else torch.zeros(0, sig_dim))
        return {"capacity": self.store.capacity, "free": list(self.free), "switch_frames": list(self.switch_frames),
                "episodes": [{"slot": ep["slot"], "count": ep["count"], "time": ep["time"],
                              "frames": list(ep["frames"])} for ep in self.episodes]}

    def load_state(self, prefix, tensors, meta):
        if self.store.restore(prefix, tensors) != self.store.capacity or int(meta["capacity"]) != self.store.capacity:
            raise StateError(f"saved episodic memory {prefix} has another capacity than this policy's")
        sigs = _tensor(tensors, prefix + ".sig")
        eps = meta["episodes"]
        free = [int(s) for s in meta["free"]]
        if sigs.shape[0] != len(eps) or sorted([int(e["slot"]) for e in eps] + free) != list(range(self.store.capacity)):
            raise StateError(f"saved episodic memory {prefix}: inconsistent episodes (corrupt AR_STATE)")
        device = self.store.k.device
        self.episodes = [dict(slot=int(e["slot"]), count=int(e["count"]), time=float(e["time"]),
                              frames=_frames(e["frames"]), sig=sigs[i].to(device, torch.float32, copy=True))
                         for i, e in enumerate(eps)]
        self.free = free
        self.switch_frames = [int(b) for b in meta.get("switch_frames", [])]


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

    def on_prompt_switch(self, first_frame: int | None = None) -> None:
        if self.middle is not None:
            self.middle.on_prompt_switch(first_frame)

    def replace_frame(self, frame: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Overwrite the raw K/V (``[B, tokens, Hg, D]``) of every entry that keeps ``frame`` as a whole
        frame (sink, recent / all, strided or phase-kept copies). Pooled or merged summaries that
        include the frame, and the episodic memory, are left as they are. Returns how many
        entries were replaced (0 when the frame is no longer retained whole)."""
        tiers = [self.sink, self.recent] + (self.middle.fifos() if self.middle is not None else [])
        n = 0
        for tier in tiers:
            if tier.pool != 1:
                continue
            for slot, _, frames in tier.items:
                if frames == (frame,):
                    tier.store.write(slot, k, v)
                    n += 1
        return n

    def state(self, prefix: str, tensors: dict) -> dict:
        meta = {"head_type": self.head_type, "heads": list(self.heads),
                "middle_kind": type(self.middle).__name__ if self.middle is not None else None,
                "sink": self.sink.state(prefix + ".sink", tensors),
                "recent": self.recent.state(prefix + ".recent", tensors)}
        if self.middle is not None:
            meta["middle"] = self.middle.state(prefix + ".middle", tensors)
        return meta

    def load_state(self, prefix: str, tensors: dict, meta: dict) -> None:
        kind = type(self.middle).__name__ if self.middle is not None else None
        if (meta["head_type"], list(meta["heads"]), meta["middle_kind"]) != (self.head_type, list(self.heads), kind):
            raise StateError(
                f"saved cache group {prefix} is {meta['head_type']!r} heads {meta['heads']} ({meta['middle_kind']}) "
                f"but this policy makes {self.head_type!r} heads {self.heads} ({kind}): the AR_STATE was made "
                "with another policy or head labels")
        self.sink.load_state(prefix + ".sink", tensors, meta["sink"])
        self.recent.load_state(prefix + ".recent", tensors, meta["recent"])
        if self.middle is not None:
            self.middle.load_state(prefix + ".middle", tensors, meta["middle"])

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

    def replace(self, k: torch.Tensor, v: torch.Tensor, chunk_start: int, frames: int) -> int:
        """Like :meth:`commit`, but overwrite the frames where they are kept whole; returns entries replaced."""
        n = 0
        for g in self.groups:
            gk = (k if len(g.heads) == self.num_heads else k[:, :, g.heads]).unflatten(1, (frames, -1))
            gv = (v if len(g.heads) == self.num_heads else v[:, :, g.heads]).unflatten(1, (frames, -1))
            for j in range(frames):
                n += g.replace_frame(chunk_start + j, gk[:, j], gv[:, j])
        return n

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
        self.total_frames = total_frames
        self.grid = grid
        self.head_dim = head_dim
        self.frames_per_block = frames_per_block
        self.committed_frames = 0

    def commit(self, layer: int, k: torch.Tensor, v: torch.Tensor, chunk_start: int, frames: int) -> None:
        self.layers[layer].commit(k, v, chunk_start, frames)

    def on_prompt_switch(self, first_frame: int | None = None) -> None:
        """The prompt changes from ``first_frame`` on (None: from the next frame to leave a recent window)."""
        for layer in self.layers:
            for g in layer.groups:
                g.on_prompt_switch(first_frame)

    def replace(self, layer: int, k: torch.Tensor, v: torch.Tensor, chunk_start: int, frames: int) -> int:
        """Overwrite a chunk's frames (raw ``[B, frames·tokens, heads, D]`` K/V) where they are kept whole."""
        return self.layers[layer].replace(k, v, chunk_start, frames)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(CPU copies of every tier's buffers, JSON-able bookkeeping). Independent of this cache."""
        tensors: dict[str, torch.Tensor] = {}
        layers = [[g.state(f"cache.l{li}.g{gi}", tensors) for gi, g in enumerate(layer.groups)]
                  for li, layer in enumerate(self.layers)]
        meta = {"grid": list(self.grid), "head_dim": self.head_dim, "frames_per_block": self.frames_per_block,
                "total_frames": self.total_frames, "committed_frames": self.committed_frames, "layers": layers}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Copy a :meth:`state_dict` into this (fresh) cache, built for the same policy, batch and size."""
        if list(meta["grid"]) != list(self.grid) or int(meta["head_dim"]) != self.head_dim:
            raise StateError(f"the saved cache is for a {tuple(meta['grid'])} token grid with {meta['head_dim']}-wide "
                             f"heads; this run has {self.grid} and {self.head_dim}")
        if len(meta["layers"]) != len(self.layers) or any(
                len(m) != len(layer.groups) for m, layer in zip(meta["layers"], self.layers)):
            raise StateError("the saved cache has another number of layers or head groups than this policy makes")
        for li, (layer, groups) in enumerate(zip(self.layers, meta["layers"])):
            for gi, (g, gm) in enumerate(zip(layer.groups, groups)):
                g.load_state(f"cache.l{li}.g{gi}", tensors, gm)
        self.committed_frames = int(meta.get("committed_frames", 0))

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def chunk_slot_bytes(self, batch: int, frames: int, num_heads: int, dtype: torch.dtype) -> int:
        gh, gw = self.grid
        per_layer = batch * frames * gh * gw * num_heads * self.head_dim * 2 * torch.finfo(dtype).bits // 8
        return per_layer * len(self.layers)
