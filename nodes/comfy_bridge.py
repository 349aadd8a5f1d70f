"""The ONLY place that turns ComfyUI objects into core arguments (and core results back).

Nodes stay thin: they declare a schema and hand their inputs to one function here, which
converts ComfyUI values (ModelPatcher, CONDITIONING, widget values) into what
:mod:`headforcing_core` takes and calls one core function.

The module imports ComfyUI lazily (inside the functions that need it), so the pure helpers
at the top (step parsing, frame arithmetic, noise, policy building) can be tested without a
ComfyUI install.

Facts this module relies on (ComfyUI 0.3.75):

* ``patcher.model.diffusion_model`` is the Wan module (``comfy.ldm.wan.model.WanModel``); its
  layers are ComfyUI ops that cast weights on the fly, so the core calls them, never copies.
* The diffusion model works in the *normalized* latent space (``latent_format.process_in``:
  ``(x - mean) / std`` per channel for Wan 2.1). KSampler turns the LATENT it is given into
  that space before sampling and back with ``process_latent_out`` after. Our initial noise is
  already a sample of that space, so the core's output goes through ``process_latent_out``
  (``x * std + mean``) before it leaves as a LATENT that ``VAEDecode`` understands.
* Progress: ``comfy.utils.ProgressBar`` → the server's global hook, which sends a websocket
  ``progress`` message (and a preview image when one is attached) and *also* raises
  ``InterruptProcessingException`` when the interrupt flag is set.
* Interruption: ``comfy.model_management.processing_interrupted()`` is the flag POST
  /interrupt sets; ``throw_exception_if_processing_interrupted()`` clears it and raises.
* Previews: ``latent_preview.get_previewer(device, latent_format)`` honours the server's
  ``--preview-method`` (``auto`` → latent2rgb unless a TAE decoder is installed) and decodes
  a *normalized* latent.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, replace

import torch

from headforcing_core.backbone import BackboneSpec, inspect_backbone
from headforcing_core.errors import HeadForcingError, Interrupted, ModelFamilyError, ShapeError
from headforcing_core.memory import GiB, estimate_run, with_weights
from headforcing_core.memory import preflight as core_preflight
from headforcing_core.noise import initial_noise as core_initial_noise
from headforcing_core.policies import (PRESETS, CachePolicy, Cyclic, Episodic, HeadLabels, Merge, PyramidRule, Stride,
                                      describe, make_policy)
from headforcing_core.schedule import SELF_FORCING_SHIFT, SELF_FORCING_STEPS, FlowMatchSchedule
from headforcing_core.wan_model import WanConfig

log = logging.getLogger("headforcing")

FPS = 16                    # Self Forcing / Causal Forcing / Wan 2.1 frame rate
TIME_COMPRESSION = 4        # Wan VAE: T latent frames <-> 4T-3 video frames
SPACE_COMPRESSION = 8       # Wan VAE: 8x8 pixels per latent cell
SIZE_MULTIPLE = 16          # VAE 8x * patch 2x
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
WAN_1_3B = WanConfig()      # the shape the policy node's memory figure assumes


# =============================================================================================
# pure helpers (no ComfyUI)
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


def parse_first_chunk_steps(text) -> tuple[float, ...] | None:
    """The first-chunk step list widget: empty (or only spaces) = none, else a step list like ``steps``
    (Causal Forcing++'s ``denoising_step_list_first_chunk``)."""
    if text is None or not str(text).strip():
        return None
    try:
        steps = parse_steps(text)
        FlowMatchSchedule(steps, DEFAULT_SHIFT)  # order and range; the shift is checked with the main list
    except ShapeError as e:
        raise ShapeError(f"first_chunk_steps: {e} (leave it empty for no separate first-chunk list)") from None
    return steps


@dataclass(frozen=True)
class ModelPreset:
    """The sampling settings of one public checkpoint, as its own inference config sets them."""

    frames_per_block: int
    steps: tuple[float, ...]
    first_chunk_steps: tuple[float, ...] | None
    shift: float
    source: str  # checkpoint and config it comes from


_FOUR = SELF_FORCING_STEPS  # (1000, 750, 500, 250)
CUSTOM_PRESET = "custom"
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
}


