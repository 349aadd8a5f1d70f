"""Turn per-head statistics into labels of either taxonomy (no rollout needed).

Head Forcing taxonomy (local / anchor / memory) — a ranking recipe:

1. rank every head of the model by its **sink mass** (attention mass on the first
   ``sink_frames`` frames, see :mod:`.stats`); the top ``anchor_fraction`` (25 %) are
   **anchor** heads;
2. rank the remaining heads by their **current-chunk mass**; the top ``local_fraction``
   (20 %) of them are **local** heads;
3. every other head is a **memory** head.

Counts are ``floor(fraction × heads + ½)``. Ties are broken by (layer, head) order, so the
result is deterministic; a head with an undefined statistic (NaN) ranks last.

Pyramid Forcing taxonomy (anchor / wave / veil) — rules, first match wins:

1. **wave** (oscillating) if its centred logit as a function of frame age is periodic with
   a short period: the dominant period of ``logit_by_age`` is between 2 and
   ``period_threshold`` (6.4) frames, that sinusoid explains at least
   ``min_period_strength`` (50 %) of the detrended sequence's variance and has an amplitude
   of at least ``min_period_amplitude`` (0.05 logits), **and** the sign rate alternates: along
   the ages whose sign rate is decided (≥ ``sign_threshold`` = 80 % positive or ≤ 20 %), the
   majority sign changes at least ``min_sign_flips`` (2) times;
2. **veil** (stable-sparse: initial + adjacent frames) if the middle frames (history that is
   neither sink nor within ``recent_frames`` of the chunk) get at most
   ``veil_middle_ratio`` (½) of the mass uniform attention would give them — the head's
   mass concentrates on the sink frames, the adjacent frames and the current chunk;
3. **anchor** (stable, broad long-range context) otherwise.

6.4 frames sits just above 2π ≈ 6.28, the period of the fastest temporal RoPE pair (1 rad
per frame): heads dominated by it oscillate with that period.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..errors import ProfileError
from ..policies import TAXONOMIES, HeadLabels
from .stats import HeadSummary

CLASSIFIED_TAXONOMIES = ("head_forcing", "pyramid_forcing")


@dataclass(frozen=True)
class HeadForcingThresholds:
    anchor_fraction: float = 0.25
    local_fraction: float = 0.20
    sink_frames: int = 3
    recent_frames: int = 4  # only shapes the summary; the recipe itself uses sink and current mass

    def validate(self) -> None:
        for name in ("anchor_fraction", "local_fraction"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0) or math.isnan(v):
                raise ProfileError(f"{name} must lie in [0, 1], got {v}")
        _check_frames(self.sink_frames, self.recent_frames)


@dataclass(frozen=True)
class PyramidThresholds:
    sign_threshold: float = 0.80
    period_threshold: float = 6.4
    min_period_strength: float = 0.5
    min_period_amplitude: float = 0.05
    min_sign_flips: int = 2
    veil_middle_ratio: float = 0.5
    sink_frames: int = 3
    recent_frames: int = 4

    def validate(self) -> None:
        if not (0.5 < self.sign_threshold <= 1.0):
            raise ProfileError(f"sign_threshold must lie in (0.5, 1], got {self.sign_threshold}")
        if not (self.period_threshold >= 2.0):
            raise ProfileError(f"period_threshold must be ≥ 2 frames, got {self.period_threshold}")
        if not (0.0 <= self.min_period_strength <= 1.0):
            raise ProfileError(f"min_period_strength must lie in [0, 1], got {self.min_period_strength}")
        if not (self.min_period_amplitude >= 0.0):
            raise ProfileError(f"min_period_amplitude must be ≥ 0, got {self.min_period_amplitude}")
        if self.min_sign_flips < 0:
            raise ProfileError(f"min_sign_flips must be ≥ 0, got {self.min_sign_flips}")
        if not (self.veil_middle_ratio >= 0.0):
            raise ProfileError(f"veil_middle_ratio must be ≥ 0, got {self.veil_middle_ratio}")
        _check_frames(self.sink_frames, self.recent_frames)


THRESHOLD_TYPES = {"head_forcing": HeadForcingThresholds, "pyramid_forcing": PyramidThresholds}


def _check_frames(sink: int, recent: int) -> None:
    if sink < 0 or recent < 0:
        raise ProfileError(f"sink_frames and recent_frames must be ≥ 0, got {sink} and {recent}")


def thresholds_for(taxonomy: str, values: dict | None = None):
    """Threshold object of ``taxonomy`` from a (possibly partial) dict; unknown keys are refused."""
    if taxonomy not in THRESHOLD_TYPES:
        raise ProfileError(f"cannot classify heads in taxonomy {taxonomy!r}; choose one of "
                           f"{', '.join(CLASSIFIED_TAXONOMIES)}")
    cls = THRESHOLD_TYPES[taxonomy]
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ProfileError(f"unknown {taxonomy} threshold(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    th = cls(**values)
    th.validate()
    return th


def thresholds_dict(th) -> dict:
    return asdict(th)


def _count(fraction: float, n: int) -> int:
    return min(n, int(math.floor(fraction * n + 0.5)))


def _rank(values: np.ndarray, candidates: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Candidates sorted by value, highest first; NaN last; ties by (layer, head)."""
    def key(lh):
        v = float(values[lh])
        return (1, 0.0, lh) if math.isnan(v) else (0, -v, lh)
    return sorted(candidates, key=key)


