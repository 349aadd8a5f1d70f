"""Plan once per chunk, run every layer and every model call with it (FlashInfer's plan/run split).

:func:`plan_chunk` decides, once per chunk, what every (layer, head, query frame) attends
and at which RoPE time, and lays it out for the device:

* each head type's key sets come from its tracker (:mod:`headforcing_core.retention`),
  the times from the policy's RoPE mode (:mod:`headforcing_core.positions`);
* when every type's key sets are the same for all query frames (the common case) a head
  is one *sequence* whose queries are the whole chunk; otherwise (Pyramid Forcing) each
  (head, query frame) is its own sequence;
* the retained history is gathered and rotated **once** into per-layer buffers
  ``[B, sequences, keys, D]`` (the chunk's own keys first, then the history, then
  padding); the four noisy calls and the clean call only write the chunk's fresh K/V into
  the first slots;
* what the clean pass no longer sees (Pyramid Forcing's middles evicted by the chunk
  itself) sits at the end of a sequence, so each pass is a length (a mask only where
  lengths live on the device: the episodic memory);
* every index and time the device needs is uploaded in one transfer per chunk (and the
  static ones are made once per layout), every per-layer view is made once per chunk, so
  the layer loop and the five model calls never synchronise with the host.

Policies whose keys never move (``absolute`` RoPE, one head type, no middle: ``full``,
``self_forcing_window``, ``longlive``) skip the gather: their pool stores rotated keys and
is itself the attention buffer (:class:`~headforcing_core.cache.HeadwiseKVCache` with
``prerotated``).

:class:`ChunkAttention` is the runner's self-attention for one model call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import KEY_ALIGN, Backend, LayerProblem, Run, bias, window_bias
from .cache import HeadwiseKVCache, TypeStore
from .positions import key_times, map_times
from .retention import ChunkKeys, Key
from .rope import ChunkRotation, pooled_grid, rotate_entries, spatial_positions

PASSES = ("noisy", "clean")


@dataclass
class Segment:
    """One head type × query-frame class of a chunk: its (noisy) key list and RoPE times."""

    store: TypeStore
    cls: int  # query-frame class: 0 when key sets are shared by the chunk, else the query frame
    chunk_variant: int
    frames: list[Key]  # committed whole frames, clean-visible first
    blocks: list[Key]  # merged blocks, clean-visible first
    frame_times: list[float] | None  # host times, or None: computed on the device (episodic memory)
    block_times: list[float] | None
    clean_frames: int  # how many of `frames` the clean pass sees (a prefix)
    clean_blocks: int
    episodes: Key | None = None
    listing: tuple = ()  # (source, index, role, time) of every noisy key, for listings and tests


@dataclass
class LayerViews:
    """Views of one layer's buffers, made once per chunk."""

    k: torch.Tensor  # [B, NS, L, D] what attention reads
    v: torch.Tensor
    k_chunk: torch.Tensor | None  # where the chunk's own keys go
    v_chunk: torch.Tensor | None
    mask: dict[str, torch.Tensor | None]
    lengths: dict[str, torch.Tensor | None]
    runs: dict[str, tuple[Run, ...]]
    chunk_dest: torch.Tensor | None = None  # [NS·S] flat (sequence·L + slot) of the chunk's keys, when scattered
    starts: torch.Tensor | None = None  # [B|1, NS] first attended key of each sequence (after its lead)


