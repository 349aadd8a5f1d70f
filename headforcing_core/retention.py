"""What each retention rule keeps and attends, frame by frame (host-side bookkeeping, no tensors).

A :class:`Tracker` follows one head *type* through a run. Every head of that type, in
every layer, keeps the same frames (the rules depend on frame indices only; the
episodic memory's content-dependent decisions are taken on the device, see
:mod:`headforcing_core.cache`), so one tracker serves them all. For each chunk it
answers two questions:

* :meth:`Tracker.keys` — the *key set* of every query frame of the chunk, for the noisy
  passes and for the clean pass: which committed frames, merged blocks or episodic
  memory, and which frames of the chunk itself, each with its own time and the role the
  RoPE modes need (sink / recent / middle, rotated at the sink time or not);
* :meth:`Tracker.commit` — what the clean pass's commit changes: frames written, frames
  and blocks still held afterwards, frames accumulated into merge blocks, frames handed
  to the episodic memory.

Which tracker follows a rule is :data:`TRACKERS`, keyed by the rule's ``family``; how a
Pyramid Forcing middle is fed and read is :data:`PYRAMID_MIDDLES`, keyed by the middle's
``kind`` (one class per kind).

Because these are plain functions of frame indices they are checked, frame by frame,
against independent restatements of the references in ``tests/core``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .policies import Cyclic, Merge, PyramidMiddle, PyramidRule, RetentionRule, Rule, Stride


@dataclass(frozen=True)
class Key:
    """One entry of a key set.

    ``source``: ``"chunk"`` (frame ``index`` of the current chunk, 0-based), ``"frame"`` (a
    committed frame, absolute ``index``), ``"block"`` (merged block ``index``) or
    ``"episodes"`` (the head's whole episodic memory; its size and times live on the device).
    ``time``: the entry's own time (frame index; a block's time). ``role``: ``sink``,
    ``recent`` or ``middle``. ``anchor``: ``window_clamp`` rotates it at the query frame's sink
    time. ``spatial``: token positions of a pooled entry (``native`` for whole frames,
    ``top_left`` of each pooled window, or its ``centroid``); ``pool``: spatial pooling.
    """

    source: str
    index: int
    time: float
    role: str
    anchor: bool = False
    spatial: str = "native"
    pool: int = 1


@dataclass(frozen=True)
class ChunkKeys:
    """The key sets of a chunk: ``noisy[j]`` / ``clean[j]`` for query frame ``j`` of the chunk."""

    start: int
    frames: int
    noisy: tuple[tuple[Key, ...], ...]
    clean: tuple[tuple[Key, ...], ...]


@dataclass
class Commit:
    """What committing a chunk changes (see :meth:`Tracker.commit`)."""

    new_frames: list[int]
    keep_frames: set[int]
    merge_frames: list[int] = field(default_factory=list)
    completed_blocks: list[int] = field(default_factory=list)
    keep_blocks: list[int] = field(default_factory=list)
    to_episodes: list[tuple[int, bool]] = field(default_factory=list)  # (frame, opens a new episode)


def pages_at_commit(effects: Commit) -> set[int]:
    """Frames that need a page when a commit ends: those kept, and those read after the clean pass (merged
    into blocks, handed to the episodic memory)."""
    return set(effects.keep_frames) | set(effects.merge_frames) | {f for f, _ in effects.to_episodes}


def _frame_key(frame: int, chunk_start: int, role: str, anchor: bool = False) -> Key:
    if frame >= chunk_start:
        return Key("chunk", frame - chunk_start, float(frame), role, anchor)
    return Key("frame", frame, float(frame), role, anchor)


@dataclass(frozen=True)
class TokenBudget:
    """Tokens one head stores and attends (per query) at steady state; ``peak``: the most keys one
    query attends (the chunk included); ``before`` / ``after``: the most history tokens a plan lays
    out before the chunk's own keys (what every pass sees) and after them (what only the noisy
    passes see, and episodic slots)."""

    stored: float
    attended: float
    peak: float = 0.0
    before: float = 0.0
    after: float = 0.0
    history: float = 0.0  # the most history tokens one key set lays out (episode slots at capacity)


class Tracker:
    """Base class; one per head type."""

    rule: Rule
    frames_per_block: int

    def budget(self, total_frames: int, tokens_of, in_place: bool = False) -> TokenBudget:
        """Tokens one head of this type stores and attends at steady state (``tokens_of(pool)``: the tokens
        of one frame pooled ``pool×pool``; ``in_place``: the pool also holds the chunk, see
        :meth:`frame_capacity`)."""
        raise NotImplementedError

    def keys(self, start: int, frames: int) -> ChunkKeys:
        raise NotImplementedError

    def commit(self, start: int, frames: int) -> Commit:
        raise NotImplementedError

    def history_keys(self, start: int, frames: int) -> ChunkKeys:
        """Key sets for re-running committed frames ``[start, start + frames)`` (a recache): what is held
        now that is strictly older than ``start``, and the re-run frames themselves."""
        raise NotImplementedError

    def stored_frames(self) -> set[int]:
        raise NotImplementedError

    def frame_capacity(self, frames_per_block: int, total_frames: int, in_place: bool = False) -> int:
        """Whole-frame pages to preallocate. A pool read in place by attention (``in_place``) holds the
        chunk during its passes: the most frames held at once plus one chunk. Otherwise the chunk lives in
        the attention scratch and its clean pass writes the frames the commit keeps into the pages of the
        frames it evicts (:mod:`headforcing_core.plan`): the most pages a commit needs at once — the frames
        kept, plus the frames read after the pass (merged into blocks, handed to the episodic memory)."""
        raise NotImplementedError

    def block_capacity(self) -> int:
        return 0

    def on_prompt_switch(self, first_frame: int) -> None:
        """The prompt changes from ``first_frame`` on (only episodic memory reacts)."""

    def move_sinks(self, frames: list[int]) -> list[int] | None:
        """Make the first of ``frames`` the sink (LongLive's recache without a global sink); the new sinks,
        or None where the rule's sinks cannot move (no sink, keeps everything, or Pyramid Forcing's sinks
        captured from the first chunk)."""
        return None

    def state(self) -> dict:
        return copy.deepcopy({k: v for k, v in vars(self).items() if k not in ("rule", "frames_per_block")})

    def load_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, copy.deepcopy(v))


# ---------------------------------------------------------------------------------------------
# our rules: sink + recent ring (+ episodic memory)


class RetentionTracker(Tracker):
    """:class:`RetentionRule`: frames ``< sink`` are sinks; the newest ``history`` frames are the
    recent ring; frames leaving the ring go to the episodic memory (if any). Every query frame
    and both passes see the same set: sinks, episodes, recent, the whole chunk."""

    def __init__(self, rule: RetentionRule, frames_per_block: int):
        self.rule = rule
        self.frames_per_block = frames_per_block
        self.history = rule.history_frames(frames_per_block)  # None: keep everything
        self.committed = 0
        self.sinks: list[int] = []
        self.recent: list[int] = []
        self.switch_frames: list[int] = []

    def keys(self, start: int, frames: int) -> ChunkKeys:
        rule = self.rule
        ks: list[Key] = [Key("frame", f, float(f), "sink", True) for f in self.sinks]
        if rule.middle is not None:
            ks.append(Key("episodes", 0, -1.0, "middle", False, "centroid", rule.middle.pool))
        ks += [Key("frame", f, float(f), "recent") for f in self.recent]
        ks += [Key("chunk", j, float(start + j), "recent") for j in range(frames)]
        one = tuple(ks)
        return ChunkKeys(start, frames, (one,) * frames, (one,) * frames)

    def history_keys(self, start: int, frames: int) -> ChunkKeys:
        full = self.keys(start, frames).noisy[0]  # episodes are filtered on the device
        one = tuple(k for k in full if k.source != "frame" or k.index < start)
        return ChunkKeys(start, frames, (one,) * frames, (one,) * frames)

    def commit(self, start: int, frames: int) -> Commit:
        out = Commit(new_frames=list(range(start, start + frames)), keep_frames=set())
        for f in out.new_frames:
            if self.history is not None and f < self.rule.sink:
                self.sinks.append(f)
                continue
            if self.history is not None and len(self.recent) >= self.history:
                old = self.recent.pop(0)
                if self.rule.middle is not None:
                    # an episode never spans a prompt switch: evicting the first frame made under a
                    # new prompt (or any later one) opens a new episode
                    opens = any(b <= old for b in self.switch_frames)
                    self.switch_frames = [b for b in self.switch_frames if b > old]
                    out.to_episodes.append((old, opens))
            self.recent.append(f)
        self.committed = start + frames
        out.keep_frames = self.stored_frames()
        return out

    def stored_frames(self) -> set[int]:
        return set(self.sinks) | set(self.recent)

    def budget(self, total_frames: int, tokens_of, in_place: bool = False) -> TokenBudget:
        rule, frames_per_block = self.rule, self.frames_per_block
        full = tokens_of(1)
        hist = self.history
        if hist is None:
            everything = total_frames * full
            return TokenBudget(everything, everything, everything, everything - frames_per_block * full, 0,
                               everything - frames_per_block * full)
        attended = (rule.sink + hist + frames_per_block) * full
        stored = self.frame_capacity(frames_per_block, total_frames, in_place) * full
        peak, after = attended, 0
        if rule.middle is not None:
            stored += (rule.middle.cap + 1) * tokens_of(rule.middle.pool)  # +1: headroom before a merge
            attended += rule.middle.cap * tokens_of(rule.middle.pool)
            after = (rule.middle.cap + 1) * tokens_of(rule.middle.pool)  # the slots the plan lays out
            peak += after
        return TokenBudget(stored, attended, peak, (rule.sink + hist) * full, after, (rule.sink + hist) * full + after)

    def frame_capacity(self, frames_per_block: int, total_frames: int, in_place: bool = False) -> int:
        if self.history is None:
            return max(total_frames, 1)
        # the frames leaving the recent ring at a commit (up to one chunk) are read by the episodic memory
        # after the clean pass, so a memory keeps their pages until then
        headroom = frames_per_block if in_place or self.rule.middle is not None else 0
        return self.rule.sink + self.history + headroom

    def on_prompt_switch(self, first_frame: int) -> None:
        if self.rule.middle is not None:
            self.switch_frames.append(int(first_frame))

    def move_sinks(self, frames: list[int]) -> list[int] | None:
        if self.history is None or not self.rule.sink:
            return None
        self.sinks = list(frames[:self.rule.sink])
        return self.sinks


# ---------------------------------------------------------------------------------------------
# Pyramid Forcing


@dataclass
class _PyramidStores:
    sink_count: int | None = None  # sinks = frames [0, sink_count), fixed by the first chunk
    dynamic: list[int] = field(default_factory=list)  # the recent store, in store order
    stride: list[int] = field(default_factory=list)  # FIFO of strided frames
    cyclic: dict[int, list[int]] = field(default_factory=dict)  # phase -> newest frames of that phase
    blocks: list[int] = field(default_factory=list)  # completed merge blocks, oldest first
    partial: list[int] | None = None  # [block, frames seen] of the block being filled


class _MiddleStore:
    """How one kind of Pyramid Forcing middle is fed with committed frames and read by a query frame
    (its entries live in :class:`_PyramidStores`). ``period``: frames after which its pattern repeats;
    ``span``: frames after which it is full; ``merges``: it merges frames into blocks (the cache's
    block tier)."""

    merges = False

    def __init__(self, middle: PyramidMiddle):
        self.m = middle

    @property
    def period(self) -> int:
        raise NotImplementedError

    @property
    def span(self) -> int:
        raise NotImplementedError

    def feed(self, st: _PyramidStores, f: int) -> None:
        raise NotImplementedError

    def read(self, st: _PyramidStores, t: int, sink_max: int, recent_min: int) -> list[Key]:
        """The entries query frame ``t`` attends: newer than ``sink_max``, older than ``recent_min``."""
        raise NotImplementedError


class _StrideStore(_MiddleStore):
    m: Stride

    @property
    def period(self) -> int:
        return self.m.interval

    @property
    def span(self) -> int:
        return self.m.interval * (self.m.capacity + 1)

    def feed(self, st: _PyramidStores, f: int) -> None:
        if f % self.m.interval == 0:
            if f in st.stride:
                st.stride.remove(f)
            st.stride.append(f)
            if len(st.stride) > self.m.capacity:
                st.stride.pop(0)

    def read(self, st: _PyramidStores, t: int, sink_max: int, recent_min: int) -> list[Key]:
        return [Key("frame", a, float(a), "middle", True) for a in st.stride if sink_max < a < recent_min]


class _CyclicStore(_MiddleStore):
    m: Cyclic

    @property
    def period(self) -> int:
        return self.m.period

    @property
    def span(self) -> int:
        return self.m.period * (self.m.bucket_capacity + 1)

    def feed(self, st: _PyramidStores, f: int) -> None:
        bucket = st.cyclic.setdefault(f % self.m.period, [])
        bucket.append(f)
        del bucket[:-self.m.bucket_capacity]

    def read(self, st: _PyramidStores, t: int, sink_max: int, recent_min: int) -> list[Key]:
        return [Key("frame", a, float(a), "middle", True) for a in st.cyclic.get(t % self.m.period, [])
                if sink_max < a < recent_min]


class _MergeStore(_MiddleStore):
    m: Merge
    merges = True

    @property
    def period(self) -> int:
        return self.m.block_frames

    @property
    def span(self) -> int:
        return self.m.block_frames * (self.m.capacity + 2)

    def feed(self, st: _PyramidStores, f: int) -> None:
        n = self.m.block_frames
        if st.partial is None or st.partial[0] != f // n:
            st.partial = [f // n, 0]
        st.partial[1] += 1
        if st.partial[1] == n:
            st.blocks.append(st.partial[0])
            del st.blocks[:-self.m.capacity]
            st.partial = None

    def read(self, st: _PyramidStores, t: int, sink_max: int, recent_min: int) -> list[Key]:
        n = self.m.block_frames
        out = []
        for b in st.blocks:
            first, last = b * n, b * n + n - 1
            if first > sink_max and last < recent_min:
                out.append(Key("block", b, float((first + last) // 2), "middle", False, "top_left", self.m.patch))
        return out


# the Pyramid Forcing middles' bookkeeping by the middle's ``kind``
PYRAMID_MIDDLES: dict[str, type[_MiddleStore]] = {"Stride": _StrideStore, "Cyclic": _CyclicStore,
                                                  "Merge": _MergeStore}


def _middle_store(rule: PyramidRule) -> _MiddleStore:
    return PYRAMID_MIDDLES[rule.middle.kind](rule.middle)


class PyramidTracker(Tracker):
    """:class:`PyramidRule`: Pyramid Forcing's ``AdaptiveKVCache`` frame-level policy.

    Sources (IF-LAB-PKU/Pyramid-Forcing, ``pyramidkv/adaptive_cache.py`` unless noted):

    * sinks — ``_capture_sink_if_needed``: the first ``min(sink_frames, first chunk)`` frames,
      captured when ``current_start == 0`` only, rotated at the sink time;
    * recent — the dynamic store (``_append_dynamic``, ``_keep_dynamic_suffix``,
      ``_stride_frame_ids``): the newest ``recent_frames`` frames of the store *including the
      current chunk*; with the stable-stride policy also store positions ``0, interval, …``
      below the recent cut; absolute RoPE time;
    * middles — ``update()`` feeds every frame of the chunk to the strategy on the clean pass
      before that pass's readout (``cyclic.py`` / ``stride.py`` / ``merge.py``);
      ``_collect_middle_cache`` shows an entry to query frame ``t`` only when it is newer than
      ``sink_max_t = 0`` and older than ``recent_min_t = t - recent_frames + 1``.
    """

    def __init__(self, rule: PyramidRule, frames_per_block: int):
        self.rule = rule
        self.frames_per_block = frames_per_block
        self.middle = _middle_store(rule)
        self.committed = 0
        self.stores = _PyramidStores()

    def budget(self, total_frames: int, tokens_of, in_place: bool = False) -> TokenBudget:
        """Steady-state tokens per head: stored (distinct frames and blocks) and attended per query
        frame, averaged over the query frames of a chunk and the four noisy passes plus the clean pass."""
        b = pyramid_steady_budget(self.rule, self.frames_per_block, in_place)
        full, pooled = tokens_of(1), tokens_of(self.rule.middle.pool)
        tok = lambda frames_and_blocks: frames_and_blocks[0] * full + frames_and_blocks[1] * pooled  # noqa: E731
        return TokenBudget(tok(b.stored), tok(b.attended), tok(b.peak), tok(b.before), tok(b.after),
                           max(tok(h) for h in b.histories))


    # -- the stores after a chunk ----------------------------------------------------------
    def _after(self, start: int, frames: int) -> _PyramidStores:
        rule, st = self.rule, copy.deepcopy(self.stores)
        chunk = list(range(start, start + frames))
        if st.sink_count is None:  # the first chunk: capture the sinks from it
            st.sink_count = min(rule.sink_frames, frames)
        st.dynamic = self._trim(st.dynamic + [f for f in chunk if f >= st.sink_count])
        for f in chunk:  # every committed frame feeds the middle, sinks and recent frames included
            self.middle.feed(st, f)
        return st

    def _trim(self, store: list[int]) -> list[int]:
        """Pyramid Forcing's dynamic-store trim: the newest ``recent_frames`` (+ stride positions)."""
        n = len(store)
        recent = min(n, self.rule.recent_frames)
        cut = n - recent
        keep = list(range(cut, n))
        if self.rule.stable_stride:
            keep += list(range(0, cut, max(1, self.rule.middle.interval)))
        return [store[i] for i in sorted(set(keep))]

    def _middles(self, st: _PyramidStores, t: int, chunk_start: int) -> list[Key]:
        rule = self.rule
        sink_max = 0 if rule.sink_frames >= 1 else -1
        return self.middle.read(st, t, sink_max, t - rule.recent_frames + 1)

    def keys(self, start: int, frames: int) -> ChunkKeys:
        before, after = self.stores, self._after(start, frames)
        common = [_frame_key(f, start, "sink", True) for f in range(after.sink_count)]
        common += [_frame_key(f, start, "recent") for f in after.dynamic]
        noisy, clean = [], []
        for j in range(frames):
            t = start + j
            noisy.append(tuple(common + self._middles(before, t, start)))
            clean.append(tuple(common + self._middles(after, t, start)))
        return ChunkKeys(start, frames, tuple(noisy), tuple(clean))

    def history_keys(self, start: int, frames: int) -> ChunkKeys:
        st = self.stores
        sinks = st.sink_count or 0
        common = [_frame_key(f, start, "sink", True) for f in range(min(sinks, start))]
        common += [Key("frame", f, float(f), "recent") for f in st.dynamic if f < start]
        common += [Key("chunk", j, float(start + j), "sink" if start + j < sinks else "recent", start + j < sinks)
                   for j in range(frames)]
        sets = []
        for j in range(frames):
            middles = [k for k in self._middles(st, start + j, start)
                       if (k.index if k.source == "frame" else (k.index + 1) * self.rule.middle.block_frames - 1)
                       < start]
            sets.append(tuple(common + middles))
        return ChunkKeys(start, frames, tuple(sets), tuple(sets))

    def commit(self, start: int, frames: int) -> Commit:
        before_blocks = list(self.stores.blocks)
        self.stores = self._after(start, frames)
        self.committed = start + frames
        out = Commit(new_frames=list(range(start, start + frames)), keep_frames=self.stored_frames())
        if self.middle.merges:
            out.merge_frames = list(out.new_frames)
            out.completed_blocks = [b for b in self.stores.blocks if b not in before_blocks]
            out.keep_blocks = list(self.stores.blocks)
        return out

    def stored_frames(self) -> set[int]:
        st = self.stores
        held = set(range(st.sink_count or 0)) | set(st.dynamic) | set(st.stride)
        for bucket in st.cyclic.values():
            held |= set(bucket)
        return held

    def frame_capacity(self, frames_per_block: int, total_frames: int, in_place: bool = False) -> int:
        probe = PyramidTracker(self.rule, frames_per_block)
        most = 0
        for s in range(0, _steady_horizon(self.rule, frames_per_block), frames_per_block):
            held = len(probe.stored_frames())
            effects = probe.commit(s, frames_per_block)
            most = max(most, held + frames_per_block if in_place else len(pages_at_commit(effects)))
        return most

    def block_capacity(self) -> int:
        return self.rule.middle.block_capacity

    def state(self) -> dict:
        st = self.stores
        return {"committed": self.committed, "sink_count": st.sink_count, "dynamic": list(st.dynamic),
                "stride": list(st.stride), "cyclic": {str(k): list(v) for k, v in st.cyclic.items()},
                "blocks": list(st.blocks), "partial": None if st.partial is None else list(st.partial)}

    def load_state(self, state: dict) -> None:
        self.committed = int(state["committed"])
        self.stores = _PyramidStores(
            None if state["sink_count"] is None else int(state["sink_count"]),
            [int(f) for f in state["dynamic"]], [int(f) for f in state["stride"]],
            {int(k): [int(f) for f in v] for k, v in state["cyclic"].items()},
            [int(b) for b in state["blocks"]], None if state["partial"] is None else [int(x) for x in state["partial"]])