def classify_head_forcing(summary: HeadSummary, th: HeadForcingThresholds | None = None,
                          source: str = "") -> HeadLabels:
    th = th or HeadForcingThresholds()
    th.validate()
    L, H = summary.sink_mass.shape
    heads = [(li, hi) for li in range(L) for hi in range(H)]
    ranked = _rank(summary.sink_mass, heads)
    n_anchor = _count(th.anchor_fraction, len(heads))
    anchors = set(ranked[:n_anchor])
    rest = [lh for lh in heads if lh not in anchors]
    ranked_local = _rank(summary.current_mass, rest)
    locals_ = set(ranked_local[:_count(th.local_fraction, len(rest))])
    types = tuple(tuple("anchor" if (li, hi) in anchors else "local" if (li, hi) in locals_ else "memory"
                        for hi in range(H)) for li in range(L))
    return HeadLabels("head_forcing", types, source)


def sign_flips(sign_rates: np.ndarray, threshold: float) -> int:
    """Changes of the decided majority sign along ages (undecided and unobserved ages skipped)."""
    signs = [1 if s >= threshold else -1 for s in sign_rates
             if np.isfinite(s) and (s >= threshold or s <= 1.0 - threshold)]
    return sum(1 for a, b in zip(signs, signs[1:]) if a != b)


def pyramid_decisions(summary: HeadSummary, th: PyramidThresholds) -> dict[str, np.ndarray]:
    """The per-head tests of the Pyramid rules (boolean arrays) and the numbers behind them."""
    L, H = summary.sink_mass.shape
    flips = np.zeros((L, H), dtype=np.int64)
    for li in range(L):
        for hi in range(H):
            flips[li, hi] = sign_flips(summary.sign_rate_by_age[li, hi, 1:], th.sign_threshold)
    period = summary.period
    with np.errstate(invalid="ignore"):
        periodic = (np.isfinite(period) & (period >= 2.0 - 1e-9) & (period <= th.period_threshold)
                    & (summary.period_strength >= th.min_period_strength)
                    & (summary.period_amplitude >= th.min_period_amplitude))
        middle_ratio = np.where(summary.middle_uniform > 0,
                                summary.middle_mass / np.where(summary.middle_uniform > 0, summary.middle_uniform, 1),
                                np.nan)
    wave = periodic & (flips >= th.min_sign_flips)
    sparse = np.isfinite(middle_ratio) & (middle_ratio <= th.veil_middle_ratio)
    return {"wave": wave, "veil": ~wave & sparse, "periodic": periodic, "sign_flips": flips,
            "middle_ratio": middle_ratio}


def classify_pyramid(summary: HeadSummary, th: PyramidThresholds | None = None, source: str = "") -> HeadLabels:
    th = th or PyramidThresholds()
    th.validate()
    if not np.isfinite(summary.middle_uniform).any() or not (np.nan_to_num(summary.middle_uniform) > 0).any():
        raise ProfileError(
            f"the profile never saw a middle frame (history older than {th.recent_frames} recent frames and "
            f"after {th.sink_frames} sink frames), so veil heads cannot be told from anchor heads: profile "
            "with more frames (21) or lower sink_frames / recent_frames"
        )
    d = pyramid_decisions(summary, th)
    L, H = summary.sink_mass.shape
    types = tuple(tuple("wave" if d["wave"][li, hi] else "veil" if d["veil"][li, hi] else "anchor"
                        for hi in range(H)) for li in range(L))
    return HeadLabels("pyramid_forcing", types, source)


CLASSIFIERS = {"head_forcing": classify_head_forcing, "pyramid_forcing": classify_pyramid}


def label_codes(labels: HeadLabels) -> np.ndarray:
    """``[layers, heads]`` int8 codes: the index of each label in ``TAXONOMIES[taxonomy]``."""
    order = TAXONOMIES[labels.taxonomy]
    return np.array([[order.index(t) for t in row] for row in labels.types], dtype=np.int8)


def labels_from_codes(codes: np.ndarray, taxonomy: str, source: str = "") -> HeadLabels:
    if taxonomy not in TAXONOMIES:
        raise ProfileError(f"unknown taxonomy {taxonomy!r} in profile")
    order = TAXONOMIES[taxonomy]
    if codes.ndim != 2 or codes.size == 0:
        raise ProfileError(f"labels of {taxonomy} have shape {tuple(codes.shape)}; expected [layers, heads]")
    if codes.min() < 0 or codes.max() >= len(order):
        raise ProfileError(f"labels of {taxonomy} hold codes outside 0..{len(order) - 1}")
    return HeadLabels(taxonomy, tuple(tuple(order[int(c)] for c in row) for row in codes), source)
