"""The conversion helpers: ComfyUI values (ModelPatcher, CONDITIONING, LATENT, widget values and the
pack's socket values) into core arguments, checked before any work.

The nodes and :mod:`.run` (the run sequence every sampling node shares) call these; this module
imports no other module of ``nodes/`` and imports ComfyUI nowhere (it reads a MODEL by attribute),
so it loads on its own, without a ComfyUI install (tests load it from its file). Video geometry
(fps, latent ↔ video frames, sizes) comes from :mod:`headforcing_core.geometry`.

Facts this module relies on (ComfyUI 0.3.75):

* ``patcher.model.diffusion_model`` is the Wan module (``comfy.ldm.wan.model.WanModel``); its
  layers are ComfyUI ops that cast weights on the fly, so the core calls them, never copies.
* ComfyUI's model config, latent format and unet ``model_type`` name the model family
  (:func:`check_model_family`).
* ``model.model.manual_cast_dtype`` / ``model.model_dtype()`` give the dtype ComfyUI computes in
  (:func:`compute_dtype`); with fp8 weights (UNETLoader's ``fp8_*`` weight_dtype) the model dtype is
  the fp8 one and ComfyUI computes in the manual-cast dtype; ``model.model.model_config.scaled_fp8``
  is a scaled-fp8 file's fp8 dtype (:func:`describe_weights`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from headforcing_core.backbone import BackboneSpec, inspect_backbone
from headforcing_core.errors import HeadForcingError, ModelFamilyError, ProfileError, ShapeError, StateError
from headforcing_core.geometry import (FPS, SIZE_MULTIPLE, SPACE_COMPRESSION, TIME_COMPRESSION, added_video_frames,
                                       chunk_bounds, latent_frames_for, seconds_of, video_frames_for,
                                       video_frames_for_seconds)
from headforcing_core.krea import (FIRST_LATENT_MODES, KREA_CONTEXT_FRAMES, KREA_INTERPOLATION_BLOCKS, KREA_STEPS,
                                   KreaError, KreaSettings)
from headforcing_core.memory import estimate_run
from headforcing_core.noise import initial_noise  # noqa: F401  (the tests draw the sampler's noise through here)
from headforcing_core.policies import (PRESETS, CachePolicy, Cyclic, HeadLabels, Merge, PyramidRule, Stride, describe,
                                      make_policy, with_episodic)
from headforcing_core.profiling import HeadProfile
from headforcing_core.prompts import PromptSchedule, ScheduleError
from headforcing_core.schedule import SELF_FORCING_SHIFT, SELF_FORCING_STEPS, FlowMatchSchedule, linspace_steps
from headforcing_core.state import ARState
from headforcing_core.wan_model import WAN_LAYOUTS, WanConfig

decoded_frames = video_frames_for  # the name the tests know: T latent frames decode to 4T-3 video frames

MAX_SEED = 0xFFFFFFFFFFFFFFFF
LENGTH_UNITS = ("frames", "seconds")
DEFAULT_STEPS = ",".join(str(int(s)) for s in SELF_FORCING_STEPS)   # "1000,750,500,250"
DEFAULT_SHIFT = SELF_FORCING_SHIFT                                    # 5.0
DEFAULT_SAMPLER_POLICY = "self_forcing_window"
ROPE_CHOICES = ("preset default", "absolute", "window_clamp", "window_shift", "compact")
# Pyramid Forcing's own parameters (configs/pyramid-forcing.yaml), as the Cache Policy node names them
PYRAMID_DEFAULTS = {
    "anchor_sink_frames": 3, "wave_sink_frames": 1, "veil_sink_frames": 3, "pyramid_recent_frames": 4,
    "stride_interval": 6, "stride_capacity": 4, "cyclic_period": 6, "cyclic_bucket_capacity": 4,
    "merge_patch": 2, "merge_capacity": 4, "sink_time_clamp_min": 18, "sink_time_clamp_max": 21,
}
WAN_1_3B = WanConfig()      # the shape the policy node's memory figure assumes without a profile or model_shape


# =============================================================================================
# widget values, CONDITIONING, LATENT and the pack's socket values
# =============================================================================================

def parse_steps(text: str) -> tuple[float, ...]:
    """``"1000, 750, 500, 250"`` → ``(1000.0, 750.0, 500.0, 250.0)`` (commas and/or spaces).

    The values are Self Forcing's *nominal* timesteps; the core warps them through the
    shifted schedule (1000,750,500,250 → ≈ 1000, 937.5, 833.3, 625 at shift 5).
    """
    parts = [p for p in re.split(r"[,\s;]+", str(text).strip()) if p]
    if not parts:
        raise ShapeError(f"steps is empty; give a comma-separated list of timesteps such as {DEFAULT_STEPS!r}")
    try:
        steps = tuple(float(p) for p in parts)
    except ValueError:
        raise ShapeError(f"steps {text!r} is not a comma-separated list of numbers "
                         f"(for example {DEFAULT_STEPS!r})") from None
    if any(not math.isfinite(s) for s in steps):
        raise ShapeError(f"steps {text!r} contains a non-finite value")
    return steps


def schedule_steps(text: str, shift: float) -> tuple[float, ...]:
    """A step-list widget that makes a flow-matching schedule with ``shift`` (order, range and shift
    checked: ShapeError naming the problem), as :func:`parse_steps` values."""
    steps = parse_steps(text)
    FlowMatchSchedule(steps, float(shift))
    return steps


def parse_first_chunk_steps(text) -> tuple[float, ...] | None:
    """The first-chunk step list widget: empty (or only spaces) = none, else a step list like ``steps``
    (Causal Forcing++'s ``denoising_step_list_first_chunk``)."""
    if text is None or not str(text).strip():
        return None
    try:
        steps = schedule_steps(text, DEFAULT_SHIFT)  # order and range; the shift is checked with the main list
    except ShapeError as e:
        raise ShapeError(f"first_chunk_steps: {e} (leave it empty for no separate first-chunk list)") from None
    return steps


LOOPS = {
    "self_forcing": "Self Forcing's loop: each chunk's steps + a clean pass committed to the cache, the cache "
                    "policy deciding what every head keeps",
    "krea": "Krea's loop: the cache rebuilt every block from a few context frames, no clean pass, no cache policy",
}
WAN_1_3B_LAYOUT, WAN_14B_LAYOUT = "Wan 2.1 1.3B", "Wan 2.1 14B"  # headforcing_core.wan_model.WAN_LAYOUTS


@dataclass(frozen=True)
class ModelPreset:
    """The sampling settings of one public checkpoint, as its own inference code sets them: which loop
    runs it (:data:`LOOPS`) and the layout its checkpoints have (a model of another public layout is refused)."""

    frames_per_block: int
    steps: tuple[float, ...]
    first_chunk_steps: tuple[float, ...] | None
    shift: float
    source: str  # checkpoint and config it comes from
    loop: str = "self_forcing"
    layout: str | None = WAN_1_3B_LAYOUT

    def widget_values(self) -> dict:
        """The four sampler widgets as this preset sets them (what the browser fills in, and what a
        run uses in their place)."""
        return {"frames_per_block": self.frames_per_block, "steps": steps_text(self.steps),
                "first_chunk_steps": steps_text(self.first_chunk_steps), "shift": float(self.shift)}


_FOUR = SELF_FORCING_STEPS  # (1000, 750, 500, 250)
CUSTOM_PRESET = "custom"
KREA_PRESET = "Krea Realtime 14B"
KREA_SF_PRESET = "Krea Realtime 14B, Self Forcing loop"
# the model_preset choices of the AR sampler (README "Model presets"; /work notes: each repository's configs/)
MODEL_PRESETS: dict[str, ModelPreset | None] = {
    CUSTOM_PRESET: None,
    "Self Forcing chunk-wise": ModelPreset(
        3, _FOUR, None, 5.0, "gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt, configs/self_forcing_dmd.yaml"),
    "Causal Forcing chunk-wise": ModelPreset(
        3, _FOUR, None, 5.0,
        "zhuhz22/Causal-Forcing chunkwise/causal_forcing.pt, configs/causal_forcing_dmd_chunkwise.yaml"),
    "Causal Forcing frame-wise 4-step": ModelPreset(
        1, _FOUR, None, 5.0,
        "zhuhz22/Causal-Forcing framewise/causal_forcing.pt, configs/causal_forcing_dmd_framewise.yaml"),
    "Causal Forcing++ frame-wise 2-step": ModelPreset(
        1, (1000.0, 500.0), _FOUR, 5.0,
        "zhuhz22/Causal-Forcing causal-forcing++/framewise-2step.pt, configs/causal_forcing_dmd_framewise_2step.yaml"),
    "Causal Forcing++ frame-wise 1-step": ModelPreset(
        1, (1000.0,), _FOUR, 5.0,
        "zhuhz22/Causal-Forcing causal-forcing++/framewise-1step.pt, configs/causal_forcing_dmd_framewise_1step.yaml"),
    "LongLive": ModelPreset(
        3, _FOUR, None, 5.0,
        "Efficient-Large-Model/LongLive-1.3B longlive_base.pt + lora.pt, configs/longlive_interactive_inference.yaml"),
    # Krea Realtime 14B: its server's session (release_server.py GenerationSession), docs/krea.md
    KREA_PRESET: ModelPreset(
        3, linspace_steps(KREA_STEPS), None, 5.0,
        "krea/krea-realtime-video krea-realtime-video-14b.safetensors, release_server.py GenerationSession "
        "(kv_cache_num_frames 3, num_denoising_steps 5, timestep_shift 5)", loop="krea", layout=WAN_14B_LAYOUT),
    KREA_SF_PRESET: ModelPreset(
        3, linspace_steps(KREA_STEPS), None, 5.0,
        "krea/krea-realtime-video krea-realtime-video-14b.safetensors with Krea's steps and shift, run by Self "
        "Forcing's loop (a clean pass per chunk) so that the cache policies apply", layout=WAN_14B_LAYOUT),
}


def steps_text(steps) -> str:
    """``(1000.0, 750.0)`` → ``"1000,750"`` (what the widgets hold); None → ``""``."""
    return "" if not steps else ",".join(f"{float(s):g}" for s in steps)


@dataclass(frozen=True)
class SamplingSettings:
    """Frames per block, steps, first-chunk steps and shift after the model preset is applied, and the loop."""

    preset: str
    frames_per_block: int
    steps: str
    first_chunk_steps: str
    shift: float
    source: str = ""
    replaced: tuple[str, ...] = ()  # widget values the preset replaced ("steps 1000,750 -> 1000,500")
    loop: str = "self_forcing"
    layout: str | None = None  # the model layout the preset is for (None: any)


def apply_model_preset(model_preset: str, *, frames_per_block: int, steps: str, first_chunk_steps: str,
                       shift: float) -> SamplingSettings:
    """The one rule: ``custom`` uses the four widgets as they are; any other preset uses the preset's
    frames per block, steps, first-chunk steps and shift, and the widgets are not read (the report names
    every widget value that differed and was replaced)."""
    if model_preset not in MODEL_PRESETS:
        raise ShapeError(f"unknown model_preset {model_preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    first_chunk_steps = "" if first_chunk_steps is None else str(first_chunk_steps)
    preset = MODEL_PRESETS[model_preset]
    if preset is None:
        return SamplingSettings(CUSTOM_PRESET, int(frames_per_block), str(steps), first_chunk_steps, float(shift))
    want = preset.widget_values()
    given = {"frames_per_block": frames_per_block, "steps": steps, "first_chunk_steps": first_chunk_steps,
             "shift": shift}
    replaced = []
    for name, value in want.items():
        old = given[name]
        if name in ("steps", "first_chunk_steps"):
            try:
                same = (parse_first_chunk_steps(old) or ()) == (parse_first_chunk_steps(value) or ())
            except ShapeError:
                same = False
        else:
            same = float(old) == float(value)
        if not same:
            replaced.append(f"{name} {_widget_text(old)} -> {_widget_text(value)}")
    return SamplingSettings(model_preset, want["frames_per_block"], want["steps"], want["first_chunk_steps"],
                            want["shift"], preset.source, tuple(replaced), preset.loop, preset.layout)


def check_model_layout(sampling: SamplingSettings, spec: BackboneSpec) -> None:
    """A model of one public Wan 2.1 layout with a preset made for another is refused by name (a Krea Realtime
    14B checkpoint with a Self Forcing preset, a 1.3B checkpoint with Krea's); models of no public layout
    (narrow test models, other sizes) take any preset, and ``custom`` any model."""
    have = spec.layout
    if sampling.layout is None or have is None or have == sampling.layout:
        return
    fits = [name for name, p in MODEL_PRESETS.items() if p is not None and p.layout == have]
    raise ModelFamilyError(
        f"this model has the {have} layout ({spec.describe_layout()}); model_preset {sampling.preset!r} is for "
        f"{sampling.layout} checkpoints. Choose {' or '.join(repr(n) for n in fits)} (or 'custom')")


FIRST_LATENT_CHOICES = ("auto", *FIRST_LATENT_MODES)


def krea_settings(sampling: SamplingSettings, *, context_frames: int = KREA_CONTEXT_FRAMES,
                  interpolation_blocks: int = KREA_INTERPOLATION_BLOCKS, first_latent: str = "auto",
                  has_vae: bool = False) -> KreaSettings:
    """Krea's loop settings from the sampler's widgets (checked). ``first_latent="auto"``: Krea's re-encode when
    a VAE is connected, else the ``latent`` approximation; ``reencode`` without a VAE is refused."""
    if first_latent not in FIRST_LATENT_CHOICES:
        raise KreaError(f"unknown context_first_latent {first_latent!r}; choose one of "
                        f"{', '.join(FIRST_LATENT_CHOICES)}")
    if first_latent == "auto":
        first_latent = "reencode" if has_vae else "latent"
    elif first_latent == "reencode" and not has_vae:
        raise KreaError("context_first_latent 'reencode' (Krea's rule) VAE-encodes a decoded frame: connect the Wan "
                        "2.1 VAE to the sampler's vae input, or choose 'latent' (an approximation without a VAE) or "
                        "'keep_first' (Krea's keep_first_frame option)")
    settings = KreaSettings(context_frames=int(context_frames), frames_per_block=int(sampling.frames_per_block),
                            steps=parse_steps(sampling.steps), shift=float(sampling.shift),
                            interpolation_blocks=int(interpolation_blocks), first_latent=first_latent)
    settings.validate()
    return settings


def _widget_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "(empty)" if isinstance(value, str) and not value.strip() else str(value)


def video_frames(length: int, unit: str = "frames") -> int:
    """Requested video frames: ``length`` frames, or ``length`` seconds at 16 fps (+1 first frame)."""
    if unit not in LENGTH_UNITS:
        raise ShapeError(f"length_unit must be one of {', '.join(LENGTH_UNITS)}, got {unit!r}")
    if length < 1:
        raise ShapeError(f"length must be at least 1, got {length}")
    return video_frames_for_seconds(int(length)) if unit == "seconds" else int(length)


def check_video_size(width: int, height: int) -> None:
    bad = [f"{name} {v}" for name, v in (("width", width), ("height", height)) if v % SIZE_MULTIPLE or v <= 0]
    if bad:
        raise ShapeError(
            f"{' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a positive multiple of {SIZE_MULTIPLE} "
            f"(the Wan VAE downsamples 8x and the model patches 2x2); use for example "
            f"{_round16(width)}x{_round16(height)}"
        )


def _round16(v: int) -> int:
    return max(SIZE_MULTIPLE, int(round(v / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def check_length(frames: int, latent_frames: int, frames_per_block: int) -> None:
    if frames_per_block < 1:
        raise ShapeError(f"frames_per_block must be at least 1, got {frames_per_block}")
    if latent_frames < frames_per_block:
        raise ShapeError(
            f"length {frames} video frames is {latent_frames} latent frame(s), shorter than one chunk of "
            f"{frames_per_block} latent frames; ask for at least {video_frames_for(frames_per_block)} frames "
            f"(or lower frames_per_block)"
        )


def latent_shape(width: int, height: int, latent_frames: int, batch: int = 1, channels: int = 16) -> tuple:
    """ComfyUI's Wan video latent layout ``[B, 16, T, H/8, W/8]``."""
    return (batch, channels, latent_frames, height // SPACE_COMPRESSION, width // SPACE_COMPRESSION)


def renoise_generator(seed: int) -> torch.Generator:
    """The CPU generator for the re-noising draws between denoising steps: seeded ``seed + 1``
    (mod 2^64), so they never repeat the initial noise of the same seed."""
    return torch.Generator(device="cpu").manual_seed((int(seed) + 1) & MAX_SEED)


def conditioning_tensor(conditioning) -> torch.Tensor:
    """The text-encoder output ``[B, L, C]`` of a ComfyUI CONDITIONING (``[[tensor, dict], ...]``)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ShapeError("conditioning is empty; connect a CLIPTextEncode (umT5, CLIPLoader type 'wan') output")
    if len(conditioning) > 1:
        raise ShapeError(
            f"conditioning holds {len(conditioning)} separate prompts (e.g. from Conditioning (Combine)); this "
            "sampler takes one prompt (use Conditioning (Concat) to join texts)"
        )
    entry = conditioning[0]
    cond = entry[0] if isinstance(entry, (list, tuple)) else entry
    if not torch.is_tensor(cond) or cond.ndim != 3:
        shape = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
        raise ShapeError(f"conditioning must be a [batch, tokens, width] text embedding, got {shape}")
    return cond


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise HeadForcingError(f"unknown policy preset {preset!r}; choose one of {', '.join(PRESETS)}")


def build_policy(preset: str, *, rope: str = "preset default", sink_frames: int = -1, recent_frames: int = -1,
                 memory_episodes: int | None = None, memory_similarity: float | None = None,
                 labels: HeadLabels | None = None, pyramid: dict | None = None) -> CachePolicy:
    """A :class:`CachePolicy` from the policy node's widgets.

    ``rope="preset default"``, ``sink_frames=-1``, ``recent_frames=-1`` keep the preset's
    values; ``memory_episodes`` / ``memory_similarity`` (None: keep) tune the episodic tier of
    ``head_forcing``'s memory heads and are ignored by the other presets. ``pyramid``: Pyramid
    Forcing's parameters by the names of :data:`PYRAMID_DEFAULTS` (missing ones keep their
    defaults); ``pyramid_forcing`` takes its rules from them (not from ``sink_frames`` /
    ``recent_frames``). ``labels`` (from a HEAD_PROFILE) type every (layer, head); without them
    the typed presets use their defaults for the model's shape at sampling time.
    """
    check_preset(preset)
    if rope not in ROPE_CHOICES:
        raise HeadForcingError(f"unknown RoPE mode {rope!r}; choose one of {', '.join(ROPE_CHOICES)}")
    kw = dict(labels=labels, rope=None if rope == "preset default" else rope)
    if preset == "pyramid_forcing":
        p = {**PYRAMID_DEFAULTS, **(pyramid or {})}
        unknown = sorted(set(p) - set(PYRAMID_DEFAULTS))
        if unknown:
            raise HeadForcingError(f"unknown Pyramid Forcing parameter(s) {', '.join(unknown)}")
        p = {k: int(v) for k, v in p.items()}
        recent = p["pyramid_recent_frames"]
        rules = {"anchor": PyramidRule(p["anchor_sink_frames"], recent, Stride(p["stride_interval"],
                                                                              p["stride_capacity"]),
                                       stable_stride=True),
                 "wave": PyramidRule(p["wave_sink_frames"], recent, Cyclic(p["cyclic_period"],
                                                                           p["cyclic_bucket_capacity"])),
                 "veil": PyramidRule(p["veil_sink_frames"], recent, Merge(p["merge_patch"], p["merge_capacity"]))}
        return make_policy(preset, rules=rules, clamp_min=p["sink_time_clamp_min"],
                           clamp_max=p["sink_time_clamp_max"], **kw)
    kw.update(sink=None if sink_frames < 0 else int(sink_frames),
              recent=None if recent_frames < 0 else int(recent_frames))
    return with_episodic(make_policy(preset, **kw), None if memory_episodes is None else int(memory_episodes),
                         None if memory_similarity is None else float(memory_similarity))


def sampler_policy(kv_policy: CachePolicy | None, preset: str) -> CachePolicy:
    """The connected KV_POLICY wins; otherwise the sampler's ``policy`` dropdown preset."""
    if kv_policy is not None:
        if not isinstance(kv_policy, CachePolicy):
            raise HeadForcingError(f"kv_policy must come from a Head Forcing Cache Policy node, got "
                                   f"{type(kv_policy).__name__}")
        return kv_policy
    check_preset(preset)
    return make_policy(preset)


# the pack's socket values (nodes/types.py), checked where a node takes them

TYPED_PRESETS = ("pyramid_forcing", "head_forcing")  # the presets that type heads (a HEAD_PROFILE labels them)


def check_profile(value) -> HeadProfile:
    if not isinstance(value, HeadProfile):
        raise ProfileError(f"head_profile must come from a Head Forcing profile node, got {type(value).__name__}")
    return value


def check_schedule(value) -> PromptSchedule:
    if not isinstance(value, PromptSchedule):
        raise ScheduleError(f"prompt_schedule must come from a Head Forcing prompt node, got {type(value).__name__}")
    return value


def check_state(value) -> ARState:
    if value is None:
        raise StateError("no AR_STATE: the sampler ran Krea's loop, which rebuilds its cache every block and keeps "
                         "no state to continue from; continue a Self Forcing loop run (any other model_preset)")
    if not isinstance(value, ARState):
        raise StateError(f"ar_state must come from a Head Forcing sampler, Continue or Load AR State node, got "
                         f"{type(value).__name__}")
    return value


def profile_labels(head_profile, preset: str) -> HeadLabels | None:
    """The labels a HEAD_PROFILE gives ``preset``: its labels of the preset's taxonomy
    (classified with default thresholds if the profile has statistics but no such labels);
    None for presets that do not type heads or when no profile is connected."""
    if head_profile is None or preset not in TYPED_PRESETS:
        return None
    return check_profile(head_profile).labels_for(preset)


def profile_spec(head_profile: HeadProfile) -> BackboneSpec:
    """A BackboneSpec of the profile's model shape (for the policy node's memory figure)."""
    return BackboneSpec.from_fingerprint(head_profile.model)


# the policy node's model_shape choices: the public layouts (headforcing_core.wan_model.WAN_LAYOUTS), as named
# in the estimate's text
MODEL_SHAPES = {name: f"Wan2.1-T2V-{name.split()[-1]}" for name in WAN_LAYOUTS}


def shape_spec(model_shape: str) -> BackboneSpec:
    """The spec of a public layout by its name (the policy node's ``model_shape``)."""
    if model_shape not in WAN_LAYOUTS:
        raise HeadForcingError(f"unknown model_shape {model_shape!r}; choose one of {', '.join(WAN_LAYOUTS)}")
    return BackboneSpec.from_config(WAN_LAYOUTS[model_shape])


def policy_summary(policy: CachePolicy, *, width: int, height: int, frames: int, frames_per_block: int = 3,
                   spec: BackboneSpec | None = None, dtype: torch.dtype = torch.bfloat16,
                   model_shape: str = WAN_1_3B_LAYOUT) -> str:
    """What the policy keeps and the memory it will use for a video of ``width``×``height``, ``frames`` frames,
    on a model of ``spec`` (a profile's) or else of the public layout ``model_shape``."""
    check_video_size(width, height)
    latent = latent_frames_for(frames)
    check_length(frames, latent, frames_per_block)
    shape_note = "" if spec is not None else f"{MODEL_SHAPES.get(model_shape, model_shape)}, "
    spec = spec or shape_spec(model_shape)
    est = estimate_run(spec, policy, latent_frames=latent, latent_height=height // SPACE_COMPRESSION,
                       latent_width=width // SPACE_COMPRESSION, frames_per_block=frames_per_block, batch=1,
                       dtype=dtype)
    dtype_name = str(dtype).replace("torch.", "")
    return "\n".join([
        describe(policy),
        f"estimate for {shape_note}{width}x{height}, {video_frames_for(latent)} frames "
        f"({latent} latent, {seconds_of(latent):.1f} s at {FPS} fps), {dtype_name}, "
        f"{frames_per_block} frames per block:",
        est.describe(),
    ])


@dataclass(frozen=True)
class SamplerRequest:
    """Validated sampler inputs, in core terms. ``latent_frames`` are the frames to generate; with an
    initial latent of ``initial_frames`` latent frames the whole video is ``initial_frames + latent_frames``."""

    width: int
    height: int
    frames_requested: int
    latent_frames: int
    seed: int
    steps: tuple[float, ...]
    shift: float
    frames_per_block: int
    policy: CachePolicy
    first_chunk_steps: tuple[float, ...] | None = None
    initial_frames: int = 0
    sampling: SamplingSettings | None = None

    @property
    def total_latent_frames(self) -> int:
        return self.initial_frames + self.latent_frames

    @property
    def frames(self) -> int:
        """Video frames of the whole video (the initial frames included)."""
        return video_frames_for(self.total_latent_frames)

    @property
    def chunks(self) -> int:
        return len(chunk_bounds(0, self.latent_frames, self.frames_per_block))

    @property
    def shape(self) -> tuple:
        return latent_shape(self.width, self.height, self.latent_frames)


def make_request(*, width: int, height: int, length: int, length_unit: str = "frames", seed: int = 0,
                 steps: str = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT, frames_per_block: int = 3,
                 policy: CachePolicy, first_chunk_steps: str = "", initial_frames: int = 0,
                 sampling: SamplingSettings | None = None) -> SamplerRequest:
    """Check every widget value before any work (no model load, no allocation).

    ``length`` is the whole video's length; with an initial latent of ``initial_frames`` latent frames
    the sampler generates the latent frames after them (at least one chunk)."""
    check_video_size(width, height)
    frames = video_frames(length, length_unit)
    latent = latent_frames_for(frames)
    if initial_frames:
        new = latent - initial_frames
        if new < frames_per_block:
            least = initial_frames + frames_per_block
            raise ShapeError(
                f"length {frames} video frames is {latent} latent frames in all, but the initial latent already has "
                f"{initial_frames} ({video_frames_for(initial_frames)} video frames), which leaves "
                f"{max(new, 0)} new latent frame(s), less than one chunk of {frames_per_block}: length counts the "
                f"whole video, initial frames included; ask for at least {video_frames_for(least)} frames "
                f"({seconds_of(least):.2f} s)")
        latent = new
    else:
        check_length(frames, latent, frames_per_block)
    step_values = schedule_steps(steps, shift)  # raises ShapeError for a bad list or shift
    first = parse_first_chunk_steps(first_chunk_steps)
    if first is not None:
        FlowMatchSchedule(first, float(shift))
    policy.validate(frames_per_block)
    return SamplerRequest(int(width), int(height), frames, latent, int(seed), step_values, float(shift),
                          int(frames_per_block), policy, first, int(initial_frames), sampling)


def initial_latent_samples(initial_latent) -> torch.Tensor | None:
    """The ``samples`` tensor of the sampler's optional ``initial_latent`` LATENT (None when not connected).
    Only its form is checked here; :func:`check_initial_latent` checks it against the run."""
    if initial_latent is None:
        return None
    samples = initial_latent.get("samples") if isinstance(initial_latent, dict) else None
    if not torch.is_tensor(samples):
        raise ShapeError(f"initial_latent must be a LATENT (VAEEncode's output), got {type(initial_latent).__name__}")
    if samples.ndim != 5:
        raise ShapeError(
            f"initial_latent is {list(samples.shape)}, an image latent of {samples.ndim} dimensions; a Wan video "
            "latent is [batch, 16, frames, height/8, width/8]: encode the image or video frames with VAEEncode and "
            "the Wan 2.1 VAE (wan_2.1_vae.safetensors)")
    if samples.shape[2] < 1:
        raise ShapeError("initial_latent has no frames")
    return samples


def check_initial_latent(samples: torch.Tensor, req: SamplerRequest, channels: int) -> None:
    """The initial latent against the run: size (the width / height widgets), channels, batch 1, whole chunks,
    finite values (:func:`headforcing_core.sampler.validate_initial_latent`) — before anything is loaded."""
    from headforcing_core.sampler import validate_initial_latent

    if samples.shape[0] != 1:
        raise ShapeError(
            f"initial_latent holds a batch of {samples.shape[0]} latents; the sampler makes one video from one image "
            "or one video (batch 1): pick one with Latent From Batch")
    h, w = samples.shape[-2:]
    lh, lw = req.height // SPACE_COMPRESSION, req.width // SPACE_COMPRESSION
    if (h, w) != (lh, lw):
        raise ShapeError(
            f"initial_latent is {w * SPACE_COMPRESSION}x{h * SPACE_COMPRESSION} (latent {w}x{h}) but the sampler's "
            f"width and height are {req.width}x{req.height}: set them to {w * SPACE_COMPRESSION}x"
            f"{h * SPACE_COMPRESSION}, or resize the image / frames to {req.width}x{req.height} (ImageScale, crop "
            "center) before VAEEncode")
    if samples.shape[1] == channels and samples.shape[0] == 1 and samples.shape[2] % req.frames_per_block:
        t0 = samples.shape[2]
        fpb = req.frames_per_block
        whole = max(fpb, t0 // fpb * fpb)
        hint = ("a single image (1 latent frame) needs a frame-wise model: frames_per_block 1 (model_preset "
                "'Causal Forcing frame-wise 4-step' or a Causal Forcing++ one)" if t0 == 1 else
                f"trim the video to {video_frames_for(whole)} or {video_frames_for(whole + fpb)} frames "
                "(Image From Batch) before VAEEncode")
        raise ShapeError(
            f"initial_latent has {count_noun(t0, 'latent frame')} ({count_noun(video_frames_for(t0), 'video frame')}); "
            f"with {fpb} frames per block "
            f"the cache takes whole chunks of {fpb} latent frames (as Self Forcing's and Causal Forcing's pipelines "
            f"do): {hint}")
    validate_initial_latent(samples, latent_shape(req.width, req.height, req.latent_frames), req.frames_per_block,
                            channels)


# =============================================================================================
# the MODEL (a ComfyUI ModelPatcher, read by attribute)
# =============================================================================================

# ComfyUI's model configs (comfy/supported_models.py) of the Wan transformer family, by what they are
WAN_FAMILY = {
    "WAN21_T2V": "Wan 2.1 text-to-video",
    "WAN22_T2V": "Wan 2.2 TI2V-5B (48-channel latents for the Wan 2.2 VAE, 16x spatial compression)",
    "WAN21_I2V": "Wan 2.1 image-to-video (I2V)",
    "WAN21_FunControl2V": "Wan 2.1 Fun Control",
    "WAN21_Camera": "Wan 2.1 camera-control",
    "WAN22_Camera": "Wan 2.2 camera-control",
    "WAN21_Vace": "Wan 2.1 VACE",
    "WAN21_HuMo": "HuMo (Wan 2.1, audio-driven)",
    "WAN22_S2V": "Wan 2.2 speech-to-video (S2V)",
    "WAN22_Animate": "Wan 2.2 Animate",
}
ACCEPTED = ("WAN21_T2V", "Wan21", "t2v")  # model config, latent format, unet model_type


def model_family(model) -> tuple[str, str, str]:
    """(model config class, latent format class, unet model_type) as ComfyUI detected them."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    unet = getattr(config, "unet_config", None) or {}
    return (type(config).__name__ if config is not None else "unknown",
            type(getattr(base, "latent_format", None)).__name__, str(unet.get("model_type", "")))


def check_model_family(model) -> None:
    """Refuse, by name, every model ComfyUI did not detect as a Wan 2.1 text-to-video model (the family
    of Self Forcing and Causal Forcing): decided by ComfyUI's model config, latent format and model
    type, not by tensor shapes."""
    config, latent, model_type = model_family(model)
    if (config, latent, model_type) == ACCEPTED:
        return
    what = WAN_FAMILY.get(config)
    detected = f"ComfyUI detected it as {config} with the {latent} latent format"
    if what is None:
        raise ModelFamilyError(
            f"this model is not a Wan2.1-family video transformer ({detected}). Load a Self Forcing / Causal "
            "Forcing (Wan 2.1 text-to-video) checkpoint with 'Load Diffusion Model'.")
    raise ModelFamilyError(
        f"this model is {what} ({detected}{', type ' + model_type if model_type else ''}); Head Forcing samples "
        "Wan 2.1 text-to-video models (Self Forcing, Causal Forcing: WAN21_T2V, Wan21 latents). Load such a "
        "checkpoint with 'Load Diffusion Model'.")


def wan_backbone(model):
    """The Wan module inside a MODEL (ModelPatcher) and its shape; ModelFamilyError otherwise."""
    base = getattr(model, "model", None)
    module = getattr(base, "diffusion_model", None)
    if module is None:
        raise ModelFamilyError(f"expected a MODEL from 'Load Diffusion Model', got {type(model).__name__}")
    check_model_family(model)
    try:
        spec = inspect_backbone(module)
    except ModelFamilyError as e:
        config = type(getattr(base, "model_config", None)).__name__
        raise ModelFamilyError(f"{e} (ComfyUI detected this checkpoint as {config})") from None
    return module, spec


def on_host(model) -> bool:
    """Whether the model runs on the CPU (then AR_STATE copies share its memory)."""
    return torch.device(model.load_device).type == "cpu"


def describe_video_length(unit: str):
    """``describe_length`` for the sampler's length widget: latent frames → the user's unit."""
    def text(t: int) -> str:
        frames = video_frames_for(t)
        if unit == "seconds":
            return f"{max(1, (t - 1) // TIME_COMPRESSION)} seconds ({frames} frames)"
        return f"{frames} frames ({seconds_of(t):.1f} s)"
    return text


def describe_pixels(h: int, w: int) -> str:
    return f"{w * SPACE_COMPRESSION}x{h * SPACE_COMPRESSION}"


def describe_schedule_length(t: int) -> str:
    return f"{t} latent frames ({added_video_frames(t) / FPS:g} s) in total"


def compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI itself computes this model in: the manual-cast dtype (fp8 / low-precision
    weights) if there is one, else the weight dtype."""
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or model.model_dtype()
    if dtype is None or not dtype.is_floating_point or dtype.itemsize < 2:
        return torch.float32
    return dtype


def describe_weights(model) -> str:
    """How ComfyUI holds a MODEL's weights: ``"float8_e4m3fn"`` (UNETLoader's fp8 weight_dtype: every
    parameter but the float32 patch embedding), ``"scaled float8_e4m3fn Linear layers, the rest float32"``
    (a scaled-fp8 file: comfy/model_detection.py reads its ``scaled_fp8`` marker), ``"bfloat16"`` …"""
    def name(dtype) -> str:
        return str(dtype).replace("torch.", "")

    scaled = getattr(getattr(model.model, "model_config", None), "scaled_fp8", None)
    if scaled is not None:
        return f"scaled {name(scaled)} Linear layers, the rest {name(model.model_dtype())}"
    return name(model.model_dtype())


def count_noun(n: int, one: str, many: str | None = None) -> str:
    """``count_noun(1, "chunk")`` → ``"1 chunk"``, ``count_noun(2, "pass", "passes")`` → ``"2 passes"``."""
    return f"{n} {one if n == 1 else (many or one + 's')}"
