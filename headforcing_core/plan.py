"""Plan once per chunk, run every layer and every model call with it (FlashInfer's plan/run split).

:func:`plan_chunk` decides, once per chunk, what every (layer, head, query frame) attends
and at which RoPE time, and lays it out as **metadata** on the device — no key is copied:

* each head type's key sets come from its tracker (:mod:`headforcing_core.retention`),
  the times from the policy's RoPE mode (:mod:`headforcing_core.positions`);
* when every type's key sets are the same for all query frames (the common case) a head
  is one *sequence* whose queries are the whole chunk; otherwise (Pyramid Forcing) each
  (head, query frame) is its own sequence;
* every sequence is laid out right-aligned in a key axis of ``L`` positions, the chunk's own
  keys last (so one slice copy writes them for every sequence)::

      [pad | noisy-only entries or episode slots | re-timed entries | own-time entries | chunk]

  The clean pass starts after the noisy-only entries; episodes are right-aligned in their
  slots, the valid ones last, so every pass is a window ``[start, L)`` per sequence (device
  starts where the episodic memory decides them);
* one *table row* per sequence layout (a type × query-frame class; for episodic memory one
  per batch row and layer, whose episodes live on the device) gives, for every position, the
  arena row (:mod:`headforcing_core.cache`) relative to its head's run, and the factor that
  re-times its key;
* what the clean pass commits: the arena rows each layer's kept chunk frames are written to.

:class:`~headforcing_core.chunk_attention.ChunkAttention` runs every layer of one model call with the
plan (the *run* half).

Policies whose keys never move (``absolute`` RoPE, one head type, no middle: ``full``,
``self_forcing_window``, ``longlive``) skip the gather: their pool is itself the attention
buffer, the chunk's pages written in place by every call (``prerotated``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import KEY_ALIGN, Run, bias, window_bias
from .cache import HeadwiseKVCache, TypeStore
from .positions import key_times, map_times
from .retention import ChunkKeys, Key
from .rope import ChunkRotation, axis_pairs, inverse_frequencies, pooled_grid

PASSES = ("noisy", "clean")


@dataclass
class Segment:
    """One head type × query-frame class of a chunk: its key list, laid out (see the module docstring)."""

    store: TypeStore
    cls: int  # query-frame class: 0 when key sets are shared by the chunk, else the query frame
    chunk_variant: int
    noisy_only: list[Key]  # entries the clean pass drops (time order)
    retimed: list[Key]  # clean-visible entries read at another time than their own (device times: all of them)
    own: list[Key]  # clean-visible entries read at their own time
    times: dict[Key, float]  # read time of every host-timed entry
    device_times: bool  # whole frames' times decided on the device (compact / window_shift with episodes)
    episodes: Key | None = None
    listing: tuple = ()  # (source, index, role, time) of every noisy key, for listings and tests

    @property
    def history(self) -> list[Key]:
        return self.noisy_only + self.retimed + self.own


@dataclass
class LayerViews:
    """What one layer's attention reads (prerotated pools: views of the pool; packed: the shared scratch)."""

    k: torch.Tensor  # [B, NS, L, D]
    v: torch.Tensor
    mask: dict[str, torch.Tensor | None]
    lengths: dict[str, torch.Tensor | None]
    runs: dict[str, tuple[Run, ...]]
    starts: dict[str, torch.Tensor | None] = field(default_factory=dict)
    k_pages: torch.Tensor | None = None  # prerotated: the layer's rows of the pool [B, H, P, T, D]
    v_pages: torch.Tensor | None = None


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
    rerun: bool = False  # a re-run of committed frames (recache), planned from given key sets
    # ---- prerotated pools
    chunk_pages: torch.Tensor | None = None  # the pages the chunk's frames are written to
    key_frames: torch.Tensor | None = None  # frame of each attended key (-1: none), observers
    # ---- packed layouts (metadata; the data is gathered per layer call)
    width: int = 0  # L: keys per sequence
    span: int = 0  # positions [0, span) may hold re-timed keys (0: nothing to re-time)
    sequences: int = 0  # NS
    rows_table: torch.Tensor | None = None  # [B, rows, L] arena row of every position, relative to its head's run
    factor_table: torch.Tensor | None = None  # [B, rows, span] factor re-timing every position of the span
    factors: torch.Tensor | None = None  # [n, time pairs] complex: row 0 the identity
    seq_row: list[torch.Tensor] = field(default_factory=list)  # per layer [NS]: table row of each sequence
    head_base: list[torch.Tensor] = field(default_factory=list)  # per layer [1, NS, 1]: arena row of its head
    scratch: torch.Tensor | None = None  # [2, B, NS, L, D] the gathered keys and values
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)  # pass -> [layers, B|1, NS]
    starts: dict[str, torch.Tensor] = field(default_factory=dict)
    q_src: list[torch.Tensor | None] = field(default_factory=list)  # grouped: per layer seq -> head·J + class
    out_src: list[torch.Tensor | None] = field(default_factory=list)
    chunk_src: list[torch.Tensor | None] = field(default_factory=list)  # per layer: seq -> variant·H + head
    v_src: list[torch.Tensor | None] = field(default_factory=list)  # per layer: seq -> head (grouped order)
    natural_chunk: bool = True  # every sequence sees the chunk at its own frames, sequences head-major
    commit_dest: torch.Tensor | None = None  # [B, P]: arena row (first token) of every layer's kept frames
    commit_src: torch.Tensor | None = None  # [B, P]: their row in the source
    commit_ranges: list[tuple[int, int] | None] = field(default_factory=list)  # per layer: its range of P
    commit_from_scratch: bool = True  # the source is the scratch's chunk (else the chunk's K/V rotated apart)
    query_buffer: torch.Tensor | None = None  # [B, H, S, D] rotated queries, viewed per query frame (classes > 1)
    dims: tuple = ()  # (batch, heads, head_dim, dtype, device) of the scratch

    def bind(self) -> None:
        """Allocate the scratch (one layer's keys and values, shared by every layer and call of the chunk)."""
        if self.prerotated or self.scratch is not None:
            return
        B, H, D, dtype, dev = self.dims
        self.scratch = torch.empty(2, B, self.sequences, self.width, D, dtype=dtype, device=dev)
        if self.classes > 1:
            self.query_buffer = torch.empty(B, H, self.frames * self.tokens, D, dtype=dtype, device=dev)
        for lv in self.layers:
            lv.k, lv.v = self.scratch[0], self.scratch[1]

    def release(self) -> None:
        """Free the scratch once the chunk is done (the metadata stays for listings and tests)."""
        if self.prerotated:
            return
        self.scratch = self.query_buffer = None
        for lv in self.layers:
            lv.k = lv.v = None

    def listing(self, head_type: str, query_frame: int = 0, pass_: str = "noisy") -> list[tuple]:
        """``[(source, index, role, rope_time)]`` of a type's key set (episodes: time None)."""
        for seg in self.segments:
            if seg.store.head_type == head_type and seg.cls == (query_frame if self.classes > 1 else 0):
                rows = list(seg.listing)
                if pass_ == "clean":
                    dropped = {(k.source, k.index) for k in seg.noisy_only}
                    rows = [r for r in rows if (r[0], r[1]) not in dropped]
                return rows
        raise KeyError(head_type)

    @property
    def gathered_bytes(self) -> int:
        """K/V bytes one model call gathers from the arena (every layer; the plan itself copies none)."""
        if self.prerotated:
            return 0
        b, _, d, dtype, _ = self.dims
        return 2 * b * self.sequences * self.width * d * (torch.finfo(dtype).bits // 8) * len(self.layers)

    def bytes_per_layer_call(self) -> dict[str, int]:
        """Bytes a layer call moves outside attention and the matmuls, by byte count: the gather (arena rows
        read, scratch written, its row indices), the re-timing of the span (time channels read and written in
        the compute precision, their factors gathered), the chunk's K/V written into every sequence."""
        b, h, d, dtype, _ = self.dims if self.dims else (0, 0, 0, torch.bfloat16, None)
        size = torch.finfo(dtype).bits // 8
        if self.prerotated:
            k = self.layers[0].k_pages
            return {"gather": 0, "retime": 0, "chunk": 2 * k.shape[0] * k.shape[1] * self.frames * self.tokens
                    * k.shape[-1] * k.element_size()}
        ns, w = self.sequences, self.width
        gather = 2 * (2 * b * ns * w * d * size) + b * ns * w * 8 * 2  # K, V read and written; rows made and read
        compute = 8 if dtype == torch.float64 else 4
        pairs = axis_pairs(d)[0]
        keys = b * ns * self.span
        retime = keys * (pairs * 2 * compute * 2 + 8)  # factors gathered (written, read) and their indices
        retime += keys * 2 * pairs * (compute * 2 + (2 * size + 2 * compute if size != compute else 0))
        chunk = 2 * b * ns * self.frames * self.tokens * d * size
        return {"gather": int(gather), "retime": int(retime), "chunk": int(chunk)}

    def chunk_write_bytes(self) -> int:
        """K/V bytes one model call writes (the chunk's own keys and values into every sequence)."""
        if self.prerotated:
            k = self.layers[0].k_pages  # [B, H, pages, tokens, D]
            b, ns, d, size = k.shape[0], k.shape[1], k.shape[-1], k.element_size()
        else:
            b, _, d, dtype, _ = self.dims
            ns, size = self.sequences, torch.finfo(dtype).bits // 8
        return 2 * b * ns * self.frames * self.tokens * d * size * len(self.layers)

    def attended_tokens(self, pass_: str = "noisy") -> float:
        """Mean keys a query token attends, over every head (episodic memory: as held now)."""
        if self.prerotated:
            lv = self.layers[0]
            return float(lv.k.shape[2] if lv.mask[pass_] is None else (lv.mask[pass_] == 0).sum())
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


def plan_chunk(cache: HeadwiseKVCache, rope: str, window: int, clamp_min: int, clamp_max: int, start: int,
               frames: int, *, keys: dict[str, ChunkKeys] | None = None, episodes_before: int | None = None,
               gather_prerotated: bool = False, grouped: bool = False) -> ChunkPlan:
    """Plan the chunk ``[start, start + frames)`` (its pages decided by :meth:`HeadwiseKVCache.reserve`).

    ``keys`` (default: each tracker's :meth:`keys`) may be given to plan a re-run (recache): its clean
    pass then rewrites the re-run frames wherever they are held whole; ``episodes_before`` hides
    episodes holding frames at or after it; ``gather_prerotated`` builds a packed layout even for a pool
    read in place (recache); ``grouped`` orders each layer's sequences type by type (the grouped backend
    runs one call per type).
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
            ep = next((k for k in ks if k.source == "episodes"), None)
            dev_t = ep is not None and device_times
            hist = [k for k in ks if k.source in ("frame", "block")]
            if not set(k for k in clean if k.source in ("frame", "block")) <= set(hist):
                raise AssertionError("a clean pass may only drop entries of the noisy passes")  # holds for every rule
            kept = set(clean)
            by_time = lambda k: (k.time, k.source, k.index)  # noqa: E731 - time order, as a pool holds them
            noisy_only = sorted((k for k in hist if k not in kept), key=by_time)
            visible = sorted((k for k in hist if k in kept), key=by_time)
            if ep is not None and noisy_only:  # both passes see the episodes: nothing may sit before them
                raise AssertionError(f"{ts.head_type}: episodic memory with entries the clean pass drops")
            retimed = [k for k in visible if dev_t or times[k] != k.time]
            own = [k for k in visible if not (dev_t or times[k] != k.time)]
            segments.append(Segment(ts, c, variants.index(vt), noisy_only, retimed, own, times, dev_t, ep,
                                    tuple((k.source, k.index, k.role, times.get(k)) for k in ks)))
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
    attended = sorted([pool.page_of[k.index] for k in seg.history] + pages)
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
        plan.layers.append(LayerViews(k.flatten(2, 3)[:, :, :width], v.flatten(2, 3)[:, :, :width],
                                      {p: mask for p in PASSES}, {p: None for p in PASSES}, {p: run for p in PASSES},
                                      {p: None for p in PASSES}, k, v))


# ---------------------------------------------------------------------------------------------
# packed layout: metadata once per chunk, one layer's keys gathered at each layer call


def _static_layout(cache: HeadwiseKVCache, plan: ChunkPlan):
    """Sequence order and the index tensors that depend only on the layout (memoised on the cache)."""
    key = (plan.classes, plan.grouped, tuple((id(s.store), s.cls, s.chunk_variant) for s in plan.segments))
    memo = cache.__dict__.setdefault("_layout_memo", {})
    if key in memo:
        return memo[key]
    H, J, layers = cache.num_heads, plan.classes, cache.num_layers
    NS = H * J
    order = []  # per layer: [(segment index, head)]
    for li in range(layers):
        row = []
        for si, seg in enumerate(plan.segments):
            row += [(si, h) for (l_, h) in seg.store.heads if l_ == li]
        if not plan.grouped:  # natural order: head-major, then class (no permutation of q or of the output)
            row.sort(key=lambda sh: (sh[1], plan.segments[sh[0]].cls))
        order.append(row)
    up = _Upload()
    q_src, out_src, chunk_src, v_src, head_at = [], [], [], [], []
    natural = not plan.grouped and all(s.chunk_variant == 0 for s in plan.segments)
    for li in range(layers):
        q = [h * J + plan.segments[si].cls for si, h in order[li]]
        inv = [0] * NS
        for i, s in enumerate(q):
            inv[s] = i
        q_src.append(None if q == list(range(NS)) else up.long(q))
        out_src.append(None if q == list(range(NS)) else up.long(inv))
        chunk_src.append(None if natural else up.long([plan.segments[si].chunk_variant * H + h
                                                       for si, h in order[li]]))
        v_src.append(up.long([h for _, h in order[li]]) if plan.grouped else None)
        head_at.append(up.long([plan.segments[si].store.base
                                + cache.slot_of[(li, h)][1] * plan.segments[si].store.head_rows
                                for si, h in order[li]]))
    longs, _ = up.send(cache.device)
    pick = lambda sl: None if sl is None else longs[sl]  # noqa: E731
    out = dict(order=order, natural=natural, q_src=[pick(x) for x in q_src], out_src=[pick(x) for x in out_src],
               chunk_src=[pick(x) for x in chunk_src], v_src=[pick(x) for x in v_src],
               head_base=[longs[x].view(1, NS, 1) for x in head_at])
    memo[key] = out
    return out


@dataclass
class _Run:
    """Consecutive positions of one table row: ``length`` keys at arena rows ``offset…`` (relative to the
    head's run; None: padding) re-timed by factor ``factor`` (None: decided on the device)."""

    row: int
    position: int
    length: int
    offset: int
    factor: int | None


def _layout_packed(plan: ChunkPlan, cache: HeadwiseKVCache, rope: str, window: int, cmin: int, cmax: int,
                   start: int, frames: int, episodes_before: int | None) -> None:
    B, H, D, T = cache.batch, cache.num_heads, cache.head_dim, cache.tokens
    layers, dev = cache.num_layers, cache.device
    S = frames * T
    J = plan.classes
    NS = H * J
    static = _static_layout(cache, plan)
    plan.q_src, plan.out_src = static["q_src"], static["out_src"]
    plan.chunk_src, plan.v_src = static["chunk_src"], static["v_src"]
    plan.natural_chunk = static["natural"]
    plan.head_base = static["head_base"]
    plan.sequences = NS
    # ---- sizes: every sequence right-aligned, the chunk last ------------------------------------
    tokens_of = {}  # (source, pool) -> tokens of one entry

    def n_tokens(k: Key) -> int:
        if (k.source, k.pool) not in tokens_of:
            ph, pw = pooled_grid(*cache.grid, k.pool)
            tokens_of[(k.source, k.pool)] = ph * pw
        return tokens_of[(k.source, k.pool)]

    def ep_slots_tokens(seg: Segment) -> int:
        ep = seg.store.episodes
        return ep.slots * ep.k.shape[3] if seg.episodes is not None else 0

    hist_len = [sum(n_tokens(k) for k in seg.history) + ep_slots_tokens(seg) for seg in plan.segments]
    width = max(hist_len) + S
    masked = len(set(hist_len)) > 1 or any(seg.noisy_only or seg.episodes is not None for seg in plan.segments)
    if masked:  # masked SDPA kernels want the key axis aligned (the padding goes first: sequences end together)
        width = -(-width // KEY_ALIGN) * KEY_ALIGN
    retimes = any(seg.retimed or seg.noisy_only or seg.episodes is not None for seg in plan.segments)
    span = width - S if retimes else 0
    plan.width, plan.span = width, span
    # ---- table rows: host-known runs, then the episodic rows (one per batch row and layer) ------------
    up = _Upload()
    runs: list[_Run] = []
    host_deltas: dict[float, int] = {0.0: 0}  # time difference -> factor row (0: identity)

    def factor_of(k: Key, seg: Segment) -> int | None:
        if seg.device_times and k.source == "frame":
            return None
        delta = seg.times[k] - k.time
        return host_deltas.setdefault(delta, len(host_deltas))

    seg_row: dict[int, int] = {}  # segment -> its (first) table row
    episodic: list[int] = []  # segments whose rows are per (batch row, layer)
    n_rows = 0
    starts_of: dict[str, list[int]] = {p: [] for p in PASSES}  # per host row: start of each pass (episodes: slots)
    for si, seg in enumerate(plan.segments):
        seg_row[si] = n_rows
        pos = width - S - hist_len[si]
        noisy_start = pos
        if seg.episodes is not None:
            episodic.append(si)
            pos += ep_slots_tokens(seg)  # the episode slots come first; filled on the device
        for k in seg.history:
            n = n_tokens(k)
            if k.source == "frame":
                offset = seg.store.frames.page_of[k.index] * T
            else:
                offset = seg.store.block_offset + seg.store.blocks.page_of[k.index] * n
            runs.append(_Run(n_rows, pos, n, offset, factor_of(k, seg)))
            pos += n
        assert pos == width - S, (pos, width, S)
        clean_start = noisy_start + sum(n_tokens(k) for k in seg.noisy_only)
        starts_of["noisy"].append(noisy_start)
        starts_of["clean"].append(clean_start)
        n_rows += 1
    host_rows = n_rows
    ep_rows: dict[int, int] = {}  # episodic segment -> first of its (layer) rows
    for si in episodic:
        ep_rows[si] = n_rows
        n_rows += plan.segments[si].store.episodes.layers
    # ---- the tables: [B, rows, width] arena offsets, [B, rows, span] factor indices ----------------------
    run_at = up.long([x for r in runs for x in (r.row, r.position, r.length, r.offset,
                                                  -1 if r.factor is None else r.factor)])
    ep_keys_at = {si: (up.double([k.time for k in plan.segments[si].history]),
                       up.long([k.role == "sink" for k in plan.segments[si].history]),
                       up.long([k.anchor for k in plan.segments[si].history])) for si in episodic}
    seg_rows_at = up.long([seg_row[si] for si in range(len(plan.segments))])
    delta_at = up.double(sorted(host_deltas, key=host_deltas.get))
    starts_at = {p: up.long(starts_of[p]) for p in PASSES}
    longs, doubles = up.send(dev)
    table = torch.zeros(B, n_rows, width, dtype=torch.int64, device=dev)
    ftable = torch.zeros(B, n_rows, span, dtype=torch.int64, device=dev) if span else None
    if runs:
        r = longs[run_at].view(-1, 5)
        lengths = r[:, 2]
        total = sum(x.length for x in runs)
        first_of_run = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(total, device=dev) - first_of_run.repeat_interleave(lengths, output_size=total)
        row = r[:, 0].repeat_interleave(lengths, output_size=total)
        pos = r[:, 1].repeat_interleave(lengths, output_size=total) + within
        table[:, row, pos] = r[:, 3].repeat_interleave(lengths, output_size=total) + within
        if span:
            fac = r[:, 4].repeat_interleave(lengths, output_size=total)
            host_fac = fac >= 0
            ftable[:, row[host_fac], pos[host_fac]] = fac[host_fac]
    # the batch rows of the arena (the table's offsets are relative to one batch row's heads)
    table += (torch.arange(B, device=dev) * cache.rows).view(B, 1, 1)
    factors = [_factors(doubles[delta_at], cache)]  # host factor rows first: their indices are final
    n_factors = len(host_deltas)
    starts = {p: longs[starts_at[p]].view(1, host_rows).expand(B, -1) for p in PASSES}
    starts = {p: torch.cat([s, torch.zeros(B, n_rows - host_rows, dtype=torch.int64, device=dev)], 1)
              for p, s in starts.items()}
    for si in episodic:
        seg = plan.segments[si]
        rows = slice(ep_rows[si], ep_rows[si] + seg.store.episodes.layers)
        own_at, sink_at, anchor_at = ep_keys_at[si]
        times, slot_off, valid_n = _episodes(seg, rope, window, cmin, cmax, start, frames, episodes_before,
                                             doubles[own_at], longs[sink_at].bool(), longs[anchor_at].bool())
        lm = seg.store.episodes.layers
        noisy_start = width - S - hist_len[si]
        ep_len = ep_slots_tokens(seg)
        table[:, rows] = table[:, seg_row[si]:seg_row[si] + 1]
        table[:, rows, noisy_start:noisy_start + ep_len] = \
            slot_off + (torch.arange(B, device=dev) * cache.rows).view(B, 1, 1)
        # factors on the device: the episodes' read times (stored un-timed), the frames' time differences
        dev_rows = times.shape[-1]  # per (b, layer): [frames..., episode slots...] in layout order
        idx = n_factors + torch.arange(B * lm * dev_rows, device=dev).view(B, lm, dev_rows)
        factors.append(_factors(times.reshape(-1), cache))
        n_factors += B * lm * dev_rows
        if span:
            ep_tok = seg.store.episodes.k.shape[3]
            n_frames = dev_rows - seg.store.episodes.slots
            ftable[:, rows] = ftable[:, seg_row[si]:seg_row[si] + 1]
            ftable[:, rows, noisy_start:noisy_start + ep_len] = idx[:, :, n_frames:].repeat_interleave(ep_tok, dim=-1)
            if seg.device_times:  # whole frames re-timed on the device: one factor each, T tokens each
                at = noisy_start + ep_len
                ftable[:, rows, at:at + n_frames * T] = idx[:, :, :n_frames].repeat_interleave(T, dim=-1)
        ep_start = (noisy_start + ep_len - valid_n * seg.store.episodes.k.shape[3])  # [B, Lm]
        for p_ in PASSES:
            starts[p_][:, rows] = ep_start
    plan.rows_table, plan.factor_table = table, ftable
    plan.factors = torch.cat(factors) if len(factors) > 1 else factors[0]
    # ---- per (layer, sequence): table row, starts and lengths of each pass ----------------------------
    seq_rows = []
    for li in range(layers):
        row = []
        for si, h in static["order"][li]:
            if si in ep_rows:
                row.append(ep_rows[si] + plan.segments[si].store.episodes.layer_ids.index(li))
            else:
                row.append(seg_row[si])
        seq_rows.append(row)
    up = _Upload()
    rows_at = up.long([x for row in seq_rows for x in row])
    longs, _ = up.send(dev)
    all_rows = longs[rows_at]
    plan.seq_row = list(all_rows.view(layers, NS).unbind(0))
    for p in PASSES:
        st = starts[p].index_select(1, all_rows).view(B, layers, NS).transpose(0, 1)  # [layers, B, NS]
        if not episodic:
            st = st[:, :1]
        plan.starts[p] = st
        plan.lengths[p] = width - st
    # ---- the masks (padded / grouped backends), the runs (grouped); the scratch ---------------------------
    host_starts = {p: [[starts_of[p][si] if si not in ep_rows else None for si, _ in static["order"][li]]
                       for li in range(layers)] for p in PASSES}
    masks = {}
    for p in PASSES:
        uniform = not episodic and all(s == 0 for row in host_starts[p] for s in row)
        masks[p] = None if uniform else window_bias(plan.starts[p], plan.lengths[p], width, cache.dtype)
    # per-layer views made with one op per tensor (unbind), not one per layer
    per_layer = {p: (plan.starts[p].unbind(0), plan.lengths[p].unbind(0),
                     [None] * layers if masks[p] is None else masks[p].unbind(0)) for p in PASSES}
    for li in range(layers):
        runs_p = {}
        for p in PASSES:
            if plan.grouped:
                runs_p[p] = tuple(_merge_runs([
                    Run(n, n + 1, width - (s if s is not None else 0), s is None, s if s is not None else 0)
                    for n, s in enumerate(host_starts[p][li])]))
            else:
                runs_p[p] = (Run(0, NS, width, masks[p] is not None),)
        plan.layers.append(LayerViews(
            None, None, {p: per_layer[p][2][li] for p in PASSES}, {p: per_layer[p][1][li] for p in PASSES}, runs_p,
            {p: per_layer[p][0][li] for p in PASSES}))
    plan.dims = (B, H, D, cache.dtype, dev)
    plan.bind()
    _plan_commit(plan, cache, static, start, frames)


def _factors(deltas: torch.Tensor, cache: HeadwiseKVCache) -> torch.Tensor:
    """Complex rotation factors ``exp(i·ω·Δt)`` of the time channels for time differences ``deltas`` ``[n]``."""
    ft = inverse_frequencies(cache.head_dim)[0].to(deltas.device)
    angles = deltas.to(torch.float64).unsqueeze(-1) * ft
    f = torch.polar(torch.ones_like(angles), angles)
    return f.to(torch.complex128 if cache.dtype == torch.float64 else torch.complex64)


def _episodes(seg: Segment, rope, window, cmin, cmax, start, frames, episodes_before, own_frames, sinks, anchors):
    """The episodic memory of a segment as laid out this chunk, on the device, per (batch row, layer):
    ``times`` ``[B, Lm, frames + slots]`` — the time difference each whole frame is re-timed by, then
    each slot position's read time (valid episodes right-aligned, in time order); ``slot_offsets``
    ``[B, Lm, slots·tokens]`` — the arena offset (in its head's run) of each position of the episode
    slots; ``valid`` ``[B, Lm]`` — episodes held. ``own_frames`` / ``sinks`` / ``anchors``: the whole frames' own
    times and roles (device tensors, uploaded with the plan)."""
    ep = seg.store.episodes
    valid = ep.valid if episodes_before is None else ep.valid & (ep.last < episodes_before)
    big = torch.iinfo(torch.int64).max
    order = torch.argsort(torch.where(valid, ep.first, big), dim=-1, stable=True)  # valid first, by time
    n_valid = valid.sum(-1)  # [B, Lm]
    c = ep.slots
    rank = torch.arange(c, device=valid.device) - (c - n_valid).unsqueeze(-1)  # right-aligned
    held = rank >= 0
    slot = order.gather(-1, rank.clamp(min=0))  # [B, Lm, C]
    own = ep.times().gather(-1, slot)
    ep_tok = ep.k.shape[3]
    offsets = seg.store.episode_offset + slot * ep_tok
    offsets = (offsets.unsqueeze(-1) + torch.arange(ep_tok, device=valid.device)).flatten(-2)
    b, lm, _ = valid.shape
    dev = valid.device
    if seg.device_times:
        n = own_frames.shape[0]  # the whole frames, in layout order
        own_all = torch.cat([own_frames.expand(b, lm, n), own], dim=-1)
        none = torch.zeros(c, dtype=torch.bool, device=dev)
        sink, anchor = torch.cat([sinks, none]), torch.cat([anchors, none])
        valid_all = torch.cat([torch.ones(b, lm, n, dtype=torch.bool, device=dev), held], dim=-1)
        mapped = map_times(rope, own_all, is_chunk=torch.zeros_like(sink), is_sink=sink, is_anchor=anchor,
                           valid=valid_all, chunk_start=start, frames=frames, query_frame=start, window=window,
                           clamp_min=cmin, clamp_max=cmax)
        frame_delta, ep_time = mapped[..., :n] - own_frames, mapped[..., n:]
    else:  # episodes at their own time (mean frame), whole frames by the host
        frame_delta = torch.zeros(b, lm, 0, dtype=torch.float64, device=dev)
        ep_time = own
    return torch.cat([frame_delta, ep_time], dim=-1), offsets, n_valid


def _merge_runs(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for r in runs:
        last = out[-1] if out else None
        if last is not None and (last.masked, last.length, last.start, last.end) == (r.masked, r.length, r.start, r.first):
            out[-1] = Run(last.first, r.end, r.length, r.masked, r.start)
        else:
            out.append(r)
    return out


def _plan_commit(plan: ChunkPlan, cache: HeadwiseKVCache, static: dict, start: int, frames: int) -> None:
    """Where the clean pass writes each layer's kept frames: the pages :meth:`HeadwiseKVCache.reserve`
    decided (a re-run: the pages of the re-run frames held whole), from the scratch's chunk (its keys at
    their own times) or, when some sequence sees the chunk at other times, from the chunk's own K/V."""
    B, H, T, J = cache.batch, cache.num_heads, cache.tokens, plan.classes
    NS, W, S = plan.sequences, plan.width, frames * T
    plan.commit_from_scratch = plan.natural_chunk
    seq_of_head = {}
    for li in range(cache.num_layers):
        for n, (si, h) in enumerate(static["order"][li]):
            if plan.segments[si].cls == 0:
                seq_of_head[(li, h)] = n
    up = _Upload()
    dest, src, ranges = [], [], []
    for li in range(cache.num_layers):
        first = len(dest)
        for h in range(H):
            ti, hidx = cache.slot_of[(li, h)]
            ts = cache.types[ti]
            pages = ts.frames.page_of if plan.rerun else ts.frames.pending
            for j in range(frames):
                page = pages.get(start + j)
                if page is None:
                    continue
                dest.append(ts.base + hidx * ts.head_rows + page * T)
                if plan.commit_from_scratch:
                    src.append(seq_of_head[(li, h)] * W + (W - S) + j * T)
                else:  # the chunk's K/V [B, H, S, D]
                    src.append(h * S + j * T)
        ranges.append((first, len(dest)))
    if not dest:
        plan.commit_ranges = [None] * cache.num_layers
        return
    dest_at, src_at = up.long(dest), up.long(src)
    longs, _ = up.send(cache.device)
    batch = torch.arange(B, device=cache.device).view(B, 1)
    src_rows = NS * W if plan.commit_from_scratch else H * S
    # every layer's rows in one tensor each (its batch rows' offsets added once); a layer reads its range
    plan.commit_dest = longs[dest_at].view(1, -1) + batch * cache.rows
    plan.commit_src = longs[src_at].view(1, -1) + batch * src_rows
    plan.commit_ranges = [r if r[1] > r[0] else None for r in ranges]