@dataclass
class ChunkPlan:
    """Everything the model calls of one chunk need (see the module docstring)."""

    chunk_start: int
    frames: int
    classes: int  # query-frame classes (1, or the chunk's frames)
    rotation: ChunkRotation
    segments: list[Segment]
    prerotated: bool
    tokens: int
    layers: list[LayerViews] = field(default_factory=list)
    grouped: bool = False  # sequences ordered type by type (for the grouped backend)
    q_src: list[torch.Tensor | None] = field(default_factory=list)  # per layer: seq -> head·J + class
    out_src: list[torch.Tensor | None] = field(default_factory=list)
    chunk_src: list[torch.Tensor | None] = field(default_factory=list)  # per layer: seq -> variant·H + head
    v_src: list[torch.Tensor | None] = field(default_factory=list)  # per layer: seq -> head (grouped order)
    kp: torch.Tensor | None = None  # [layers, B, NS, Lmax, D] (packed layouts)
    vp: torch.Tensor | None = None
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)  # pass -> [layers, B|1, NS]
    starts: torch.Tensor | None = None  # [layers, 1, NS] lead of each sequence
    chunk_pages: torch.Tensor | None = None  # prerotated: the pages the chunk's frames are written to
    key_frames: torch.Tensor | None = None  # prerotated: frame of each attended key (-1: none), observers
    seq_types: list[list[str]] = field(default_factory=list)  # per layer: head type of each sequence
    rerun: bool = False  # a re-run of committed frames (recache), planned from given key sets
    gathered_bytes: int = 0  # history K/V gathered (and K rotated) into the per-chunk buffers, once

    def listing(self, head_type: str, query_frame: int = 0, pass_: str = "noisy") -> list[tuple]:
        """``[(source, index, role, rope_time)]`` of a type's key set (episodes: time None)."""
        for seg in self.segments:
            if seg.store.head_type == head_type and seg.cls == (query_frame if self.classes > 1 else 0):
                rows = list(seg.listing)
                if pass_ == "clean":
                    dropped = {(k.source, k.index) for k in seg.frames[seg.clean_frames:] + seg.blocks[seg.clean_blocks:]}
                    rows = [r for r in rows if (r[0], r[1]) not in dropped]
                return rows
        raise KeyError(head_type)

    def chunk_write_bytes(self) -> int:
        """K/V bytes one model call writes (the chunk's own keys and values into every sequence)."""
        k = self.layers[0].k  # [B, sequences, keys, D]
        return 2 * k.shape[0] * k.shape[1] * self.frames * self.tokens * k.shape[-1] * k.element_size() \
            * len(self.layers)

    def attended_tokens(self, pass_: str = "noisy") -> float:
        """Mean keys a query token attends, over every head (episodic memory: as held now)."""
        if self.prerotated:
            lv = self.layers[0]
            return float(lv.k.shape[2] if lv.mask[pass_] is None else lv.mask[pass_].sum())
        return float(self.lengths[pass_].to(torch.float64).mean())


class _Upload:
    """Collects the host-made integers and floats of a plan and moves them to the device in one copy each."""

    def __init__(self):
        self.longs: list[int] = []
        self.doubles: list[float] = []

    def long(self, values) -> slice:
        start = len(self.longs)
        self.longs += [int(v) for v in values]
        return slice(start, len(self.longs))

    def double(self, values) -> slice:
        start = len(self.doubles)
        self.doubles += [float(v) for v in values]
        return slice(start, len(self.doubles))

    def send(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.longs, dtype=torch.int64).to(device, non_blocking=True),
                torch.tensor(self.doubles, dtype=torch.float64).to(device, non_blocking=True))


def _times(mode: str, keys: list[Key], start: int, frames: int, t: int, window: int, cmin: int, cmax: int) -> list[float]:
    return key_times(mode, [k.time for k in keys], is_chunk=[k.source == "chunk" for k in keys],
                     is_sink=[k.role == "sink" for k in keys], is_anchor=[k.anchor for k in keys], chunk_start=start,
                     frames=frames, query_frame=t, window=window, clamp_min=cmin, clamp_max=cmax)


def _ordered(noisy: tuple[Key, ...], clean: tuple[Key, ...], source: str) -> tuple[list[Key], int]:
    """The ``source`` entries of a noisy key set, those the clean pass also sees first."""
    seen = [k for k in noisy if k.source == source]
    kept = [k for k in clean if k.source == source]
    if not set(kept) <= set(seen):
        raise AssertionError("a clean pass may only drop entries of the noisy passes")  # holds for every rule
    visible = sorted((k for k in seen if k in kept), key=lambda k: k.time)  # time order, as a pool holds them
    return visible + [k for k in seen if k not in kept], len(kept)