def steps_text(steps) -> str:
    """``(1000.0, 750.0)`` → ``"1000,750"`` (what the widgets hold); None → ``""``."""
    return "" if not steps else ",".join(f"{float(s):g}" for s in steps)


@dataclass(frozen=True)
class SamplingSettings:
    """Frames per block, steps, first-chunk steps and shift after the model preset is applied."""

    preset: str
    frames_per_block: int
    steps: str
    first_chunk_steps: str
    shift: float
    source: str = ""
    replaced: tuple[str, ...] = ()  # widget values the preset replaced ("steps 1000,750 -> 1000,500")


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
    want = {"frames_per_block": preset.frames_per_block, "steps": steps_text(preset.steps),
            "first_chunk_steps": steps_text(preset.first_chunk_steps), "shift": float(preset.shift)}
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
                            want["shift"], preset.source, tuple(replaced))


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
    return int(length) * FPS + 1 if unit == "seconds" else int(length)


def latent_frames_for(frames: int) -> int:
    """Latent frames for ``frames`` video frames (ComfyUI's Wan rule): ``(frames - 1) // 4 + 1``."""
    return (int(frames) - 1) // TIME_COMPRESSION + 1


def decoded_frames(latent_frames: int) -> int:
    """Video frames VAEDecode makes from ``latent_frames``: ``4T - 3``."""
    return TIME_COMPRESSION * int(latent_frames) - 3


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
            f"{frames_per_block} latent frames; ask for at least {decoded_frames(frames_per_block)} frames "
            f"(or lower frames_per_block)"
        )


