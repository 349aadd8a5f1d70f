"""Cache policies: which history every attention head keeps, and at which positions.

A :class:`CachePolicy` is a small immutable object: a retention rule per head
*type*, a labels matrix saying which type each (layer, head) is, and a RoPE
re-encoding mode. Named presets build the published configurations::

    make_policy("pyramid_forcing")                     # Pyramid Forcing's public code, its defaults
    make_policy("head_forcing", labels=my_profile)     # types from a profile
    make_policy("sink_window", sink=3, recent=9)

Two families of rules:

* :class:`RetentionRule` (ours; ``full``, ``self_forcing_window``, ``sink_window``,
  ``head_forcing``): the first ``sink`` frames, the last ``recent`` frames of history,
  and optionally an :class:`Episodic` memory of the frames that leave the recent
  window. The current chunk always attends to itself on top of that.
* :class:`PyramidRule` (``pyramid_forcing``): Pyramid Forcing's ``AdaptiveKVCache``
  semantics — sinks captured from the first chunk, a recent window that *counts the
  current chunk*, and one middle strategy (:class:`Stride`, :class:`Cyclic` or
  :class:`Merge`) fed with every committed frame and read per query frame. See
  ``docs/pyramid_forcing.md`` for the rules and their sources.

Each rule and middle class owns what it says about itself: its serialised name (``family`` /
``kind``, registered in :data:`RULE_FAMILIES` / :data:`MIDDLE_KINDS`), ``to_dict`` / ``from_dict``,
``validate``, ``describe``, and the properties the other modules ask (``bounded``,
``keys_in_place``, ``per_query_frame``, a middle's ``pool`` and ``block_capacity``). What a rule
keeps, frame by frame, is computed by :mod:`headforcing_core.retention` (a tracker per
``family``, a store per Pyramid middle ``kind``); what it stores on the device by
:mod:`headforcing_core.cache` (a tier per middle ``kind``).
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Mapping, Sequence, Union

from .errors import PolicyError

TRAINING_WINDOW = 21  # latent frames Self Forcing / Causal Forcing were trained on

# RoPE re-encoding modes (headforcing_core.positions):
#   absolute      every entry at its own frame time (Self Forcing)
#   window_clamp  Pyramid Forcing: sinks and stride/cyclic entries at the query frame's sink time
#   window_shift  ours: the visible window renumbered into the last `window` frames
#   compact       head-wise: retained entries renumbered in order, the chunk right after them
ROPE_MODES = ("absolute", "window_clamp", "window_shift", "compact")

# ---------------------------------------------------------------------------------------------
# middle strategies


class Middle:
    """What every middle strategy (the tier between a rule's sinks and its recent frames) says about
    itself. ``kind`` is its serialised name (AR_STATE files, profiles); ``positive``: its fields that
    must be whole numbers ≥ 1; ``pool``: its entries are pooled ``pool×pool`` (1: whole frames).
    How a middle is fed and read frame by frame lives in :mod:`headforcing_core.retention`, what it
    stores on the device in :mod:`headforcing_core.cache` (both keyed by ``kind``)."""

    kind = ""
    positive: tuple[str, ...] = ()
    pool = 1

    def validate(self, where: str) -> None:
        _positive(where, self, self.positive)

    def check_grid(self, where: str, grid: tuple[int, int]) -> None:
        """Refuse a token grid the middle cannot pool (most middles take any)."""

    def describe(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Episodic(Middle):
    """Hierarchical episodic memory (Head Forcing's memory heads, our design).

    Frames leaving the recent window are pooled ``pool×pool``. A frame whose mean key is at
    least ``similarity`` cosine-similar to the newest episode joins it (running mean);
    otherwise, or after a prompt switch, it opens a new episode. Past ``cap`` episodes the
    two most similar neighbours merge. Decisions are taken per batch row and per layer.
    """

    cap: int = 8
    pool: int = 2
    similarity: float = 0.9

    kind = "Episodic"
    positive = ("cap", "pool")

    def validate(self, where: str) -> None:
        super().validate(where)
        if not (-1.0 <= float(self.similarity) <= 1.0):
            raise PolicyError(f"{where}: episodic similarity must lie in [-1, 1], got {self.similarity}")

    def describe(self) -> str:
        return f"episodic memory ({self.cap} episodes, {self.pool}×{self.pool} pooled, similarity {self.similarity:g})"


class PyramidMiddle(Middle):
    """A Pyramid Forcing middle: ``block_capacity`` merged blocks it keeps (0: it keeps whole frames, in
    the frame pool); ``strided``: the stable-stride store policy applies to it."""

    block_capacity = 0
    strided = False


@dataclass(frozen=True)
class Stride(PyramidMiddle):
    """Pyramid Forcing's strided store (Anchor heads): committed frames whose index is a multiple
    of ``interval``, the newest ``capacity`` (FIFO, frame 0 included)."""

    interval: int = 6
    capacity: int = 4

    kind = "Stride"
    positive = ("interval", "capacity")
    strided = True

    def describe(self) -> str:
        return f"stride (every {self.interval}th frame, newest {self.capacity})"


@dataclass(frozen=True)
class Cyclic(PyramidMiddle):
    """Pyramid Forcing's periodic store (Wave heads): one bucket per phase ``frame mod period``,
    each keeping its newest ``bucket_capacity`` frames; a query frame reads its own phase's bucket."""

    period: int = 6
    bucket_capacity: int = 4

    kind = "Cyclic"
    positive = ("period", "bucket_capacity")

    def describe(self) -> str:
        return f"cyclic (period {self.period}, {self.bucket_capacity} per phase)"


@dataclass(frozen=True)
class Merge(PyramidMiddle):
    """Pyramid Forcing's merged store (Veil heads): blocks of ``patch²`` frames aligned to absolute
    frame indices, each the mean of its ``patch×patch`` spatial windows over those frames; the
    newest ``capacity`` completed blocks."""

    patch: int = 2
    capacity: int = 4

    kind = "Merge"
    positive = ("patch", "capacity")

    @property
    def block_frames(self) -> int:
        return self.patch * self.patch

    @property
    def pool(self) -> int:
        return self.patch

    @property
    def block_capacity(self) -> int:
        return self.capacity

    def check_grid(self, where: str, grid: tuple[int, int]) -> None:
        """A merge patch must divide the token grid (Pyramid Forcing pools whole windows)."""
        p = self.patch
        if grid[0] % p or grid[1] % p:
            raise PolicyError(
                f"{where}: the merge patch {p} does not divide the {grid[0]}×{grid[1]} token "
                f"grid of this video; use a width and height whose latent patch grid is a multiple of {p} "
                f"(multiples of {16 * p} pixels) or another merge patch")

    def describe(self) -> str:
        return f"merge ({self.block_frames}-frame blocks, {self.patch}×{self.patch} pooled, newest {self.capacity})"


# the middles by their serialised name (``kind``): the one place a new middle is registered
MIDDLE_KINDS: dict[str, type[Middle]] = {cls.kind: cls for cls in (Episodic, Stride, Cyclic, Merge)}


def _positive(where: str, obj: Middle, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise PolicyError(f"{where}: {obj.kind.lower()} {name.replace('_', ' ')} must be a whole "
                              f"number ≥ 1, got {value!r}")


# ---------------------------------------------------------------------------------------------
# retention rules


class RuleBase:
    """What every retention rule says about itself; each rule class below fills it in.

    ``family``: its serialised name; ``middles``: the kinds of middle it takes; ``bounded``:
    memory stays bounded however long the video runs; ``keys_in_place``: alone in an ``absolute``
    policy its keys never move (whole frames at their own time, one key set per chunk), so the
    cache can be read in place; ``per_query_frame``: its key sets can differ by query frame within
    a chunk. Which tracker follows it is :data:`headforcing_core.retention.TRACKERS` [``family``].
    """

    family = ""
    middles: tuple[str, ...] = ()
    per_query_frame = False

    @property
    def bounded(self) -> bool:
        raise NotImplementedError

    @property
    def keys_in_place(self) -> bool:
        raise NotImplementedError

    def validate(self, head_type: str, frames_per_block: int) -> None:
        raise NotImplementedError

    def check_grid(self, head_type: str, grid: tuple[int, int]) -> None:
        """Refuse a token grid the rule's middle cannot pool."""
        if self.middle is not None:
            self.middle.check_grid(f"head type {head_type!r}", grid)

    def describe(self) -> str:
        raise NotImplementedError

    def with_counts(self, sink: int | None, recent: int | None) -> "Rule":
        """The rule with its sink / recent counts replaced (None: keep) — the shared widgets of a preset."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The serialised form (AR_STATE files, profiles): ``family``, the fields, the middle with its ``kind``."""
        d = {"family": self.family, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        if self.middle is not None:
            d["middle"] = self.middle.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Rule":
        d = dict(d)
        d.pop("family", None)
        m = d.get("middle")
        if m is not None:
            m = dict(m)
            kind = MIDDLE_KINDS.get(m.pop("kind", None))
            if kind is None:
                raise PolicyError(f"unknown middle strategy in {d!r}")
            d["middle"] = kind(**m)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PolicyError(f"unknown retention rule field(s) {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass(frozen=True)
class RetentionRule(RuleBase):
    """What one head type keeps (our family): ``sink`` first frames + ``recent`` last frames
    (+ an :class:`Episodic` memory of frames leaving the recent window).

    ``recent=None`` keeps every frame (no eviction). With ``window=True`` the recent count
    includes the current chunk (Self Forcing's rolling window of 21 frames = 18 history + 3
    current).
    """

    sink: int = 0
    recent: int | None = None
    middle: Episodic | None = None
    window: bool = False

    family = "retention"
    middles = ("Episodic",)

    @property
    def bounded(self) -> bool:
        return self.recent is not None

    @property
    def keys_in_place(self) -> bool:
        return self.middle is None

    def history_frames(self, frames_per_block: int) -> int | None:
        """Recent history frames kept besides the current chunk (None: all)."""
        if self.recent is None:
            return None
        return self.recent - frames_per_block if self.window else self.recent

    def validate(self, head_type: str, frames_per_block: int) -> None:
        where = f"head type {head_type!r}"
        if not isinstance(self.sink, int) or self.sink < 0:
            raise PolicyError(f"{where}: sink frames must be a whole number ≥ 0, got {self.sink!r}")
        if self.recent is not None:
            if not isinstance(self.recent, int):
                raise PolicyError(f"{where}: recent frames must be a whole number, got {self.recent!r}")
            if self.window and self.recent <= frames_per_block:
                raise PolicyError(
                    f"{where}: a window of {self.recent} frames is below one chunk of {frames_per_block} frames "
                    f"plus history; use at least {frames_per_block + 1}")
            if self.history_frames(frames_per_block) < 1:
                raise PolicyError(
                    f"{where}: the policy keeps no recent frames; at least 1 is needed so motion carries "
                    "over from one chunk to the next")
        elif self.middle is not None:
            raise PolicyError(f"{where}: a middle rule needs a bounded recent window (recent frames)")
        if self.middle is not None:
            if getattr(self.middle, "kind", None) not in self.middles:
                raise PolicyError(f"{where}: {type(self.middle).__name__} is a Pyramid Forcing middle; use "
                                  "PyramidRule for it (our rules take an Episodic memory)")
            self.middle.validate(where)

    def describe(self) -> str:
        bits = [f"sink {self.sink}"] if self.sink else []
        if self.middle is not None:
            bits.append(self.middle.describe())
        bits.append("all frames" if self.recent is None else
                    (f"window {self.recent} (incl. the chunk)" if self.window else f"recent {self.recent}"))
        return " + ".join(bits)

    def with_counts(self, sink: int | None, recent: int | None) -> "RetentionRule":
        changes = {k: v for k, v in (("sink", sink), ("recent", recent)) if v is not None}
        return replace(self, **changes) if changes else self


@dataclass(frozen=True)
class PyramidRule(RuleBase):
    """Pyramid Forcing's per-head cache (``AdaptiveKVCache`` with its frame-level policy).

    * ``sink_frames``: the first frames of the video, captured from the first chunk only
      (``min(sink_frames, first chunk length)`` frames).
    * ``recent_frames``: the newest frames *including the current chunk* (4 with 3-frame
      chunks: one history frame plus the chunk).
    * ``middle``: a :class:`Stride`, :class:`Cyclic` or :class:`Merge` store fed with every
      committed frame on the clean pass; an entry is attended by query frame ``t`` only when
      it is newer than the sinks (``> 0``) and older than ``t - recent_frames + 1``.
    * ``stable_stride``: Pyramid Forcing's legacy stable-head store policy
      (``pyramidkv_stable_policy_enabled`` on strided heads): the recent store also keeps its
      entries at store positions ``0, interval, …`` below the recent cut — in practice the
      first non-sink frame, forever (frame 3 with 3-frame chunks).
    """

    sink_frames: int
    recent_frames: int
    middle: PyramidMiddle
    stable_stride: bool = False

    family = "pyramid"
    middles = ("Stride", "Cyclic", "Merge")
    per_query_frame = True
    bounded = True
    keys_in_place = False

    def validate(self, head_type: str, frames_per_block: int) -> None:
        where = f"head type {head_type!r}"
        if not isinstance(self.sink_frames, int) or self.sink_frames < 0:
            raise PolicyError(f"{where}: sink frames must be a whole number ≥ 0, got {self.sink_frames!r}")
        if not isinstance(self.recent_frames, int) or self.recent_frames <= frames_per_block:
            raise PolicyError(
                f"{where}: Pyramid Forcing's recent window counts the current chunk, so it must be above one "
                f"chunk of {frames_per_block} frames (at least {frames_per_block + 1}); got {self.recent_frames!r}")
        m = self.middle
        if getattr(m, "kind", None) not in self.middles:
            raise PolicyError(f"{where}: a Pyramid Forcing head needs a Stride, Cyclic or Merge middle, got "
                              f"{type(m).__name__}")
        m.validate(where)
        if self.stable_stride and not m.strided:
            raise PolicyError(f"{where}: the stable-stride store policy applies to strided (Anchor) heads only")

    def describe(self) -> str:
        return (f"sink {self.sink_frames} + {self.middle.describe()} + recent {self.recent_frames} (incl. the chunk)"
                + (" + first recent frame kept (stable-stride store)" if self.stable_stride else ""))

    def with_counts(self, sink: int | None, recent: int | None) -> "PyramidRule":
        changes = {k: v for k, v in (("sink_frames", sink), ("recent_frames", recent)) if v is not None}
        return replace(self, **changes) if changes else self


Rule = Union[RetentionRule, PyramidRule]

# the rules by their serialised name (``family``): the one place a new rule is registered
RULE_FAMILIES: dict[str, type[RuleBase]] = {cls.family: cls for cls in (RetentionRule, PyramidRule)}


def rule_from_dict(d: Mapping) -> Rule:
    """Inverse of :meth:`RuleBase.to_dict` (a missing ``family`` is ``retention``, as older files have it)."""
    d = dict(d)
    family = d.get("family", "retention")
    cls = RULE_FAMILIES.get(family)
    if cls is None:
        raise PolicyError(f"unknown retention rule family {family!r}")
    return cls.from_dict(d)


# ---------------------------------------------------------------------------------------------
# labels


TAXONOMIES: dict[str, tuple[str, ...]] = {
    "pyramid_forcing": ("anchor", "wave", "veil"),
    "head_forcing": ("local", "anchor", "memory"),
    "uniform": ("all",),
}

PYRAMID_CSV_CODES = {"-1": "wave", "1": "anchor", "2": "veil"}

# Stand-in mapping used by `head_forcing` until the user's model is profiled.
PYRAMID_TO_HEAD_FORCING = {"veil": "anchor", "anchor": "memory", "wave": "local"}


@dataclass(frozen=True)
class HeadLabels:
    """A layers × heads matrix of head-type names in one taxonomy."""

    taxonomy: str
    types: tuple[tuple[str, ...], ...]
    source: str = ""

    def __post_init__(self):
        if self.taxonomy not in TAXONOMIES:
            raise PolicyError(f"unknown taxonomy {self.taxonomy!r}; known: {', '.join(TAXONOMIES)}")
        if not self.types or not self.types[0]:
            raise PolicyError("a labels matrix needs at least one layer and one head")
        widths = {len(r) for r in self.types}
        if len(widths) != 1:
            raise PolicyError(f"labels matrix rows have different lengths: {sorted(widths)}")
        allowed = set(TAXONOMIES[self.taxonomy])
        for li, row in enumerate(self.types):
            for hi, t in enumerate(row):
                if t not in allowed:
                    raise PolicyError(
                        f"unknown head label {t!r} at layer {li}, head {hi} for taxonomy {self.taxonomy} "
                        f"(expected one of {', '.join(sorted(allowed))})")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.types), len(self.types[0])

    def check_fits(self, num_layers: int, num_heads: int) -> None:
        if self.shape != (num_layers, num_heads):
            raise PolicyError(
                f"head labels are for a {self.shape[0]}-layer × {self.shape[1]}-head model but this model has "
                f"{num_layers} layers × {num_heads} heads; profile this model (Profile Heads) or pick a preset "
                "that fits it")

    def counts(self) -> dict[str, int]:
        out = {t: 0 for t in TAXONOMIES[self.taxonomy]}
        for row in self.types:
            for t in row:
                out[t] += 1
        return out

    def mapped(self, taxonomy: str, mapping: Mapping[str, str], source: str) -> "HeadLabels":
        return HeadLabels(taxonomy, tuple(tuple(mapping[t] for t in row) for row in self.types), source)

    @classmethod
    def uniform(cls, num_layers: int, num_heads: int, head_type: str, taxonomy: str, source: str) -> "HeadLabels":
        return cls(taxonomy, tuple((head_type,) * num_heads for _ in range(num_layers)), source)

    @classmethod
    def from_codes(cls, rows: Sequence[Sequence[str | int]], taxonomy: str = "pyramid_forcing",
                   codes: Mapping[str, str] = PYRAMID_CSV_CODES, source: str = "") -> "HeadLabels":
        out = []
        for li, row in enumerate(rows):
            names = []
            for hi, c in enumerate(row):
                key = str(c).strip()
                if key not in codes:
                    raise PolicyError(
                        f"unknown head label {key!r} at layer {li}, head {hi} (expected one of {', '.join(codes)})")
                names.append(codes[key])
            out.append(tuple(names))
        return cls(taxonomy, tuple(out), source)


PYRAMID_PRESET_SOURCE = (
    "Pyramid Forcing (IF-LAB-PKU/Pyramid-Forcing, configs/head_configs/best_labels.csv, Apache-2.0): "
    "Self Forcing / Wan2.1-T2V-1.3B")


def pyramid_forcing_preset_labels() -> HeadLabels:
    """The per-head labels Pyramid Forcing publishes for Self Forcing (30 layers × 12 heads)."""
    text = resources.files("headforcing_core.presets").joinpath(
        "pyramid_forcing_self_forcing_1p3b_labels.csv").read_text()
    rows = [r for r in csv.reader(text.splitlines()) if r]
    return HeadLabels.from_codes(rows, source=PYRAMID_PRESET_SOURCE)


# ---------------------------------------------------------------------------------------------
# the policy


@dataclass(frozen=True)
class CachePolicy:
    """A head-aware KV-cache policy: rules per head type, labels, RoPE mode.

    ``window``: the frame range ``window_shift`` and ``compact`` renumber into (21, the
    training window). ``clamp_min`` / ``clamp_max``: ``window_clamp``'s sink-time clamp
    (Pyramid Forcing's ``sink_time_clamp_min`` / ``_max``: the sink time of query frame ``t``
    is ``max(0, t - clamp(t, clamp_min, clamp_max))``). ``unprofiled_rules``: rules that replace
    those of the same head type when the model has no labels and gets the uniform fallback
    (:func:`resolve_labels`; ``head_forcing``'s budget-matched memory heads).
    """

    preset: str
    rules: tuple[tuple[str, Rule], ...]
    rope: str = "absolute"
    labels: HeadLabels | None = None
    window: int = TRAINING_WINDOW
    clamp_min: int = 18
    clamp_max: int = 21
    unprofiled_rules: tuple[tuple[str, Rule], ...] = ()
    note: str = field(default="", compare=False)

    def __post_init__(self):
        if self.rope not in ROPE_MODES:
            raise PolicyError(f"unknown RoPE mode {self.rope!r}; choose one of {', '.join(ROPE_MODES)}")
        if not isinstance(self.window, int) or self.window < 2:
            raise PolicyError(f"the RoPE window must be at least 2 frames, got {self.window!r}")
        if not (isinstance(self.clamp_min, int) and isinstance(self.clamp_max, int)
                and 0 <= self.clamp_min <= self.clamp_max):
            raise PolicyError(f"window_clamp needs 0 ≤ clamp min ≤ clamp max, got {self.clamp_min!r} and "
                              f"{self.clamp_max!r}")
        if not self.rules:
            raise PolicyError("a policy needs at least one retention rule")

    @property
    def rule_map(self) -> dict[str, Rule]:
        return dict(self.rules)

    @property
    def taxonomy(self) -> str:
        names = set(self.rule_map)
        for tax, types in TAXONOMIES.items():
            if names == set(types):
                return tax
        return "custom"

    def head_types(self, num_layers: int, num_heads: int) -> tuple[tuple[str, ...], ...]:
        """The type of every (layer, head), checked against the model shape."""
        rules = self.rule_map
        if set(rules) == {"all"}:
            return tuple(("all",) * num_heads for _ in range(num_layers))
        if self.labels is None:
            raise PolicyError(f"policy {self.preset!r} needs a labels matrix (layers × heads)")
        self.labels.check_fits(num_layers, num_heads)
        missing = {t for row in self.labels.types for t in row} - set(rules)
        if missing:
            raise PolicyError(f"policy {self.preset!r} has no rule for head type(s) {', '.join(sorted(missing))}")
        return self.labels.types

    def is_bounded(self) -> bool:
        """Whether memory stays bounded however long the video runs (every rule evicts)."""
        return all(r.bounded for _, r in self.rules)

    def keys_stay_in_place(self) -> bool:
        """Whether keys never change position: one head type whose rule keeps its keys in place (ours
        without a middle), absolute RoPE. The cache then stores keys rotated at their own time and
        attention reads the pool in place (no per-chunk gather; :mod:`headforcing_core.plan`)."""
        rules = list(self.rule_map.values())
        return self.rope == "absolute" and len(rules) == 1 and rules[0].keys_in_place

    def key_sets_differ_by_query_frame(self, frames_per_block: int) -> bool:
        """Whether key sets can differ by query frame within a chunk (Pyramid Forcing's rules,
        ``window_clamp``): the plan then makes one sequence per (head, query frame)."""
        return frames_per_block > 1 and (self.rope == "window_clamp" or any(
            r.per_query_frame for r in self.rule_map.values()))

    def validate(self, frames_per_block: int) -> None:
        for t, r in self.rules + self.unprofiled_rules:
            if not isinstance(r, tuple(RULE_FAMILIES.values())):  # a guard on input, not a dispatch
                raise PolicyError(f"head type {t!r}: {type(r).__name__} is not a retention rule")
            r.validate(t, frames_per_block)

    def check_grid(self, grid: tuple[int, int]) -> None:
        for t, r in self.rules:
            r.check_grid(t, grid)

    def describe(self) -> str:
        clamp = f" (sink time t - clamp(t, {self.clamp_min}, {self.clamp_max}))" if self.rope == "window_clamp" else ""
        return f"{self.preset} [{self.rope} RoPE]{clamp} — " + "; ".join(f"{t}: {r.describe()}" for t, r in self.rules)


def describe(policy: CachePolicy) -> str:
    return policy.describe()


def policy_to_dict(policy: CachePolicy) -> dict:
    """The policy as JSON-able data (AR_STATE files): the one codec of a policy."""
    labels = None if policy.labels is None else {
        "taxonomy": policy.labels.taxonomy, "types": [list(row) for row in policy.labels.types],
        "source": policy.labels.source}
    d = {"preset": policy.preset, "rope": policy.rope, "window": policy.window, "clamp_min": policy.clamp_min,
         "clamp_max": policy.clamp_max, "note": policy.note,
         "rules": [[t, r.to_dict()] for t, r in policy.rules], "labels": labels}
    if policy.unprofiled_rules:  # only a policy not yet resolved against a model has them
        d["unprofiled_rules"] = [[t, r.to_dict()] for t, r in policy.unprofiled_rules]
    return d


def policy_from_dict(d: Mapping) -> CachePolicy:
    """Inverse of :func:`policy_to_dict` (:class:`PolicyError` for anything it cannot read)."""
    try:
        rules = tuple((str(t), rule_from_dict(r)) for t, r in d["rules"])
        unprofiled = tuple((str(t), rule_from_dict(r)) for t, r in d.get("unprofiled_rules", ()))
        lab = d.get("labels")
        labels = None if lab is None else HeadLabels(lab["taxonomy"], tuple(tuple(row) for row in lab["types"]),
                                                     lab.get("source", ""))
        return CachePolicy(preset=str(d["preset"]), rules=rules, rope=str(d["rope"]), labels=labels,
                           window=int(d["window"]), clamp_min=int(d.get("clamp_min", 18)),
                           clamp_max=int(d.get("clamp_max", 21)), unprofiled_rules=unprofiled,
                           note=str(d.get("note", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PolicyError(f"the policy record is unreadable ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# presets: a table of data


@dataclass(frozen=True)
class Preset:
    """A named configuration: rules per head type, the RoPE mode, the taxonomy its labels come from,
    and which of the shared ``sink`` / ``recent`` widgets each rule takes. ``recent_is_window``: with
    no ``recent`` given, the recent count is the policy's RoPE window (``self_forcing_window``).
    ``unprofiled``: rules that replace the same head types when a model without labels gets the
    uniform fallback (:func:`default_labels`), taking the shared widgets the same way."""

    rules: tuple[tuple[str, Rule, tuple[str, ...]], ...]
    rope: str
    taxonomy: str = "uniform"
    summary: str = ""
    recent_is_window: bool = False
    unprofiled: tuple[tuple[str, Rule, tuple[str, ...]], ...] = ()  # rules of the uniform fallback, same form


PRESET_TABLE: dict[str, Preset] = {
    "full": Preset((("all", RetentionRule(), ()),), "absolute",
                   summary="keep everything at absolute positions (Self Forcing; ≤ 21 frames)"),
    "self_forcing_window": Preset((("all", RetentionRule(recent=TRAINING_WINDOW, window=True), ("recent",)),),
                                  "absolute", summary="the last 21 frames incl. the chunk, absolute positions",
                                  recent_is_window=True),
    "sink_window": Preset((("all", RetentionRule(sink=3, recent=9), ("sink", "recent")),), "window_shift",
                          summary="3 sink + 9 recent frames for every head, renumbered into the last 21"),
    "longlive": Preset((("all", RetentionRule(sink=3, recent=6), ("sink", "recent")),), "absolute",
                       summary="LongLive's interactive window: 12 frames in all (local_attn_size) = 3 sink "
                               "frames + the 6 newest + the chunk, absolute positions"),
    "pyramid_forcing": Preset((("anchor", PyramidRule(3, 4, Stride(6, 4), stable_stride=True), ("sink", "recent")),
                               ("wave", PyramidRule(1, 4, Cyclic(6, 4)), ("recent",)),
                               ("veil", PyramidRule(3, 4, Merge(2, 4)), ("sink", "recent"))),
                              "window_clamp", "pyramid_forcing",
                              summary="Pyramid Forcing's AdaptiveKVCache with its default config"),
    "head_forcing": Preset((("local", RetentionRule(recent=2), ()),
                            ("anchor", RetentionRule(sink=3, recent=2), ("sink",)),
                            ("memory", RetentionRule(sink=3, recent=6, middle=Episodic(8, 2, 0.9)), ("sink", "recent"))),
                           "compact", "head_forcing",
                           summary="Local / Anchor / Memory heads (our defaults), head-wise compact RoPE",
                           # A model without a profile cannot say which heads are which, so every head gets
                           # what each type keeps: the anchors' 3 sinks, the memory's 8 episodes and the
                           # recent window of the local and anchor heads (2). Its cache then holds about what
                           # the reported split's does: per head 3 sink + 2 recent + 3 pages in flight to the
                           # episodes + 9 quarter-frame episode slots (8 + 1 before a merge) = 10.25 frames,
                           # against 0.25·5 + 0.15·2 + 0.6·14.25 = 10.1 (with the memory heads' own 6 recent
                           # frames: 14.25, 1.4×).
                           unprofiled=(("memory", RetentionRule(sink=3, recent=2, middle=Episodic(8, 2, 0.9)),
                                        ("sink", "recent")),)),
}
PRESETS = tuple(PRESET_TABLE)


UNIFORM_FALLBACK = "uniform fallback"  # the source of the labels a model without a profile gets


def default_labels(preset: str, num_layers: int, num_heads: int) -> tuple[HeadLabels, str]:
    """Labels used when a preset is given no profile, with a note saying what they are.

    Pyramid Forcing's published Self Forcing labels for 30×12 models; a uniform
    fallback (every head ``anchor`` / ``memory``) for any other shape.
    """
    if (num_layers, num_heads) == (30, 12):
        pyr = pyramid_forcing_preset_labels()
        if preset == "pyramid_forcing":
            return pyr, "labels: Pyramid Forcing's published Self Forcing labels"
        return (pyr.mapped("head_forcing", PYRAMID_TO_HEAD_FORCING,
                           "stand-in derived from " + PYRAMID_PRESET_SOURCE),
                "labels: STAND-IN derived from Pyramid Forcing's Self Forcing labels (veil→anchor, "
                "anchor→memory, wave→local) until this model is profiled with Profile Heads")
    if preset == "pyramid_forcing":
        return (HeadLabels.uniform(num_layers, num_heads, "anchor", "pyramid_forcing", UNIFORM_FALLBACK),
                f"labels: uniform fallback (every head 'anchor'): no published labels for a "
                f"{num_layers}×{num_heads} model; profile it with Profile Heads")
    return (HeadLabels.uniform(num_layers, num_heads, "memory", "head_forcing", UNIFORM_FALLBACK),
            f"labels: uniform fallback (every head 'memory'): no profile for a {num_layers}×{num_heads} "
            "model; profile it with Profile Heads")


def make_policy(preset: str = "full", *, labels: HeadLabels | None = None, rope: str | None = None,
                sink: int | None = None, recent: int | None = None, window: int = TRAINING_WINDOW,
                rules: Mapping[str, Rule] | None = None, clamp_min: int = 18,
                clamp_max: int = 21) -> CachePolicy:
    """Build a named preset (:data:`PRESET_TABLE`), optionally overriding rules, labels and RoPE mode.

    ``sink`` / ``recent`` override the preset's sink and recent counts where it has them
    (``self_forcing_window``: ``recent`` is its window incl. the chunk; ``pyramid_forcing``:
    ``sink`` applies to the 3-sink Anchor / Veil heads, ``recent`` to every type);
    ``rules`` replaces whole rules by head type (with or without a profile). ``labels`` may be
    left out for the typed presets: :func:`resolve_labels` picks the defaults for the model's
    shape at sampling time, and with them the preset's ``unprofiled`` rules where it has them.
    """
    spec = PRESET_TABLE.get(preset)
    if spec is None:
        raise PolicyError(f"unknown policy preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if spec.recent_is_window and recent is None:
        recent = window
    # the shared sink / recent widgets apply to the rules that take them
    def counted(table):
        return tuple((t, rule.with_counts(sink if "sink" in takes else None, recent if "recent" in takes else None))
                     for t, rule, takes in table)

    r, unprofiled = counted(spec.rules), counted(spec.unprofiled)
    if rules:
        merged = dict(r)
        merged.update(rules)
        r = tuple(merged.items())
        # a rule given whole is the user's choice, with or without a profile
        unprofiled = tuple((t, rule) for t, rule in unprofiled if t not in rules)
    if labels is not None and spec.taxonomy != "uniform" and labels.taxonomy not in (spec.taxonomy, "uniform"):
        raise PolicyError(
            f"labels of the {labels.taxonomy} taxonomy cannot drive the {preset} policy; classify the "
            f"profile in the {preset} taxonomy (Classify Heads)")
    return CachePolicy(preset=preset, rules=r, rope=rope or spec.rope, labels=labels, window=window,
                       clamp_min=clamp_min, clamp_max=clamp_max, unprofiled_rules=unprofiled)


def resolve_labels(policy: CachePolicy, num_layers: int, num_heads: int) -> CachePolicy:
    """Fill in default labels for a typed preset given without a profile (noting what was used).

    With the uniform fallback the policy's ``unprofiled_rules`` replace its rules of the same
    type; the resolved policy carries none (what it runs is in ``rules``)."""
    if policy.labels is not None or set(policy.rule_map) == {"all"}:
        return policy
    if policy.preset not in ("pyramid_forcing", "head_forcing"):
        raise PolicyError(f"policy {policy.preset!r} needs a labels matrix")
    labels, note = default_labels(policy.preset, num_layers, num_heads)
    rules = policy.rules
    if labels.source == UNIFORM_FALLBACK and policy.unprofiled_rules:
        fallback = dict(policy.unprofiled_rules)
        rules = tuple((t, fallback.get(t, r)) for t, r in rules)
        note += "; " + ", ".join(f"{t} heads: {r.describe()}" for t, r in policy.unprofiled_rules) + \
            " (the fallback's budget: a layer holds no more than with Head Forcing's reported split)"
    return replace(policy, labels=labels, rules=rules, unprofiled_rules=(), note=note)


def with_episodic(policy: CachePolicy, cap: int | None = None, similarity: float | None = None) -> CachePolicy:
    """The policy with the episodic memory of its memory rules retuned (None: keep), with or
    without a profile (``rules`` and ``unprofiled_rules`` alike)."""
    def tuned(table):
        out = []
        for t, r in table:
            if isinstance(r, RetentionRule) and isinstance(r.middle, Episodic):
                changes = {k: v for k, v in (("cap", cap), ("similarity", similarity)) if v is not None}
                r = replace(r, middle=replace(r.middle, **changes))
            out.append((t, r))
        return tuple(out)

    return replace(policy, rules=tuned(policy.rules), unprofiled_rules=tuned(policy.unprofiled_rules))