def plan_chunk(cache: HeadwiseKVCache, rope: str, window: int, clamp_min: int, clamp_max: int, start: int,
               frames: int, *, keys: dict[str, ChunkKeys] | None = None, episodes_before: int | None = None,
               gather_prerotated: bool = False, grouped: bool = False) -> ChunkPlan:
    """Plan the chunk ``[start, start + frames)``.

    ``keys`` (default: each tracker's :meth:`keys`) may be given to plan a re-run (recache);
    ``episodes_before`` hides episodes holding frames at or after it; ``gather_prerotated``
    builds a packed layout even for a prerotated pool (recache); ``grouped`` orders each
    layer's sequences type by type (the grouped backend runs one call per type).
    """
    given = keys is not None
    if keys is None:
        keys = {ts.head_type: ts.tracker.keys(start, frames) for ts in cache.types}
    # ---- key sets and times per (type, query frame) -----------------------------------------
    per_type = {}
    for ts in cache.types:
        ck = keys[ts.head_type]
        rows = []
        for j in range(frames):
            ks = list(ck.noisy[j])
            host = [k for k in ks if k.source != "episodes"]
            times = dict(zip(host, _times(rope, host, start, frames, start + j, window, clamp_min, clamp_max)))
            rows.append((ks, times, ck.clean[j]))
        per_type[ts.head_type] = rows

    def signature(row):  # key set, RoPE times and clean set of one query frame
        ks, times, clean = row
        return tuple(ks), tuple(times[k] for k in ks if k in times), tuple(clean)

    shared = all(len({signature(r) for r in rows}) == 1 for rows in per_type.values())
    classes = 1 if shared else frames
    # ---- segments; chunk rotation variants (variant 0: every chunk frame at its own time) ----
    variants: list[tuple[float, ...]] = [tuple(float(start + j) for j in range(frames))]
    segments: list[Segment] = []
    device_times = rope in ("compact", "window_shift")
    for ts in cache.types:
        for c in range(classes):
            ks, times, clean = per_type[ts.head_type][c]
            chunk_t = {k.index: times[k] for k in ks if k.source == "chunk"}
            if sorted(chunk_t) != list(range(frames)):
                raise AssertionError(f"{ts.head_type}: a chunk must attend all of its own frames")
            vt = tuple(chunk_t[j] for j in range(frames))
            if vt not in variants:
                variants.append(vt)
            fr, n_cf = _ordered(tuple(ks), tuple(clean), "frame")
            bl, n_cb = _ordered(tuple(ks), tuple(clean), "block")
            ep = next((k for k in ks if k.source == "episodes"), None)
            dev_t = ep is not None and device_times
            segments.append(Segment(
                ts, c, variants.index(vt), fr, bl,
                None if dev_t else [times[k] for k in fr], None if dev_t else [times[k] for k in bl],
                n_cf, n_cb, ep, tuple((k.source, k.index, k.role, times.get(k)) for k in ks)))
    rotation = ChunkRotation(cache.head_dim, cache.grid, variants, cache.dtype, cache.device)
    plan = ChunkPlan(start, frames, classes, rotation, segments, cache.prerotated and not gather_prerotated,
                     cache.tokens, grouped=grouped, rerun=given)
    if plan.prerotated:
        _layout_pool(plan, cache, start, frames)
    else:
        _layout_packed(plan, cache, rope, window, clamp_min, clamp_max, start, frames, episodes_before)
    return plan


# ---------------------------------------------------------------------------------------------
# prerotated pool: attention reads the pool in place


