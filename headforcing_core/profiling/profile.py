"""Head profiles: the calibration rollout and the :class:`HeadProfile` it produces."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch

from ..backbone import BackboneSpec, WanRunner
from ..errors import ProfileError, ShapeError
from ..policies import TRAINING_WINDOW, HeadLabels, make_policy
from ..sampler import ARSampler, Hooks
from ..validation import validate_fingerprint
from ..schedule import SELF_FORCING_SHIFT, SELF_FORCING_STEPS, FlowMatchSchedule
from .classify import CLASSIFIED_TAXONOMIES, CLASSIFIERS, thresholds_dict, thresholds_for
from .stats import AttentionCollector, FrameStats, HeadSummary, summarize

log = logging.getLogger("headforcing")


def describe_shape(fp: Mapping) -> str:
    """``"30 layers × 12 heads, dim 1536, patch 1×2×2, 16→16 channels, text 4096"``."""
    try:
        patch = "×".join(str(int(p)) for p in fp.get("patch_size", ()))
        return (f"{fp['num_layers']} layers × {fp['num_heads']} heads, dim {fp['dim']}, patch {patch}, "
                f"{fp.get('in_dim', '?')}→{fp.get('out_dim', '?')} channels, text {fp.get('text_dim', '?')}")
    except (KeyError, TypeError, ValueError):
        return repr(dict(fp))


def normalize_fingerprint(fp) -> dict:
    """A fingerprint dict (from :meth:`BackboneSpec.fingerprint` or a profile file) in canonical form,
    checked as data (:func:`headforcing_core.validation.validate_fingerprint`)."""
    if isinstance(fp, BackboneSpec):
        fp = fp.fingerprint()
    return validate_fingerprint(fp, "head profile", ProfileError)


@dataclass(frozen=True)
class HeadProfile:
    """What profiling knows about a model's heads: statistics (optional) and labels.

    ``labels`` is the labels matrix of the primary ``taxonomy`` (what a policy of that
    taxonomy uses: ``make_policy("head_forcing", labels=profile.labels)``);
    :meth:`labels_for` returns another taxonomy's. A preset profile carries labels only
    (``stats is None``) and cannot be re-classified. Treat instances as immutable.
    """

    model: dict
    labels_by_taxonomy: Mapping[str, HeadLabels]
    taxonomy: str
    thresholds: Mapping[str, dict] = field(default_factory=dict)
    stats: FrameStats | None = None
    calibration: dict | None = None
    source: str = ""
    attribution: str = ""
    read_only: bool = False
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "model", normalize_fingerprint(self.model))
        if self.taxonomy not in self.labels_by_taxonomy:
            raise ProfileError(f"profile has no labels for its primary taxonomy {self.taxonomy!r}")
        shape = (self.model["num_layers"], self.model["num_heads"])
        for tax, lab in self.labels_by_taxonomy.items():
            if lab.taxonomy != tax:
                raise ProfileError(f"labels stored as {tax!r} are of taxonomy {lab.taxonomy!r}")
            if lab.shape != shape:
                raise ProfileError(f"{tax} labels are {lab.shape[0]}×{lab.shape[1]} but the profile's model has "
                                   f"{shape[0]} layers × {shape[1]} heads")
        if self.stats is not None and self.stats.shape != shape:
            raise ProfileError(f"profile statistics cover {self.stats.shape[0]}×{self.stats.shape[1]} heads but the "
                               f"model has {shape[0]} layers × {shape[1]} heads")

    # ---- labels ------------------------------------------------------------------------------
    @property
    def labels(self) -> HeadLabels:
        return self.labels_by_taxonomy[self.taxonomy]

    @property
    def shape(self) -> tuple[int, int]:
        return self.model["num_layers"], self.model["num_heads"]

    def labels_for(self, taxonomy: str) -> HeadLabels:
        """Labels in ``taxonomy``: stored ones, else classified with default thresholds."""
        if taxonomy in self.labels_by_taxonomy:
            return self.labels_by_taxonomy[taxonomy]
        if taxonomy not in CLASSIFIED_TAXONOMIES:
            raise ProfileError(f"unknown taxonomy {taxonomy!r}; choose one of {', '.join(CLASSIFIED_TAXONOMIES)}")
        if self.stats is None:
            raise ProfileError(f"profile {self.display_name} has {', '.join(self.labels_by_taxonomy)} labels but no "
                               f"statistics, so it cannot be classified as {taxonomy}")
        return classify_profile(self, taxonomy).labels

    def summary(self, sink_frames: int = 3, recent_frames: int = 4) -> HeadSummary:
        if self.stats is None:
            raise ProfileError(f"profile {self.display_name} carries labels only (no statistics)")
        return summarize(self.stats, sink_frames=sink_frames, recent_frames=recent_frames)

    def classify(self, taxonomy: str, **thresholds) -> "HeadProfile":
        return classify_profile(self, taxonomy, thresholds)

    # ---- model --------------------------------------------------------------------------------
    def check_model(self, spec) -> None:
        """ProfileError naming both shapes unless ``spec`` (a BackboneSpec or fingerprint) is the profile's model."""
        other = normalize_fingerprint(spec)
        if other != self.model:
            raise ProfileError(
                f"head profile {self.display_name} was made for a model of {describe_shape(self.model)}, "
                f"but this model has {describe_shape(other)}; profile this model (Profile Heads) or load a "
                "profile made for it"
            )

    @property
    def display_name(self) -> str:
        return repr(self.name) if self.name else "(unsaved)"

    def describe(self) -> str:
        lines = [f"head profile {self.display_name}: {describe_shape(self.model)}"]
        if self.source:
            lines.append(f"source: {self.source}")
        if self.attribution:
            lines.append(f"attribution: {self.attribution}")
        for tax, lab in self.labels_by_taxonomy.items():
            counts = ", ".join(f"{t} {n}" for t, n in lab.counts().items())
            mark = " (primary)" if tax == self.taxonomy else ""
            lines.append(f"{tax}{mark}: {counts}" + (f" — {lab.source}" if lab.source and lab.source != self.source
                                                      else ""))
        if self.calibration:
            c = self.calibration
            lines.append(
                f"calibration: {c.get('prompts')} prompt(s), {c.get('frames')} latent frames at "
                f"{c.get('latent_width')}×{c.get('latent_height')} latent, {c.get('queries_per_frame')} sampled "
                f"queries per frame, seed {c.get('seed')}, {c.get('seconds', 0):.1f} s")
        elif self.stats is None:
            lines.append("statistics: none (labels-only preset)")
        return "\n".join(lines)


