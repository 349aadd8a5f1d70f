"""Cache policies: which history every attention head keeps, and at which positions.

A :class:`CachePolicy` is a small immutable object: a retention rule per head
*type*, a labels matrix saying which type each (layer, head) is, and a RoPE
re-encoding mode. Named presets build the published configurations::

    make_policy("pyramid_forcing")                     # paper defaults
    make_policy("head_forcing", labels=my_profile)     # types from a profile
    make_policy("sink_window", sink=3, recent=9)

Retention is expressed per head type as ``sink + middle + recent``: the first
``sink`` frames, the last ``recent`` frames of history, and a *middle* rule for
frames that fall out of the recent window (keep every n-th, keep a phase,
merge into pooled blocks, or fold into episodic memory). The current chunk
always attends to itself on top of that.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Mapping, Sequence, Union

from .errors import PolicyError

TRAINING_WINDOW = 21  # latent frames Self Forcing / Causal Forcing were trained on

ROPE_MODES = ("absolute", "window_clamp", "compact")

# ---------------------------------------------------------------------------------------------
# middle rules


@dataclass(frozen=True)
class Stride:
    """Keep evicted frames whose index is a multiple of ``every``; the newest ``cap``."""

    every: int = 6
    cap: int = 4


@dataclass(frozen=True)
class Cyclic:
    """Phase-matched memory for periodic ("wave") heads.

    Keeps the newest ``cap`` evicted frames whose index is a phase a chunk can
    start on (a multiple of gcd(frames_per_block, period)); a chunk starting at
    frame ``s`` attends to those with ``index ≡ s (mod period)``.
    """

    period: int = 6
    cap: int = 4


@dataclass(frozen=True)
class Merge:
    """Average blocks of ``block`` evicted frames, ``pool×pool`` spatially pooled; the newest ``cap`` blocks."""

    block: int = 4
    pool: int = 2
    cap: int = 4


@dataclass(frozen=True)
class Episodic:
    """Hierarchical episodic memory (Head Forcing's memory heads, our design).

    Evicted frames are pooled ``pool×pool``. A frame whose mean key is at least
    ``similarity`` cosine-similar to the open episode joins it (running mean);
    otherwise, or after a prompt switch, it opens a new episode. Past ``cap``
    episodes the two most similar neighbours merge.
    """

    cap: int = 8
    pool: int = 2
    similarity: float = 0.9


MiddleRule = Union[Stride, Cyclic, Merge, Episodic, None]


@dataclass(frozen=True)
class RetentionRule:
    """What one head type keeps: ``sink`` first frames + ``middle`` + ``recent`` last frames.

    ``recent=None`` keeps every frame (no eviction). With ``window=True`` the
    recent count includes the current chunk (Self Forcing's rolling window of
    21 frames = 18 history + 3 current).
    """

    sink: int = 0
    recent: int | None = None
    middle: MiddleRule = None
    window: bool = False

    def history_frames(self, frames_per_block: int) -> int | None:
        """Recent history frames kept besides the current chunk (None: all)."""
        if self.recent is None:
            return None
        return self.recent - frames_per_block if self.window else self.recent

    def validate(self, head_type: str, frames_per_block: int) -> None:
        where = f"head type {head_type!r}"
        if self.sink < 0:
            raise PolicyError(f"{where}: sink frames must be ≥ 0, got {self.sink}")
        if self.recent is not None:
            hist = self.history_frames(frames_per_block)
            if self.window and self.recent <= frames_per_block:
                raise PolicyError(
                    f"{where}: a window of {self.recent} frames is below one chunk of {frames_per_block} frames "
                    f"plus history; use at least {frames_per_block + 1}"
                )
            if hist is not None and hist < 1:
                raise PolicyError(
                    f"{where}: the policy keeps no recent frames; at least 1 is needed so motion carries "
                    "over from one chunk to the next"
                )
        elif self.middle is not None:
            raise PolicyError(f"{where}: a middle rule needs a bounded recent window (recent frames)")
        m = self.middle
        for name in ("every", "cap", "period", "block", "pool"):
            value = getattr(m, name, None)
            if value is not None and value < 1:
                raise PolicyError(f"{where}: {type(m).__name__}.{name} must be ≥ 1, got {value}")
        if isinstance(m, Episodic) and not (-1.0 <= m.similarity <= 1.0):
            raise PolicyError(f"{where}: episodic similarity must lie in [-1, 1], got {m.similarity}")

    def budget(self, frames_per_block: int, total_frames: int, tokens_of) -> "TokenBudget":
        """Tokens this rule stores and attends per head at steady state.

        ``stored`` includes the current chunk's slot and every preallocated tier
        (it mirrors the cache's capacities); ``attended`` is what a query of the
        current chunk sees. ``tokens_of(pool)`` is the token count of one frame
        pooled ``pool×pool`` (``tokens_of(1)``: a whole frame).
        """
        full = tokens_of(1)
        hist = self.history_frames(frames_per_block)
        if hist is None:
            return TokenBudget(total_frames * full, total_frames * full)
        stored = attended = (self.sink + hist + frames_per_block) * full
        m = self.middle
        if isinstance(m, Stride):
            stored += m.cap * full
            attended += m.cap * full
        elif isinstance(m, Cyclic):
            stored += m.cap * full
            # a chunk sees the stored frames of its own phase: a share of the reachable phases
            attended += m.cap * full * math.gcd(frames_per_block, m.period) // m.period
        elif isinstance(m, Merge):
            stored += (m.cap + 1) * tokens_of(m.pool)  # +1: the block being filled (not attended)
            attended += m.cap * tokens_of(m.pool)
        elif isinstance(m, Episodic):
            stored += (m.cap + 1) * tokens_of(m.pool)  # +1: headroom before two episodes merge
            attended += m.cap * tokens_of(m.pool)
        return TokenBudget(stored, attended)


@dataclass(frozen=True)
class TokenBudget:
    stored: int
    attended: int


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
                        f"(expected one of {', '.join(sorted(allowed))})"
                    )

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.types), len(self.types[0])

    def check_fits(self, num_layers: int, num_heads: int) -> None:
        if self.shape != (num_layers, num_heads):
            raise PolicyError(
                f"head labels are for a {self.shape[0]}-layer × {self.shape[1]}-head model but this model has "
                f"{num_layers} layers × {num_heads} heads; profile this model (Profile Heads) or pick a preset "
                "that fits it"
            )

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
                        f"unknown head label {key!r} at layer {li}, head {hi} (expected one of {', '.join(codes)})"
                    )
                names.append(codes[key])
            out.append(tuple(names))
        return cls(taxonomy, tuple(out), source)


PYRAMID_PRESET_SOURCE = (
    "Pyramid Forcing (IF-LAB-PKU/Pyramid-Forcing, configs/head_configs/best_labels.csv, Apache-2.0): "
    "Self Forcing / Wan2.1-T2V-1.3B"
)


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
    """A head-aware KV-cache policy: rules per head type, labels, RoPE mode."""

    preset: str
    rules: tuple[tuple[str, RetentionRule], ...]
    rope: str = "absolute"
    labels: HeadLabels | None = None
    window: int = TRAINING_WINDOW
    note: str = field(default="", compare=False)

    def __post_init__(self):
        if self.rope not in ROPE_MODES:
            raise PolicyError(f"unknown RoPE mode {self.rope!r}; choose one of {', '.join(ROPE_MODES)}")
        if self.window < 2:
            raise PolicyError(f"the RoPE window must be at least 2 frames, got {self.window}")
        if not self.rules:
            raise PolicyError("a policy needs at least one retention rule")

    @property
    def rule_map(self) -> dict[str, RetentionRule]:
        return dict(self.rules)

    @property
    def taxonomy(self) -> str:
        names = set(self.rule_map)
        for tax, types in TAXONOMIES.items():
            if names == set(types):
                return tax
        return "uniform" if names == {"all"} else "custom"

    def is_bounded(self) -> bool:
        return all(r.recent is not None for _, r in self.rules)

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

    def validate(self, frames_per_block: int) -> None:
        for t, r in self.rules:
            r.validate(t, frames_per_block)

    def with_labels(self, labels: HeadLabels) -> "CachePolicy":
        return replace(self, labels=labels, note="")


def _rules(**kw: RetentionRule) -> tuple[tuple[str, RetentionRule], ...]:
    return tuple(kw.items())


PRESETS = ("full", "self_forcing_window", "sink_window", "pyramid_forcing", "head_forcing")


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
        return (HeadLabels.uniform(num_layers, num_heads, "anchor", "pyramid_forcing", "uniform fallback"),
                f"labels: uniform fallback (every head 'anchor'): no published labels for a "
                f"{num_layers}×{num_heads} model; profile it with Profile Heads")
    return (HeadLabels.uniform(num_layers, num_heads, "memory", "head_forcing", "uniform fallback"),
            f"labels: uniform fallback (every head 'memory'): no profile for a {num_layers}×{num_heads} "
            "model; profile it with Profile Heads")


def make_policy(preset: str = "full", *, labels: HeadLabels | None = None, rope: str | None = None,
                sink: int | None = None, recent: int | None = None, window: int = TRAINING_WINDOW,
                rules: Mapping[str, RetentionRule] | None = None) -> CachePolicy:
    """Build a named preset, optionally overriding its rules, labels and RoPE mode.

    * ``full`` — keep everything at absolute positions (Self Forcing; ≤ 21 frames).
    * ``self_forcing_window`` — the last ``window`` frames incl. the current chunk, absolute positions.
    * ``sink_window`` — ``sink`` first + ``recent`` last frames for every head (LongLive style).
    * ``pyramid_forcing`` — Anchor / Wave / Veil rules of the paper, ``window_clamp`` RoPE.
    * ``head_forcing`` — Local / Anchor / Memory rules (our defaults), head-wise ``compact`` RoPE.

    ``labels`` may be left out for the typed presets: :func:`resolve_labels` picks
    the defaults for the model's shape at sampling time.
    """
    if preset == "full":
        r = _rules(all=RetentionRule())
        default_rope = "absolute"
    elif preset == "self_forcing_window":
        r = _rules(all=RetentionRule(recent=recent if recent is not None else window, window=True))
        default_rope = "absolute"
    elif preset == "sink_window":
        r = _rules(all=RetentionRule(sink=3 if sink is None else sink, recent=9 if recent is None else recent))
        default_rope = "window_clamp"
    elif preset == "pyramid_forcing":
        rec = 4 if recent is None else recent
        r = _rules(anchor=RetentionRule(sink=3 if sink is None else sink, recent=rec, middle=Stride(6, 4)),
                   wave=RetentionRule(sink=1, recent=rec, middle=Cyclic(6, 4)),
                   veil=RetentionRule(sink=3 if sink is None else sink, recent=rec, middle=Merge(4, 2, 4)))
        default_rope = "window_clamp"
    elif preset == "head_forcing":
        s = 3 if sink is None else sink
        r = _rules(local=RetentionRule(recent=2),
                   anchor=RetentionRule(sink=s, recent=2),
                   memory=RetentionRule(sink=s, recent=6 if recent is None else recent, middle=Episodic(8, 2, 0.9)))
        default_rope = "compact"
    else:
        raise PolicyError(f"unknown policy preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if rules:
        merged = dict(r)
        merged.update(rules)
        r = tuple(merged.items())
    if labels is not None and labels.taxonomy not in (preset, "uniform") and preset in ("pyramid_forcing", "head_forcing"):
        raise PolicyError(
            f"labels of the {labels.taxonomy} taxonomy cannot drive the {preset} policy; classify the "
            f"profile in the {preset} taxonomy (Classify Heads)"
        )
    return CachePolicy(preset=preset, rules=r, rope=rope or default_rope, labels=labels, window=window)


def resolve_labels(policy: CachePolicy, num_layers: int, num_heads: int) -> CachePolicy:
    """Fill in default labels for a typed preset given without a profile (noting what was used)."""
    if policy.labels is not None or set(policy.rule_map) == {"all"}:
        return policy
    if policy.preset not in ("pyramid_forcing", "head_forcing"):
        raise PolicyError(f"policy {policy.preset!r} needs a labels matrix")
    labels, note = default_labels(policy.preset, num_layers, num_heads)
    return replace(policy, labels=labels, note=note)


def describe(policy: CachePolicy) -> str:
    parts = []
    for t, r in policy.rules:
        bits = []
        if r.sink:
            bits.append(f"sink {r.sink}")
        if r.middle is not None:
            bits.append(type(r.middle).__name__.lower() + "(" + ", ".join(
                f"{k}={v}" for k, v in vars(r.middle).items()) + ")")
        bits.append("all frames" if r.recent is None else
                    (f"window {r.recent}" if r.window else f"recent {r.recent}"))
        parts.append(f"{t}: " + " + ".join(bits))
    return f"{policy.preset} [{policy.rope} RoPE] — " + "; ".join(parts)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gcd(a: int, b: int) -> int:
    return math.gcd(a, b)