def _layout_pool(plan: ChunkPlan, cache: HeadwiseKVCache, start: int, frames: int) -> None:
    (seg,) = plan.segments  # one type, one class
    ts = seg.store
    pool = ts.frames
    H, T = cache.num_heads, cache.tokens
    pages = [pool.page_of[start + j] for j in range(frames)]
    attended = sorted([pool.page_of[k.index] for k in seg.frames] + pages)
    frame_of_page = {p: f for f, p in pool.page_of.items()}
    prefix = attended == list(range(len(attended)))
    width = len(attended) * T if prefix else pool.capacity * T
    attended_set = set(attended)
    up = _Upload()
    pages_at = up.long(pages)
    frames_at = up.long([frame_of_page[p] if p in attended_set else -1 for p in range(width // T)])
    mask_at = None if prefix else up.long([p in attended_set for p in range(pool.capacity)])
    longs, _ = up.send(cache.device)
    plan.chunk_pages = longs[pages_at]
    plan.key_frames = longs[frames_at].repeat_interleave(T)
    mask = None if mask_at is None else bias(longs[mask_at].bool().repeat_interleave(T), cache.dtype).view(1, 1, 1, -1)
    run = (Run(0, H, width, mask is not None),)
    for li in range(cache.num_layers):
        rows = slice(li * H, (li + 1) * H)  # one type: the layer's heads are consecutive
        k, v = pool.k[:, rows], pool.v[:, rows]  # [B, H, P, T, D]
        plan.layers.append(LayerViews(k.flatten(2, 3)[:, :, :width], v.flatten(2, 3)[:, :, :width], k, v,
                                      {p: mask for p in PASSES}, {p: None for p in PASSES}, {p: run for p in PASSES}))


# ---------------------------------------------------------------------------------------------
# packed layout: history gathered and rotated once per chunk


def _static_layout(cache: HeadwiseKVCache, plan: ChunkPlan):
    """Sequence order and the index tensors that depend only on the layout (memoised on the cache)."""
    key = (plan.classes, plan.grouped, tuple((id(s.store), s.cls, s.chunk_variant) for s in plan.segments))
    memo = cache.__dict__.setdefault("_layout_memo", {})
    if key in memo:
        return memo[key]
    H, J, layers = cache.num_heads, plan.classes, cache.num_layers
    NS = H * J
    seq_of: dict[tuple[int, int, int], int] = {}
    order = []  # per layer: [(segment index, head)]
    for li in range(layers):
        row = []
        for si, seg in enumerate(plan.segments):
            row += [(si, h) for (l_, h) in seg.store.heads if l_ == li]
        if not plan.grouped:  # natural order: head-major, then class (no permutation of q or of the output)
            row.sort(key=lambda sh: (sh[1], plan.segments[sh[0]].cls))
        for n, (si, h) in enumerate(row):
            seq_of[(li, h, plan.segments[si].cls)] = n
        order.append(row)
    up = _Upload()
    q_src, out_src, chunk_src, v_src = [], [], [], []
    for li in range(layers):
        q = [h * J + plan.segments[si].cls for si, h in order[li]]
        ch = [plan.segments[si].chunk_variant * H + h for si, h in order[li]]
        inv = [0] * NS
        for i, s in enumerate(q):
            inv[s] = i
        q_src.append(None if q == list(range(NS)) else up.long(q))
        out_src.append(None if q == list(range(NS)) else up.long(inv))
        natural_chunk = all(plan.segments[si].chunk_variant == 0 for si, _ in order[li]) and not plan.grouped
        chunk_src.append(None if natural_chunk else up.long(ch))
        v_src.append(up.long([h for _, h in order[li]]) if plan.grouped else None)
    head_at = {}
    for si, seg in enumerate(plan.segments):
        head_at[si] = (up.long([li for li, _ in seg.store.heads]),
                       up.long([seq_of[(li, h, seg.cls)] for li, h in seg.store.heads]))
    longs, _ = up.send(cache.device)
    pick = lambda sl: None if sl is None else longs[sl]  # noqa: E731
    out = dict(seq_of=seq_of, order=order, q_src=[pick(x) for x in q_src], out_src=[pick(x) for x in out_src],
               chunk_src=[pick(x) for x in chunk_src], v_src=[pick(x) for x in v_src],
               head_index={si: (longs[a], longs[b]) for si, (a, b) in head_at.items()})
    memo[key] = out
    return out


def _layout_packed(plan: ChunkPlan, cache: HeadwiseKVCache, rope: str, window: int, cmin: int, cmax: int,
                   start: int, frames: int, episodes_before: int | None) -> None:
    """Per sequence: ``[lead | clean-visible history (time order) | chunk | noisy-only history | episodes | pad]``.

    History first and in time order, then the chunk, is the order a prerotated pool has, so a
    policy that keeps everything computes bit for bit what ``full`` does. The ``lead`` padding
    puts every sequence's chunk at the same offset, so a model call writes the chunk's keys with
    one slice copy. Each pass attends a window ``[lead, lead + length)`` (the clean pass stops
    after the chunk's own keys, or after the valid episodes)."""
    B, H, D, T = cache.batch, cache.num_heads, cache.head_dim, cache.tokens
    layers, dev = cache.num_layers, cache.device
    S = frames * T
    J = plan.classes
    NS = H * J
    gh, gw = cache.grid
    static = _static_layout(cache, plan)
    plan.q_src, plan.out_src = static["q_src"], static["out_src"]
    plan.chunk_src, plan.v_src = static["chunk_src"], static["v_src"]
    sizes = []  # per segment: (history before the chunk, noisy-only history, episode slots' tokens, block tokens)
    for seg in plan.segments:
        tp = _pooled_tokens(seg, gh, gw)
        ep_tokens = seg.store.episodes.slots * seg.store.episodes.k.shape[3] if seg.episodes is not None else 0
        before = seg.clean_frames * T + seg.clean_blocks * tp
        after = (len(seg.frames) - seg.clean_frames) * T + (len(seg.blocks) - seg.clean_blocks) * tp
        if ep_tokens and after:  # both passes count the episodes right after the chunk (see the lengths)
            raise AssertionError(f"{seg.store.head_type}: episodic memory with entries the clean pass drops")
        sizes.append((before, after, ep_tokens, tp))
    lead_to = max(before for before, _, _, _ in sizes)  # where every chunk starts
    lmax = lead_to + S + max(after + ep for _, after, ep, _ in sizes)
    lmax = -(-lmax // KEY_ALIGN) * KEY_ALIGN  # masked SDPA kernels want the key axis aligned
    plan.kp = torch.zeros(layers, B, NS, lmax, D, dtype=cache.dtype, device=dev)
    plan.vp = torch.zeros_like(plan.kp)
    # host-known lengths, runs and chunk offsets per (layer, sequence)
    base = {p: [[0] * NS for _ in range(layers)] for p in PASSES}
    runs = {p: [[] for _ in range(layers)] for p in PASSES}
    leads = [[0] * NS for _ in range(layers)]
    plan.seq_types = [[""] * NS for _ in range(layers)]
    for li in range(layers):
        for n, (si, h) in enumerate(static["order"][li]):
            before, after, ep, _ = sizes[si]
            plan.seq_types[li][n] = plan.segments[si].store.head_type
            leads[li][n] = lead_to - before
            for p, length in (("clean", before + S), ("noisy", before + S + after)):
                base[p][li][n] = length
                if plan.grouped:  # only the grouped backend reads runs per sequence
                    runs[p][li].append(Run(n, n + 1, length + ep, ep > 0, lead_to - before))
    # ---- one upload: pages, times, lengths, chunk offsets ------------------------------------------
    up = _Upload()
    parts = []  # (segment, whole frames or blocks, pages, host times or None, offset)
    own_at = {}  # device-time segments: own times of their whole frames
    for si, seg in enumerate(plan.segments):
        ts = seg.store
        before, _, _, tp = sizes[si]
        if seg.episodes is not None and seg.frame_times is None:
            own_at[si] = up.double([k.time for k in seg.frames])
        off = {"clean": lead_to - before, "noisy": lead_to + S}
        for which, entries, times, n_clean, page_of, tokens in (
                ("frames", seg.frames, seg.frame_times, seg.clean_frames, ts.frames.page_of, T),
                ("blocks", seg.blocks, seg.block_times, seg.clean_blocks, ts.blocks.page_of if ts.blocks else {}, tp)):
            for part, sel in (("clean", slice(0, n_clean)), ("noisy", slice(n_clean, len(entries)))):
                chosen = entries[sel]
                if not chosen:
                    continue
                parts.append((si, which, up.long([page_of[k.index] for k in chosen]),
                              None if times is None else up.double(times[sel]), sel, off[part]))
                off[part] += len(chosen) * tokens
    len_at = {p: up.long([x for row in base[p] for x in row]) for p in PASSES}
    lead_at = up.long([x for row in leads for x in row])
    longs, doubles = up.send(dev)
    lengths = {p: longs[len_at[p]].view(layers, 1, NS) for p in PASSES}
    starts = longs[lead_at].view(layers, 1, NS)
    # ---- gather, rotate and write each segment's history -------------------------------------------
    ep_cache: dict = {}

    def episode_layout(si):
        own = doubles[own_at[si]] if si in own_at else None
        return _episode_layout(plan.segments[si], rope, window, cmin, cmax, start, frames, episodes_before,
                               ep_cache, own)

    for si, which, pages_at, times_at, sel, off in parts:
        seg = plan.segments[si]
        ts = seg.store
        layer_idx, seq_idx = static["head_index"][si]
        pool = ts.frames if which == "frames" else ts.blocks
        pages = longs[pages_at]
        times = None
        if not cache.prerotated:  # a recache of a prerotated pool gathers keys that are already rotated
            # compact / window_shift with episodic memory: ranked with the episodes on the device
            times = doubles[times_at] if times_at is not None else episode_layout(si)[0][..., sel]
            pool_size = (seg.frames if which == "frames" else seg.blocks)[0].pool
            sp = spatial_positions(gh, gw, pool_size, "top_left" if which == "blocks" else "centroid")
        for heads in _head_slices(pool.k, pages.numel()):  # bounded temporaries: a slice of the type's heads
            gk = pool.k[:, heads].index_select(2, pages)  # [B, n, E, tokens, D]
            gv = pool.v[:, heads].index_select(2, pages)
            if times is not None:
                gk = rotate_entries(gk, times if times.dim() == 1 else times[:, heads], sp)
            _write(plan, layer_idx[heads], seq_idx[heads], off, gk, gv)
    for si, seg in enumerate(plan.segments):
        if seg.episodes is None:
            continue
        ep = seg.store.episodes
        before, after, _, _ = sizes[si]
        _, ep_times, ep_order, ep_valid = episode_layout(si)
        idx = _heads(ep, ep_order)  # [B, N, C]
        layer_idx, seq_idx = static["head_index"][si]
        for heads in _head_slices(ep.k, ep.slots):
            shape = idx[:, heads].shape + ep.k.shape[3:]
            gk = ep.k[:, heads].gather(2, idx[:, heads, :, None, None].expand(shape))
            gv = ep.v[:, heads].gather(2, idx[:, heads, :, None, None].expand(shape))
            gk = rotate_entries(gk, ep_times[:, heads], spatial_positions(gh, gw, ep.pool, "centroid"))
            _write(plan, layer_idx[heads], seq_idx[heads], lead_to + S + after, gk, gv)
        n_valid = _heads(ep, ep_valid.sum(-1)) * ep.k.shape[3]  # [B, N] keys of the valid episodes
        for p in PASSES:
            L = lengths[p]
            if L.shape[1] != B:
                L = L.expand(-1, B, -1).clone()
            L[layer_idx, :, seq_idx] += n_valid.T
            lengths[p] = L
    plan.lengths = lengths
    plan.starts = starts
    # ---- per-layer views (made once; the five model calls reuse them) ------------------------------
    masked = any(seg.episodes is not None for seg in plan.segments)
    masks = {}
    for p in PASSES:
        uniform = not masked and all(x == lmax for row in base[p] for x in row)
        masks[p] = None if uniform else window_bias(starts, lengths[p], lmax, cache.dtype)
    for li in range(layers):
        k, v = plan.kp[li], plan.vp[li]
        chunk_dest = None
        if plan.grouped or plan.chunk_src[li] is not None:  # sequences in another order, or rotation variants
            chunk_dest = (torch.arange(NS, device=dev).view(NS, 1) * lmax + lead_to
                          + torch.arange(S, device=dev)).view(-1)
            k_chunk = v_chunk = None
        elif J == 1:
            k_chunk, v_chunk = k[:, :, lead_to:lead_to + S], v[:, :, lead_to:lead_to + S]
        else:  # sequences (head, query frame): the chunk is broadcast over J
            k_chunk = k.view(B, H, J, lmax, D)[:, :, :, lead_to:lead_to + S]
            v_chunk = v.view(B, H, J, lmax, D)[:, :, :, lead_to:lead_to + S]
        plan.layers.append(LayerViews(
            k, v, k_chunk, v_chunk, {p: None if masks[p] is None else masks[p][li] for p in PASSES},
            {p: lengths[p][li] for p in PASSES},
            {p: tuple(_merge_runs(runs[p][li])) if plan.grouped else (Run(0, NS, lmax, masks[p] is not None),)
             for p in PASSES}, chunk_dest, starts[li]))


def _merge_runs(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for r in runs:
        last = out[-1] if out else None
        if last is not None and (last.masked, last.length, last.start, last.end) == (r.masked, r.length, r.start, r.first):
            out[-1] = Run(last.first, r.end, r.length, r.masked, r.start)
        else:
            out.append(r)
    return out


def _pooled_tokens(seg: Segment, gh: int, gw: int) -> int:
    if not seg.blocks:
        return 0
    ph, pw = pooled_grid(gh, gw, seg.blocks[0].pool)
    return ph * pw


PLAN_SLICE_BYTES = 256 * 2**20  # largest float32 gather a plan makes at once (per K or V)


def _head_slices(store: torch.Tensor, entries: int) -> list[slice]:
    """Slices of a pool's heads whose gathered entries stay within :data:`PLAN_SLICE_BYTES` in float32."""
    b, n = store.shape[:2]
    per_head = max(1, b * entries * store.shape[3] * store.shape[4] * 4)
    step = max(1, min(n, PLAN_SLICE_BYTES // per_head))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _heads(ep, x: torch.Tensor) -> torch.Tensor:
    """Per-(row, layer) values → per head of the type (``[B, Lm, ...]`` → ``[B, N, ...]``)."""
    return x.index_select(1, ep.layer_of_head)


def _episode_layout(seg: Segment, rope, window, cmin, cmax, start, frames, episodes_before, memo, own_frames):
    """Order, validity and RoPE times of a segment's episodic memory (and, for compact / window_shift,
    of its whole-frame entries, ranked together with the episodes) — on the device, once per segment."""
    if id(seg) in memo:
        return memo[id(seg)]
    ep = seg.store.episodes
    valid = ep.valid if episodes_before is None else ep.valid & (ep.last < episodes_before)
    big = torch.iinfo(torch.int64).max
    order = torch.argsort(torch.where(valid, ep.first, big), dim=-1, stable=True)  # [B, Lm, C]
    ep_valid = valid.gather(-1, order)
    ep_own = ep.times().gather(-1, order)
    frame_times = None
    if seg.frame_times is None:
        b, lm, c = ep_own.shape
        n = len(seg.frames)
        dev = ep_own.device
        own = torch.cat([own_frames.expand(b, lm, n), ep_own], dim=-1)
        flags = [k.role == "sink" for k in seg.frames] + [False] * c
        sink = torch.tensor(flags, device=dev)
        anchor = torch.tensor([k.anchor for k in seg.frames] + [False] * c, device=dev)
        valid_all = torch.cat([torch.ones(b, lm, n, dtype=torch.bool, device=dev), ep_valid], dim=-1)
        mapped = map_times(rope, own, is_chunk=torch.zeros_like(sink), is_sink=sink, is_anchor=anchor,
                           valid=valid_all, chunk_start=start, frames=frames, query_frame=start, window=window,
                           clamp_min=cmin, clamp_max=cmax)
        frame_times, ep_own = _heads(ep, mapped[..., :n]), mapped[..., n:]
    out = (frame_times, _heads(ep, ep_own), order, ep_valid)
    memo[id(seg)] = out
    return out


def _write(plan: ChunkPlan, layer_idx, seq_idx, off, gk, gv) -> None:
    """Write ``[B, N, E, tokens, D]`` into ``kp``/``vp`` at each head's (layer, sequence), from ``off``."""
    b, n = gk.shape[:2]
    flat_k = gk.reshape(b, n, -1, gk.shape[-1]).transpose(0, 1)  # [N, B, E·tokens, D]
    flat_v = gv.reshape(b, n, -1, gv.shape[-1]).transpose(0, 1)
    width = flat_k.shape[2]
    plan.gathered_bytes += 2 * flat_k.numel() * plan.kp.element_size()
    plan.kp[layer_idx, :, seq_idx, off:off + width] = flat_k.to(plan.kp.dtype)
    plan.vp[layer_idx, :, seq_idx, off:off + width] = flat_v.to(plan.vp.dtype)


# ---------------------------------------------------------------------------------------------
# running


Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class ChunkAttention:
    """The runner's self-attention for one model call of a planned chunk.

    ``pass_``: ``"noisy"`` or ``"clean"`` (which key lengths apply). ``stage``: on the clean pass,
    a ``[layers, B, S, heads, D]`` pair of buffers that receives the raw K/V the cache commits
    after the call (None for a prerotated pool, written in place). ``observer(layer, q, k,
    key_frames)`` — full-cache runs only — sees the rotated queries ``[B, S, H, D]``, the keys
    ``[B, H, L, D]`` and the frame of every key (head profiling).
    """

    def __init__(self, plan: ChunkPlan, cache: HeadwiseKVCache, backend: Backend, pass_: str = "noisy",
                 stage: tuple[torch.Tensor, torch.Tensor] | None = None, observer: Observer | None = None):
        self.plan, self.cache, self.backend, self.pass_ = plan, cache, backend, pass_
        self.stage = stage
        self.observer = observer

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        plan, lv, p = self.plan, self.plan.layers[layer], self.pass_
        rot = plan.rotation
        b, s, h, d = q.shape
        q_r = rot.apply(q)
        if self.stage is not None:
            self.stage[0][layer].copy_(k)
            self.stage[1][layer].copy_(v)
        if plan.prerotated:  # write the chunk's pages in place, then read the pool
            f = plan.frames
            lv.k_chunk.index_copy_(2, plan.chunk_pages, rot.apply(k).view(b, f, s // f, h, d).permute(0, 3, 1, 2, 4))
            lv.v_chunk.index_copy_(2, plan.chunk_pages, v.view(b, f, s // f, h, d).permute(0, 3, 1, 2, 4))
            if self.observer is not None:
                self.observer(layer, q_r, lv.k, plan.key_frames)
            out = self.backend(LayerProblem(q_r.transpose(1, 2), lv.k, lv.v, lv.mask[p], None, lv.runs[p]))
            return out.transpose(1, 2)
        J = plan.classes
        if lv.chunk_dest is None:  # every sequence sees the chunk at its own frames, at one offset
            vt = v.transpose(1, 2)
            if J == 1:  # rotated straight into the buffer's chunk slots
                rot.apply(k, out=lv.k_chunk.transpose(1, 2))
                lv.v_chunk.copy_(vt)
            else:
                lv.k_chunk.copy_(rot.apply(k).transpose(1, 2).unsqueeze(2).expand(-1, -1, J, -1, -1))
                lv.v_chunk.copy_(vt.unsqueeze(2).expand(-1, -1, J, -1, -1))
        else:  # per-sequence offsets (or rotation variants, or grouped order): one scatter per tensor
            src = plan.chunk_src[layer]
            if src is None:
                kt = rot.apply(k).transpose(1, 2)
                ks = kt if J == 1 else kt.unsqueeze(2).expand(-1, -1, J, -1, -1)
            else:
                k_all = rot.apply_all(k).permute(0, 1, 3, 2, 4).reshape(b, -1, s, d)  # [B, V·H, S, D]
                ks = k_all.index_select(1, src)
            vt = v.transpose(1, 2)
            if plan.v_src[layer] is not None:
                vs = vt.index_select(1, plan.v_src[layer])
            else:
                vs = vt if J == 1 else vt.unsqueeze(2).expand(-1, -1, J, -1, -1)
            ns, width = lv.k.shape[1], lv.k.shape[2]
            lv.k.view(b, ns * width, d).index_copy_(1, lv.chunk_dest, ks.reshape(b, -1, d))
            lv.v.view(b, ns * width, d).index_copy_(1, lv.chunk_dest, vs.reshape(b, -1, d))
        if plan.grouped:  # sequences type by type: gather the queries, scatter the output back
            qs = q_r.transpose(1, 2) if J == 1 else \
                q_r.view(b, J, s // J, h, d).permute(0, 3, 1, 2, 4).reshape(b, h * J, s // J, d)
            if plan.q_src[layer] is not None:
                qs = qs.index_select(1, plan.q_src[layer])
            out = self.backend(LayerProblem(qs, lv.k, lv.v, lv.mask[p], lv.lengths[p], lv.runs[p], lv.starts))
            if plan.out_src[layer] is not None:
                out = out.index_select(1, plan.out_src[layer])
            if J == 1:
                return out.transpose(1, 2)
            return out.view(b, h, J, s // J, d).permute(0, 2, 3, 1, 4).reshape(b, s, h, d)
        if J == 1:
            out = self.backend(LayerProblem(q_r.transpose(1, 2), lv.k, lv.v, lv.mask[p], lv.lengths[p], lv.runs[p],
                                            lv.starts))
            return out.transpose(1, 2)
        qs = q_r.view(b, J, s // J, h, d).permute(0, 3, 1, 2, 4).reshape(b, h * J, s // J, d)
        out = self.backend(LayerProblem(qs, lv.k, lv.v, lv.mask[p], lv.lengths[p], lv.runs[p], lv.starts))
        return out.view(b, h, J, s // J, d).permute(0, 2, 3, 1, 4).reshape(b, s, h, d)