def _steady_horizon(rule: PyramidRule, frames_per_block: int) -> int:
    """Frames after which every Pyramid store has reached its periodic steady state (with margin)."""
    return 2 * (_middle_store(rule).span + rule.recent_frames + rule.sink_frames) + 24 * frames_per_block


@dataclass(frozen=True)
class SteadyBudget:
    """Per head at steady state, each as (whole frames, merged blocks): ``stored`` as allocated (the
    most frames held plus one chunk; blocks plus the one being filled); ``attended`` averaged over a
    whole number of periods, the query frames of each chunk and the passes (four noisy, one clean);
    ``peak`` the largest key set; ``before`` / ``after`` the most history a plan lays out before the
    chunk (seen by every pass) and after it (seen by the noisy passes only)."""

    stored: tuple[float, float]
    attended: tuple[float, float]
    peak: tuple[float, float]
    before: tuple[float, float]
    after: tuple[float, float]
    histories: tuple[tuple[int, int], ...] = ()  # every noisy history (frames, blocks) seen


def pyramid_steady_budget(rule: PyramidRule, frames_per_block: int, in_place: bool = False) -> SteadyBudget:
    f = frames_per_block
    probe = PyramidTracker(rule, f)
    horizon = _steady_horizon(rule, f)
    middle = _middle_store(rule)
    cycle = f * middle.period  # a whole number of chunks and of the middle's period
    attended = [0.0, 0.0]
    peak = before = after = (0, 0)
    samples = 0
    histories = set()

    def count(keys):
        hist = [k for k in keys if k.source != "chunk"]
        return (sum(1 for k in hist if k.source != "block"), sum(1 for k in hist if k.source == "block"))

    for s in range(0, horizon + cycle, f):
        if s >= horizon:
            ck = probe.keys(s, f)
            for noisy, clean in zip(ck.noisy, ck.clean):
                n, c = count(noisy), count(clean)
                histories.add(n)
                before = max(before, c)
                after = max(after, (n[0] - c[0], n[1] - c[1]))
                peak = max(peak, (n[0] + f, n[1]))
                for weight, (frames, blocks) in ((4, n), (1, c)):
                    attended[0] += weight * (frames + f)
                    attended[1] += weight * blocks
                    samples += weight
        probe.commit(s, f)
    stored = (float(probe.frame_capacity(f, horizon, in_place)),
              float(probe.block_capacity() + (1 if middle.merges else 0)))
    return SteadyBudget(stored, (attended[0] / samples, attended[1] / samples), peak, before, after,
                        tuple(sorted(histories)))


# the tracker that follows each rule, by the rule's ``family``
TRACKERS: dict[str, type[Tracker]] = {"retention": RetentionTracker, "pyramid": PyramidTracker}


def make_tracker(rule: Rule, frames_per_block: int) -> Tracker:
    return TRACKERS[rule.family](rule, frames_per_block)