def latent_shape(width: int, height: int, latent_frames: int, batch: int = 1, channels: int = 16) -> tuple:
    """ComfyUI's Wan video latent layout ``[B, 16, T, H/8, W/8]``."""
    return (batch, channels, latent_frames, height // SPACE_COMPRESSION, width // SPACE_COMPRESSION)


def initial_noise(shape, seed: int) -> torch.Tensor:
    """The sampler's starting noise: float32 on the CPU, bit-identical to
    ``comfy.sample.prepare_noise(torch.zeros(shape), seed)`` (what KSampler draws for an empty
    latent of the same shape), but from a private generator instead of the global one
    (:func:`headforcing_core.noise.initial_noise`)."""
    return core_initial_noise(shape, seed)


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
    if preset not in PRESETS:
        raise HeadForcingError(f"unknown policy preset {preset!r}; choose one of {', '.join(PRESETS)}")
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
    policy = make_policy(preset, **kw)
    memory = policy.rule_map.get("memory")
    if memory is not None and isinstance(memory.middle, Episodic):
        episodic = memory.middle
        if memory_episodes is not None:
            episodic = replace(episodic, cap=int(memory_episodes))
        if memory_similarity is not None:
            episodic = replace(episodic, similarity=float(memory_similarity))
        if episodic != memory.middle:
            policy = make_policy(preset, rules={"memory": replace(memory, middle=episodic)}, **kw)
    return policy


def sampler_policy(kv_policy: CachePolicy | None, preset: str) -> CachePolicy:
    """The connected KV_POLICY wins; otherwise the sampler's ``policy`` dropdown preset."""
    if kv_policy is not None:
        if not isinstance(kv_policy, CachePolicy):
            raise HeadForcingError(f"kv_policy must come from a Head Forcing Cache Policy node, got "
                                   f"{type(kv_policy).__name__}")
        return kv_policy
    if preset not in PRESETS:
        raise HeadForcingError(f"unknown policy preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return make_policy(preset)


def spec_of(config: WanConfig) -> BackboneSpec:
    return BackboneSpec(config.dim, config.num_heads, config.num_layers, tuple(config.patch_size), config.in_dim,
                        config.out_dim, config.text_dim, config.freq_dim, config.text_len)


def policy_summary(policy: CachePolicy, *, width: int, height: int, frames: int, frames_per_block: int = 3,
                   spec: BackboneSpec | None = None, dtype: torch.dtype = torch.bfloat16) -> str:
    """What the policy keeps and the memory it will use for a video of ``width``×``height``, ``frames`` frames."""
    check_video_size(width, height)
    latent = latent_frames_for(frames)
    check_length(frames, latent, frames_per_block)
    shape_note = "" if spec is not None else "Wan2.1-T2V-1.3B, "
    spec = spec or spec_of(WAN_1_3B)
    est = estimate_run(spec, policy, latent_frames=latent, latent_height=height // SPACE_COMPRESSION,
                       latent_width=width // SPACE_COMPRESSION, frames_per_block=frames_per_block, batch=1,
                       dtype=dtype)
    dtype_name = str(dtype).replace("torch.", "")
    return "\n".join([
        describe(policy),
        f"estimate for {shape_note}{width}x{height}, {decoded_frames(latent)} frames "
        f"({latent} latent, {decoded_frames(latent) / FPS:.1f} s at {FPS} fps), {dtype_name}, "
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
        return decoded_frames(self.total_latent_frames)

    @property
    def chunks(self) -> int:
        return -(-self.latent_frames // self.frames_per_block)

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
            least = decoded_frames(initial_frames + frames_per_block)
            raise ShapeError(
                f"length {frames} video frames is {latent} latent frames in all, but the initial latent already has "
                f"{initial_frames} ({decoded_frames(initial_frames)} video frames), which leaves "
                f"{max(new, 0)} new latent frame(s), less than one chunk of {frames_per_block}: length counts the "
                f"whole video, initial frames included; ask for at least {least} frames "
                f"({least / FPS:.2f} s)")
        latent = new
    else:
        check_length(frames, latent, frames_per_block)
    step_values = parse_steps(steps)
    FlowMatchSchedule(step_values, float(shift))  # raises ShapeError for a bad list or shift
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
        hint = (f"a single image (1 latent frame) needs a frame-wise model: frames_per_block 1 (model_preset "
                f"'Causal Forcing frame-wise 4-step' or a Causal Forcing++ one)" if t0 == 1 else
                f"trim the video to {decoded_frames(whole)} or {decoded_frames(whole + fpb)} frames (Image From Batch) "
                "before VAEEncode")
        raise ShapeError(
            f"initial_latent has {_count(t0, 'latent frame')} ({_count(decoded_frames(t0), 'video frame')}); with "
            f"{fpb} frames per block "
            f"the cache takes whole chunks of {fpb} latent frames (as Self Forcing's and Causal Forcing's pipelines "
            f"do): {hint}")
    validate_initial_latent(samples, latent_shape(req.width, req.height, req.latent_frames), req.frames_per_block,
                            channels)


# =============================================================================================
# ComfyUI-facing
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


def preflight(model, spec: BackboneSpec, estimate_at, *, latent_frames: int, latent_height: int,
              latent_width: int, min_frames: int, describe_length=None, describe_size=None,
              what: str = "the video", bounded_policy_hint: bool = False):
    """The one pre-flight of every node that allocates: refuse (naming the input that drives the cost)
    what cannot fit in an empty device before evicting or loading anything, load the model, then
    refuse what does not fit next to its weights. Returns the run's estimate.

    ``estimate_at(latent_frames, latent_height, latent_width)`` is the run's
    :func:`~headforcing_core.memory.estimate_run` at another length or size."""
    import comfy.model_management as mm

    device = model.load_device
    weights = int(model.model_size())
    kw = dict(latent_frames=latent_frames, latent_height=latent_height, latent_width=latent_width,
              patch=tuple(spec.patch_size[1:]), min_frames=min_frames, describe_length=describe_length,
              describe_size=describe_size, what=what, bounded_policy_hint=bounded_policy_hint)
    est = core_preflight(lambda t, h, w: with_weights(estimate_at(t, h, w), weights),
                         free_bytes=mm.get_total_memory(device), **kw)
    mm.load_models_gpu([model], memory_required=est.run_bytes, force_full_load=True)
    return core_preflight(estimate_at, free_bytes=mm.get_free_memory(device), **kw)


def on_host(model) -> bool:
    """Whether the model runs on the CPU (then AR_STATE copies share its memory)."""
    return torch.device(model.load_device).type == "cpu"


def describe_video_length(unit: str):
    """``describe_length`` for the sampler's length widget: latent frames → the user's unit."""
    def text(t: int) -> str:
        frames = decoded_frames(t)
        if unit == "seconds":
            return f"{max(1, (t - 1) // TIME_COMPRESSION)} seconds ({frames} frames)"
        return f"{frames} frames ({frames / FPS:.1f} s)"
    return text


def describe_pixels(h: int, w: int) -> str:
    return f"{w * SPACE_COMPRESSION}x{h * SPACE_COMPRESSION}"


def describe_schedule_length(t: int) -> str:
    return f"{t} latent frames ({t / (FPS / TIME_COMPRESSION):g} s) in total"


def compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI itself computes this model in: the manual-cast dtype (fp8 / low-precision
    weights) if there is one, else the weight dtype."""
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or model.model_dtype()
    if dtype is None or not dtype.is_floating_point or dtype.itemsize < 2:
        return torch.float32
    return dtype


class ComfyHooks:
    """Core hooks wired to ComfyUI: progress bar, interrupt flag, per-chunk previews, chunk timing."""

    def __init__(self, model, total_calls: int):
        import comfy.model_management
        import comfy.utils
        import latent_preview

        self._mm = comfy.model_management
        self.pbar = comfy.utils.ProgressBar(total_calls)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.done = 0
        self.total = total_calls
        self.chunk_seconds: list[float] = []
        self._chunk_started = time.perf_counter()

    def progress(self, done: int, total: int) -> None:
        self.done = done
        self.pbar.update_absolute(done, total)

    def should_stop(self) -> bool:
        return self._mm.processing_interrupted()

    def on_chunk(self, index: int, x0: torch.Tensor) -> None:
        now = time.perf_counter()
        self.chunk_seconds.append(now - self._chunk_started)
        self._chunk_started = now
        from . import messages
        messages.chunk_done(x0)  # the node's live panel in the browser, if one is open (nodes/messages.py)
        if self.previewer is None:
            return
        # the chunk's newest latent frame (normalized space, what the previewers expect)
        preview = self.previewer.decode_latent_to_preview_image("JPEG", x0[:1, :, -1:].float())
        self.pbar.update_absolute(self.done, self.total, preview)


def run_interruptible(fn, hooks: "ComfyHooks"):
    """Run a core call whose hooks watch ComfyUI's interrupt flag, and end the node the way
    ComfyUI expects when it is set: the core's ``should_stop`` hook (before every model call)
    raises :class:`Interrupted`, ComfyUI's progress hook (after every call) raises its own
    ``InterruptProcessingException``; both leave the server ready for the next prompt."""
    import comfy.model_management as mm

    try:
        return fn()
    except (Interrupted, mm.InterruptProcessingException) as e:
        log.info("headforcing: interrupted after %d of %d model calls", hooks.done, hooks.total)
        if isinstance(e, mm.InterruptProcessingException):
            raise
        mm.throw_exception_if_processing_interrupted()  # clears the flag and raises
        raise mm.InterruptProcessingException() from None


def run_ar_sampler(model, conditioning, *, kv_policy: CachePolicy | None, policy_preset: str, width: int,
                   height: int, length: int, length_unit: str, seed: int, steps: str, shift: float,
                   frames_per_block: int, prompt_schedule=None, initial_latent=None, model_preset: str = CUSTOM_PRESET,
                   first_chunk_steps: str = "") -> tuple[dict, str, object]:
    """HeadForcingARSampler's work: validate, pre-flight memory check, load, generate, un-normalize.

    Returns ``({"samples": latents}, report, ar_state)``. Every input error is raised (as a ValueError
    subclass) before the model is loaded or anything is allocated. A connected ``prompt_schedule``
    (PROMPT_SCHEDULE) replaces ``conditioning`` and ``length`` (multi-prompt glue and the AR_STATE:
    nodes/continuation.py; one segment from frame 0 samples exactly like ``generate``).

    ``model_preset`` (:data:`MODEL_PRESETS`): ``custom`` uses ``frames_per_block`` / ``steps`` /
    ``first_chunk_steps`` / ``shift`` as given, any other preset replaces them (:func:`apply_model_preset`).
    ``initial_latent`` (a LATENT from VAEEncode, the VAE's raw space) is mapped into the model's space with
    ``process_latent_in`` (as KSampler does) and put into the cache first; ``length`` then counts the whole
    video and the output LATENT holds only the new frames (join them with LatentConcat).
    """
    import comfy.model_management as mm
    from headforcing_core.backbone import WanRunner
    from headforcing_core.memory import latent_bytes
    from headforcing_core.prompts import TAIL_FRAMES, count_model_calls
    from headforcing_core.sampler import chunk_bounds, validate_inputs
    from headforcing_core.state import generate_schedule

    from .continuation import default_recache_mode, sampler_schedule, schedule_report, story_noise

    policy = sampler_policy(kv_policy, policy_preset)
    sampling = apply_model_preset(model_preset, frames_per_block=frames_per_block, steps=steps,
                                  first_chunk_steps=first_chunk_steps, shift=shift)
    initial = initial_latent_samples(initial_latent)
    t0 = 0 if initial is None else int(initial.shape[2])
    req = make_request(width=width, height=height, length=length, length_unit=length_unit, seed=seed,
                       steps=sampling.steps, shift=sampling.shift, frames_per_block=sampling.frames_per_block,
                       policy=policy, first_chunk_steps=sampling.first_chunk_steps, initial_frames=t0,
                       sampling=sampling)
    module, spec = wan_backbone(model)
    schedule = sampler_schedule(prompt_schedule, conditioning, req.latent_frames, req.frames_per_block)
    req = replace(req, latent_frames=schedule.total_frames)
    shape = latent_shape(req.width, req.height, req.latent_frames, channels=spec.in_dim)
    # text width, channels, grid: checked on a shape-only tensor (nothing allocated yet)
    for segment in schedule:
        validate_inputs(WanRunner(module), segment.context, torch.empty(shape, device="meta"), req.frames_per_block)
    if initial is not None:
        check_initial_latent(initial, req, spec.in_dim)

    dtype = compute_dtype(model)
    text_tokens = max(seg.context.shape[1] for seg in schedule)

    def estimate_at(t: int, h: int, w: int):
        # the cache covers the initial frames and the new ones; the initial latent is held on the device
        # (the model's-space copy and the latents kept for a recache) next to the new frames' noise and output
        return estimate_run(spec, policy, latent_frames=t0 + t, new_frames=t, latent_height=h, latent_width=w,
                            frames_per_block=req.frames_per_block, batch=1, dtype=dtype,
                            state_on_device=on_host(model), output_copies=1, text_tokens=text_tokens,
                            extra_bytes=2 * latent_bytes(spec, t0, h, w) if t0 else 0,
                            extra_label="initial latent")

    if t0:
        def describe_length(t: int) -> str:
            return describe_video_length(length_unit)(t0 + t) + " in all, initial frames included"
    else:
        describe_length = describe_video_length(length_unit)
    # one pre-flight (refuse before anything is allocated; the runner reads its device off the
    # weights, so they are loaded whole, no lowvram split)
    estimate = preflight(
        model, spec, estimate_at, latent_frames=req.latent_frames, latent_height=shape[-2], latent_width=shape[-1],
        min_frames=req.frames_per_block,
        describe_length=describe_schedule_length if prompt_schedule is not None else describe_length,
        describe_size=None if t0 else describe_pixels,  # the initial latent fixes the size
        what="the schedule" if prompt_schedule is not None else "the video",
        bounded_policy_hint=not policy.is_bounded())
    device = model.load_device
    # the segment covering latent frames [s, e) starts from frames s..e-1 of a fresh e-frame draw (the new
    # frames after an initial latent: frames t0.. of it)
    noise = story_noise(lambda n: latent_shape(req.width, req.height, n, channels=spec.in_dim), req.seed, t0, schedule)
    first = None if req.first_chunk_steps is None else len(req.first_chunk_steps)
    calls = count_model_calls(schedule, req.frames_per_block, len(req.steps), first_steps=first,
                              default_mode=default_recache_mode(policy),
                              **({"start_frame": t0, "context": schedule[0].context, "started": True,
                                  "tail_frames": min(t0, TAIL_FRAMES)} if t0 else {}))
    calls += len(chunk_bounds(0, t0, req.frames_per_block)) if t0 else 0
    hooks = ComfyHooks(model, calls)
    from . import messages  # the live panel: chunk k of n, seconds, segment, KV in use, newest chunk
    messages.describe_run(
        total_latent_frames=req.latent_frames, start_frame=t0, frames_per_block=req.frames_per_block,
        policy=policy.preset, latent_format=model.model.latent_format,
        segments=[(seg.label, seg.frames) for seg in schedule],
        kv_bytes_at=lambda n: estimate_run(spec, policy, latent_frames=max(1, n), latent_height=shape[-2],
                                           latent_width=shape[-1], frames_per_block=req.frames_per_block,
                                           dtype=dtype).kv_bytes,
        kv_budget_bytes=estimate.kv_bytes, width=req.width, height=req.height)
    # ComfyUI's LATENT is in the VAE's raw space; the model samples in the normalized one (KSampler's
    # process_latent_in)
    start = None if initial is None else model.model.process_latent_in(initial.float()).to(device)
    t_start = time.perf_counter()
    latents, state = run_interruptible(lambda: generate_schedule(
        module, schedule, noise.to(device), steps=req.steps, shift=req.shift, frames_per_block=req.frames_per_block,
        policy=policy, generator=renoise_generator(req.seed), first_chunk_steps=req.first_chunk_steps,
        initial_latent=start, progress=hooks.progress, should_stop=hooks.should_stop, on_chunk=hooks.on_chunk,
        dtype=dtype), hooks)
    seconds = time.perf_counter() - t_start
    samples = model.model.process_latent_out(latents.float()).to(mm.intermediate_device())
    report = _report(req, policy, estimate, hooks.chunk_seconds, seconds, dtype, device, initial_latent)
    extra = schedule_report(schedule, t0 if prompt_schedule is not None else 0, default_recache_mode(policy))
    report += ("\n" + extra if extra else "") + f"\nAR_STATE: {state.nbytes / 2**20:.1f} MiB in CPU memory"
    report += "".join("\n" + line for line in model_patch_lines(model))
    log.info("headforcing: %s", report.replace("\n", " | "))
    return {"samples": samples}, report, state


def model_patch_lines(model) -> list[str]:
    """The MODEL's patches for the report: the LoRA / weight patches applied, and every patch the
    sampler does not apply (nodes/model_patches.py), each also logged as a warning."""
    from .model_patches import patch_report, unhonoured_patches

    for note in unhonoured_patches(model):
        log.warning("headforcing: model patch not applied: %s", note)
    return patch_report(model)


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def sampling_lines(req: SamplerRequest) -> list[str]:
    """The report's lines on what was sampled with what: model preset, frames per block, steps, first-chunk
    steps, shift, and the widget values a preset replaced."""
    sm = req.sampling
    first = steps_text(req.first_chunk_steps) or "none"
    lines = [f"model preset: {sm.preset if sm else CUSTOM_PRESET}"
             + (f" ({sm.source})" if sm and sm.source else " (the frames_per_block, steps, first_chunk_steps and "
                                                          "shift widgets)")
             + f": frames per block {req.frames_per_block}, steps {steps_text(req.steps)}, first-chunk steps "
             f"{first}, shift {req.shift:g}"]
    if sm and sm.replaced:
        lines.append("  the preset replaced the widget values " + "; ".join(sm.replaced)
                     + " (model_preset 'custom' uses the widgets)")
    return lines


def _report(req: SamplerRequest, policy: CachePolicy, estimate, chunk_seconds: list[float], seconds: float,
            dtype: torch.dtype, device, initial_latent=None) -> str:
    per_chunk = seconds / max(1, len(chunk_seconds))
    steady = sum(chunk_seconds[1:]) / (len(chunk_seconds) - 1) if len(chunk_seconds) > 1 else per_chunk
    new_video = TIME_COMPRESSION * req.latent_frames if req.initial_frames else req.frames
    if req.initial_frames:
        t0 = req.initial_frames
        head = (f"Head Forcing AR sampler: {new_video} new frames ({req.latent_frames} latent) after an initial latent "
                f"of {_count(t0, 'latent frame')} ({_count(decoded_frames(t0), 'video frame')}); the whole video is "
                f"{req.frames} frames "
                f"({req.total_latent_frames} latent, {req.frames / FPS:.2f} s at {FPS} fps) at {req.width}x{req.height}, "
                f"seed {req.seed}" + (f" (asked for {req.frames_requested} frames)"
                                      if req.frames_requested != req.frames else ""))
        ignored = sorted(k for k in (initial_latent or {}) if k != "samples")
        passes = -(-t0 // req.frames_per_block)
        init = [f"initial latent: {_count(t0, 'latent frame')} put into the cache first "
                f"({_count(passes, 'clean pass', 'clean passes')} at timestep 0); the LATENT output "
                "holds only the new frames: join them after it with LatentConcat (dim t) and decode once"
                + (f"; its {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not used" if ignored else "")]
    else:
        head = (f"Head Forcing AR sampler: {req.frames} frames ({req.latent_frames} latent, "
                f"{req.frames / FPS:.2f} s at {FPS} fps) at {req.width}x{req.height}, seed {req.seed}"
                + (f" (asked for {req.frames_requested} frames)" if req.frames_requested != req.frames else ""))
        init = []
    first = (f"; the first chunk {len(req.first_chunk_steps)} steps ({steps_text(req.first_chunk_steps)})"
             if req.first_chunk_steps is not None else "")
    lines = [
        head,
        *init,
        *sampling_lines(req),
        f"chunks: {req.chunks} of {req.frames_per_block} latent frames"
        + (f" (the last one {req.latent_frames % req.frames_per_block})" if req.latent_frames % req.frames_per_block
           else "")
        + f", {len(req.steps)} steps + clean pass each{first}, "
        f"steps {','.join(f'{s:g}' for s in req.steps)}, shift {req.shift:g}",
        f"policy: {describe(policy)}",
        *[f"  {n}" for n in estimate.notes],
        f"memory estimate: {estimate.breakdown()}; peak ≈ {estimate.run_bytes / GiB:.3f} GiB "
        f"({estimate.peak_phase}) + weights",
        f"time: {seconds:.2f} s, {per_chunk:.3f} s/chunk (steady {steady:.3f} s/chunk), "
        f"{new_video / seconds if seconds > 0 else 0:.2f} video frames/s on {device} in "
        f"{str(dtype).replace('torch.', '')}",
    ]
    return "\n".join(lines)