def classify_profile(profile: HeadProfile, taxonomy: str, thresholds: Mapping | None = None) -> HeadProfile:
    """A new profile whose ``taxonomy`` labels come from its statistics with ``thresholds``
    (defaults for the rest); that taxonomy becomes the primary one. No rollout is run."""
    th = thresholds_for(taxonomy, dict(thresholds or {}))
    if profile.stats is None:
        raise ProfileError(
            f"profile {profile.display_name} has labels but no statistics (a preset), so it cannot be "
            "re-classified; profile the model with Profile Heads to get statistics"
        )
    summ = summarize(profile.stats, sink_frames=th.sink_frames, recent_frames=th.recent_frames)
    labels = CLASSIFIERS[taxonomy](summ, th, source=_label_source(profile, taxonomy))
    by_tax = dict(profile.labels_by_taxonomy)
    by_tax[taxonomy] = labels
    ths = dict(profile.thresholds)
    ths[taxonomy] = thresholds_dict(th)
    return replace(profile, labels_by_taxonomy=by_tax, taxonomy=taxonomy, thresholds=ths, read_only=False)


def _label_source(profile: HeadProfile, taxonomy: str) -> str:
    base = profile.source or "head profile"
    return f"{base} (classified as {taxonomy})"


# ---------------------------------------------------------------------------------------------
# the calibration rollout


def _prompts(contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(contexts, torch.Tensor):
        contexts = [contexts]
    out = []
    for i, c in enumerate(contexts):
        if not isinstance(c, torch.Tensor):
            raise ShapeError(f"context {i} must be a tensor [batch, tokens, width], got {type(c).__name__}")
        if c.ndim == 2:
            c = c.unsqueeze(0)
        if c.ndim != 3:
            raise ShapeError(f"context {i} must be [batch, tokens, width], got {tuple(c.shape)}")
        out.extend(c[b:b + 1] for b in range(c.shape[0]))  # each batch row is one prompt
    if not out:
        raise ShapeError("profiling needs at least one prompt (text context)")
    return out


def check_profile_settings(frames: int, frames_per_block: int, query_samples: int) -> None:
    """ShapeError unless a calibration rollout of these settings can run (before any work)."""
    if frames_per_block < 1:
        raise ShapeError(f"frames_per_block must be ≥ 1, got {frames_per_block}")
    if 2 * frames_per_block > TRAINING_WINDOW:
        raise ShapeError(
            f"frames_per_block {frames_per_block} is too large for profiling: it needs two chunks (history to "
            f"measure) within the {TRAINING_WINDOW}-frame training window, so at most {TRAINING_WINDOW // 2}")
    if not (2 * frames_per_block <= frames <= TRAINING_WINDOW):
        raise ShapeError(
            f"profiling runs {frames} latent frames; use between {2 * frames_per_block} (two chunks, so there is "
            f"history to measure) and {TRAINING_WINDOW} (the window the model was trained on)"
        )
    if query_samples < 1:
        raise ShapeError(f"query_samples must be ≥ 1, got {query_samples}")


def profile_heads(backbone: torch.nn.Module, contexts: Sequence[torch.Tensor], *, frames: int = TRAINING_WINDOW,
                  latent_height: int, latent_width: int, seed: int = 0, query_samples: int = 64,
                  frames_per_block: int = 3, steps: Sequence[float] = SELF_FORCING_STEPS,
                  shift: float = SELF_FORCING_SHIFT, hooks: Hooks | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, taxonomy: str = "head_forcing",
                  thresholds: Mapping | None = None, source: str = "", attention_backend: str = "auto",
                  max_elements: int = 1 << 23) -> HeadProfile:
    """Measure every head of ``backbone`` during a calibration rollout and classify it.

    For each prompt (``contexts``: text-encoder outputs ``[B, L, text_dim]``; every batch row
    is one prompt) the AR sampler generates ``frames`` latent frames (≤ 21, the training
    window) of ``latent_height × latent_width`` with the ``full`` policy, ``frames_per_block``
    frames per chunk, the given steps and the clean pass, while an observer measures
    attention from ``query_samples`` sampled query tokens per chunk (split evenly over the
    chunk's frames). Prompt ``i`` starts from noise seeded ``seed + 2i`` and re-noises with
    ``seed + 2i + 1``. ``hooks.progress(done, total)`` counts model calls over all prompts;
    ``hooks.should_stop()`` → :class:`~headforcing_core.errors.Interrupted`.

    Returns a :class:`HeadProfile` labelled in both taxonomies (``taxonomy`` primary, with
    ``thresholds`` for it; defaults otherwise).
    """
    if taxonomy not in CLASSIFIED_TAXONOMIES:
        raise ProfileError(f"unknown taxonomy {taxonomy!r}; choose one of {', '.join(CLASSIFIED_TAXONOMIES)}")
    thresholds_for(taxonomy, dict(thresholds or {}))  # fail fast on bad thresholds
    runner = WanRunner(backbone, dtype=dtype, device=device)
    spec = runner.spec
    prompts = _prompts(contexts)
    for i, p in enumerate(prompts):
        spec.check_context(p, what=f"prompt {i}")
    check_profile_settings(frames, frames_per_block, query_samples)
    tpf = spec.tokens_per_frame(latent_height, latent_width)  # raises ShapeError for odd sizes
    queries_per_frame = max(1, min(tpf, query_samples // frames_per_block))

    stats = FrameStats.zeros(spec.num_layers, spec.num_heads, frames, frames_per_block)
    noise_schedule = FlowMatchSchedule(tuple(float(s) for s in steps), float(shift))
    holder: dict = {}

    def current_chunk():
        plan = holder["sampler"].last_plan
        return plan.chunk_start, plan.frames

    collector = AttentionCollector(stats, tokens_per_frame=tpf, queries_per_frame=queries_per_frame, seed=seed,
                                   current_chunk=current_chunk, max_elements=max_elements)
    user = hooks or Hooks()
    per_prompt = None
    total = None
    done = 0
    t0 = time.perf_counter()
    for i, ctx in enumerate(prompts):
        sampler = ARSampler(runner, make_policy("full"), noise_schedule, frames_per_block, attention_backend)
        holder["sampler"] = sampler
        sampler.observer = collector
        collector.start_prompt(i)
        if per_prompt is None:
            per_prompt = sampler.total_model_calls(frames)
            total = per_prompt * len(prompts)
        sampler.start(1, latent_height, latent_width, frames)
        sampler.set_prompt(ctx)
        g = torch.Generator().manual_seed((int(seed) + 2 * i) % (2**63))
        noise = torch.randn(1, spec.in_dim, frames, latent_height, latent_width, generator=g).to(runner.device)
        renoise = torch.Generator().manual_seed((int(seed) + 2 * i + 1) % (2**63))
        sampler.sample(noise, renoise, Hooks(user.progress, user.should_stop, user.on_chunk),
                       calls_done=done, calls_total=total)
        done += per_prompt
        del sampler
    seconds = time.perf_counter() - t0
    calibration = {
        "prompts": len(prompts), "frames": frames, "frames_per_block": frames_per_block,
        "latent_height": latent_height, "latent_width": latent_width, "tokens_per_frame": tpf,
        "query_samples": query_samples, "queries_per_frame": queries_per_frame, "seed": int(seed),
        "steps": [float(s) for s in noise_schedule.steps],
        "shift": float(shift), "policy": "full", "model_calls": done,
        "observations": collector.observations, "dtype": str(runner.dtype).replace("torch.", ""),
        "device": str(runner.device), "seconds": round(seconds, 3),
    }
    src = source or f"profiled: {len(prompts)} prompt(s), {frames} latent frames, seed {int(seed)}"
    profile = HeadProfile(
        model=spec.fingerprint(), labels_by_taxonomy={"uniform": HeadLabels.uniform(
            spec.num_layers, spec.num_heads, "all", "uniform", "unclassified")},
        taxonomy="uniform", stats=stats, calibration=calibration, source=src)
    for tax in CLASSIFIED_TAXONOMIES:
        if tax == taxonomy:
            continue
        try:
            profile = classify_profile(profile, tax)
        except ProfileError as e:  # e.g. too few frames for middle-frame statistics
            log.warning("headforcing: no %s labels for this profile: %s", tax, e)
    profile = classify_profile(profile, taxonomy, thresholds)
    by_tax = {t: lab for t, lab in profile.labels_by_taxonomy.items() if t != "uniform"}
    profile = replace(profile, labels_by_taxonomy=by_tax)
    log.info("headforcing: profiled %d heads in %.1f s (%d model calls)", spec.num_layers * spec.num_heads,
             seconds, done)
    return profile


def estimate_profile(spec: BackboneSpec, *, frames: int, latent_height: int, latent_width: int,
                     frames_per_block: int = 3, query_samples: int = 64, dtype: torch.dtype = torch.bfloat16,
                     max_elements: int = 1 << 23):
    """What :func:`profile_heads` holds at its peak (a :class:`~headforcing_core.memory.RunEstimate`):
    a ``full``-policy run of ``frames`` latent frames plus the statistics collector — the sampled
    queries' logits, softmax, signs and centred logits against every key (computed in pieces of
    at most ``max_elements`` values, at least one head at a time) and float32 copies of the keys."""
    from ..memory import estimate_run

    tpf = spec.tokens_per_frame(latent_height, latent_width)
    n = max(1, min(tpf, query_samples // frames_per_block)) * frames_per_block  # sampled queries per chunk
    keys = frames * tpf
    heads_per_piece = min(spec.num_heads, max(1, max_elements // max(1, n * keys)))
    piece = heads_per_piece * n * keys * 4
    collector = keys * spec.num_heads * spec.head_dim * 4 + n * spec.num_heads * spec.head_dim * 4 + 6 * piece
    collector += 5 * spec.num_layers * spec.num_heads * frames * frames * 8  # the float64 statistics
    return estimate_run(spec, "full", latent_frames=frames, latent_height=latent_height, latent_width=latent_width,
                        frames_per_block=frames_per_block, dtype=dtype, capture_state=False, extra_bytes=collector,
                        extra_label="head statistics")
