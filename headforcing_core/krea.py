"""Krea Realtime 14B's loop: the KV cache rebuilt before every block.

Krea's inference is its server's session, ``release_server.py`` ``GenerationSession`` in
``krea-ai/realtime-video`` (``sample.py`` runs the same session; ``pipeline/causal_inference.py``
``inference`` is Self Forcing's loop and is not used). Per block of 3 latent frames
(``generate_block_internal``; docs/krea.md has every rule with its source):

1. ``recompute_kv_cache``: the cache is emptied and the *context* — at most ``kv_cache_num_frames``
   (K, default 3) clean latents, :func:`context_frames` — runs once at timestep 0 with a block-causal
   mask in 3-frame chunks, at RoPE positions ``0 … n−1`` (``n = min(frames so far, K)``), writing its
   K/V. Its cross-attention still holds the previous block's prompt (the cross-attention cache is
   only rebuilt when an interpolated prompt is popped, after this call).
2. the block's noisy latents (drawn for the whole video at the start, :func:`~.noise.krea_initial_noise`)
   are denoised at positions ``n … n+2`` over ``linspace(1000, 0, 5)`` warped through the shift-5 table
   (:meth:`~.schedule.FlowMatchSchedule.linspace`), each call attending the context and the block
   itself, no mask; fresh noise between steps (:func:`~.noise.krea_renoise`). No clean pass.
3. the block is decoded (a streaming VAE decode), and the last ``1 + (K−1)·4`` decoded frames are kept:
   once the video is long enough, the oldest of them is VAE-encoded alone as the context's first latent.

Here, a rebuild is the ``full`` policy with absolute RoPE on a fresh cache: :meth:`ARSampler.prefill`
of the context at frames ``0 … n−1`` (chunk by chunk at timestep 0 = the block-causal mask), then
:meth:`ARSampler.run_chunk` of the block at frame ``n`` without the clean pass. The request is resolved
once (:func:`resolve_krea` → :class:`KreaRequest`: settings, blocks with their context sources, the
prompt embedding of every block) and :class:`KreaSampler` carries it out. The VAE side comes in as two
callables (:class:`ContextVAE`); without one the caller picks an approximation
(``first_latent="latent"``) or Krea's own ``keep_first_frame`` option.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from .backbone import BackboneSpec, TextContext, WanRunner
from .errors import HeadForcingError, ShapeError
from .geometry import SPACE_COMPRESSION, TIME_COMPRESSION, chunk_bounds, video_frames_for
from .memory import RunEstimate, estimate_run, latent_bytes
from .noise import krea_renoise
from .policies import TRAINING_WINDOW, make_policy
from .prompts import PromptSchedule, ScheduleError
from .sampler import ARSampler, Hooks
from .schedule import FlowMatchSchedule, linspace_steps
from .transitions import krea_interpolation, same_context

# Krea's defaults (release_server.py GenerateParams, GenerationSession, ws_session)
KREA_CONTEXT_FRAMES = 3  # GenerateParams.kv_cache_num_frames
KREA_BLOCK_FRAMES = 3  # GenerationSession.num_frame_per_block
KREA_STEPS = 5  # GenerateParams.num_denoising_steps
KREA_SHIFT = 5.0  # GenerateParams.timestep_shift
KREA_INTERPOLATION_BLOCKS = 4  # ws_session: interp_steps, default 4
# How the context's first latent is made once the video is longer than the context (docs/krea.md):
#   reencode   — Krea's rule: the oldest of the last 1 + (K−1)·4 decoded frames, VAE-encoded alone (needs a VAE)
#   latent     — our approximation without a VAE: the generated latent that frame was decoded from (frame n − K)
#   keep_first — Krea's keep_first_frame option: the video's first latent, always
FIRST_LATENT_MODES = ("reencode", "latent", "keep_first")
FIRST_LATENT_TEXT = {
    "reencode": "Krea's rule: the oldest of the last decoded frames, VAE-encoded alone",
    "latent": "APPROXIMATION (no VAE): the generated latent that frame was decoded from stands in for its "
              "re-encoding",
    "keep_first": "Krea's keep_first_frame option: the video's first latent, always",
}


class KreaError(HeadForcingError):
    """Settings or inputs Krea's loop cannot run."""


@dataclass(frozen=True)
class KreaSettings:
    """Krea's loop as the server's parameters set it (``GenerateParams``; defaults are Krea's)."""

    context_frames: int = KREA_CONTEXT_FRAMES
    frames_per_block: int = KREA_BLOCK_FRAMES
    steps: tuple[float, ...] = linspace_steps(KREA_STEPS)
    shift: float = KREA_SHIFT
    interpolation_blocks: int = KREA_INTERPOLATION_BLOCKS
    first_latent: str = "reencode"

    def validate(self, window: int = TRAINING_WINDOW) -> None:
        """Refuse what cannot run, saying what to change (before anything is allocated)."""
        k, f = int(self.context_frames), int(self.frames_per_block)
        if f < 1:
            raise KreaError(f"frames per block must be at least 1, got {f}")
        if k < 1:
            raise KreaError(f"the context needs at least 1 latent frame, got {k}")
        if k + f > window:
            raise KreaError(
                f"a context of {k} latent frames before a block of {f} puts the block at RoPE positions "
                f"{k}–{k + f - 1}; the model was trained on {window} latent frames (positions 0–{window - 1}): use at "
                f"most {window - f} context frames (Krea's default is {KREA_CONTEXT_FRAMES})")
        if self.first_latent not in FIRST_LATENT_MODES:
            raise KreaError(f"unknown first_latent {self.first_latent!r}; choose one of {', '.join(FIRST_LATENT_MODES)}")
        if int(self.interpolation_blocks) < 1:
            raise KreaError(f"a prompt interpolation takes at least 1 block, got {self.interpolation_blocks}")
        self.schedule()  # ShapeError for a bad step list or shift

    def schedule(self) -> FlowMatchSchedule:
        return FlowMatchSchedule(tuple(self.steps), float(self.shift))

    @property
    def pixel_window(self) -> int:
        """Decoded frames Krea keeps (``frame_context_cache = deque(maxlen=1 + (K − 1)·4)``)."""
        return 1 + (int(self.context_frames) - 1) * TIME_COMPRESSION

    @property
    def needs_vae(self) -> bool:
        return self.first_latent == "reencode"

    def describe(self) -> str:
        steps = ",".join(f"{s:g}" for s in self.steps)
        return (f"Krea's loop: cache rebuilt every block from {self.context_frames} context latent frame(s), "
                f"blocks of {self.frames_per_block}, steps {steps} (shift {self.shift:g}), no clean pass; "
                f"prompt changes interpolated over {self.interpolation_blocks} block(s); context's first latent: "
                f"{FIRST_LATENT_TEXT[self.first_latent]}")


# ---------------------------------------------------------------------------------------------
# the rules, as data


@dataclass(frozen=True)
class ContextFrame:
    """One context latent: a generated latent frame (``kind="latent"``, ``index`` its frame in the video) or a
    decoded pixel frame VAE-encoded alone (``kind="pixel"``, ``index`` its frame among the decoded frames)."""

    kind: str
    index: int


def context_frames(block: int, settings: KreaSettings) -> tuple[ContextFrame, ...]:
    """The context of block ``block`` (0-based) — ``GenerationSession.get_clean_context_frames``, called by
    ``recompute_kv_cache``: none for the first block; then, with ``cur = block · f`` frames made,

    * while ``(block − 1)·f < K`` (the video is short) or with ``keep_first_frame``: the first latent and
      the last ``K − 1`` latents after it (``cat(latents[:1], latents[1:][-K+1:])``);
    * afterwards: the oldest of the last ``1 + (K−1)·4`` decoded frames — frame ``4·(cur − K)``, the last
      frame latent ``cur − K`` decodes to — VAE-encoded alone, then the last ``K − 1`` latents.

    The context sits at RoPE positions ``0 … n−1``; ``n = min(cur, K)`` frames
    (``model_input_start_frame``). ``first_latent="latent"`` puts latent ``cur − K`` where the re-encoded
    frame would be. ``K = 1`` takes no latents after the first one (Krea's ``[-K+1:]`` is then ``[0:]``,
    every latent — docs/krea.md)."""
    k, f = int(settings.context_frames), int(settings.frames_per_block)
    if block <= 0:
        return ()
    cur = block * f
    tail = tuple(ContextFrame("latent", j) for j in range(max(1, cur - (k - 1)), cur)) if k > 1 else ()
    if settings.first_latent == "keep_first" or (block - 1) * f < k:
        return (ContextFrame("latent", 0),) + tail
    if settings.first_latent == "latent":
        return (ContextFrame("latent", cur - k),) + tail
    return (ContextFrame("pixel", TIME_COMPRESSION * (cur - k)),) + tail


@dataclass(frozen=True)
class KreaBlock:
    """One block of Krea's loop: latent frames ``start … start+frames−1`` of the video, denoised at RoPE
    positions ``len(context) …`` after its context (at ``0 …``)."""

    index: int
    start: int
    frames: int
    context: tuple[ContextFrame, ...]

    @property
    def rope_start(self) -> int:
        return len(self.context)

    def model_calls(self, steps: int, frames_per_block: int) -> int:
        """The context's passes (one per chunk of the block-causal mask) and one call per step."""
        return len(chunk_bounds(0, self.rope_start, frames_per_block)) + steps


def plan_blocks(latent_frames: int, settings: KreaSettings) -> tuple[KreaBlock, ...]:
    """The blocks of a ``latent_frames``-long video (a last block may be shorter: Krea's sessions are whole
    blocks, docs/krea.md)."""
    f = int(settings.frames_per_block)
    return tuple(KreaBlock(b, start, n, context_frames(b, settings))
                 for b, (start, n) in enumerate(chunk_bounds(0, latent_frames, f)))


def block_embeddings(contexts: list[torch.Tensor], block_segments: list[int],
                     interpolation_blocks: int) -> list[torch.Tensor]:
    """The text embedding every block is denoised with (``generate_block_internal``): the current prompt's,
    and after a change of prompt the embeddings :func:`~.transitions.krea_interpolation` makes, one per block
    (a change during an interpolation starts a new one from the current embedding, as
    ``interpolate_prompt_embeds`` does). ``contexts``: each segment's conditioning; ``block_segments``: the
    segment of each block. Blocks that keep an embedding share the tensor object."""
    current = contexts[block_segments[0]]
    pending: list[torch.Tensor] = []
    out = []
    previous = block_segments[0]
    for seg in block_segments:
        if seg != previous and not same_context(contexts[seg], contexts[previous]):
            pending = krea_interpolation(current, contexts[seg], interpolation_blocks)
        previous = seg
        if pending:
            current = pending.pop(0)
        out.append(current)
    return out


@dataclass(frozen=True)
class KreaRequest:
    """A Krea run, resolved once: settings, blocks (with their contexts) and each block's prompt embedding.
    The context pass of block ``b`` keeps block ``b − 1``'s embedding (Krea rebuilds the cross-attention
    cache only after ``recompute_kv_cache``, when it pops an interpolated prompt)."""

    settings: KreaSettings
    blocks: tuple[KreaBlock, ...]
    embeddings: tuple[torch.Tensor, ...]
    block_segments: tuple[int, ...]
    latent_frames: int
    switches: int  # prompt changes in the run

    @property
    def model_calls(self) -> int:
        s, f = len(self.settings.steps), self.settings.frames_per_block
        return sum(b.model_calls(s, f) for b in self.blocks)

    @property
    def needs_pixels(self) -> bool:
        return any(c.kind == "pixel" for b in self.blocks for c in b.context)


def resolve_krea(spec: BackboneSpec, prompt: torch.Tensor | PromptSchedule, settings: KreaSettings,
                 latent_frames: int | None = None, batch: int = 1) -> KreaRequest:
    """Check everything and resolve the run (no model call, nothing allocated). ``prompt``: one conditioning
    (``[B, L, text_dim]``, then ``latent_frames`` is the length) or a :class:`PromptSchedule` whose segments
    change prompt between blocks: every segment but the last a whole number of blocks."""
    settings.validate()
    f = int(settings.frames_per_block)
    if isinstance(prompt, PromptSchedule):
        schedule = prompt.resolve(f)
    else:
        if latent_frames is None:
            raise ShapeError("give latent_frames with a single conditioning")
        schedule = PromptSchedule.single(prompt, int(latent_frames))
    total = schedule.total_frames
    if total < 1:
        raise ShapeError("the video has no latent frames")
    for i, seg in enumerate(schedule):
        spec.check_context(seg.context, batch, what=f"segment {i + 1}'s conditioning" if len(schedule) > 1
                           else "conditioning")
    block_segments = []
    for i, seg in enumerate(schedule):
        if i + 1 < len(schedule) and seg.frames % f:
            raise ScheduleError(
                f"segment {i + 1} has {seg.frames} latent frames; Krea's loop changes prompts between blocks of {f} "
                f"latent frames: make every segment but the last a multiple of {f} latent frames (lengths in seconds "
                f"are rounded to whole blocks)")
    starts = [0]
    for seg in schedule:
        starts.append(starts[-1] + seg.frames)
    blocks = plan_blocks(total, settings)
    for blk in blocks:
        block_segments.append(max(i for i in range(len(schedule)) if starts[i] <= blk.start))
    contexts = [seg.context for seg in schedule]
    embeddings = block_embeddings(contexts, block_segments, int(settings.interpolation_blocks))
    switches = sum(1 for a, b in zip(block_segments, block_segments[1:])
                   if a != b and not same_context(contexts[a], contexts[b]))
    return KreaRequest(settings, blocks, tuple(embeddings), tuple(block_segments), total, switches)


# ---------------------------------------------------------------------------------------------
# decoded frames (the VAE side comes from the caller)


class ContextVAE(Protocol):
    """The VAE of Krea's context re-encode, in the model's (normalized) latent space.

    ``decode(latents)``: the video's next latent frames ``[B, C, f, H, W]`` → their pixel frames
    ``[B, F, …]`` (a *streaming* decode: called once per block in order, 4·T − 3 frames for T latents in
    all, as Wan's causal VAE decodes). ``encode(frame)``: one pixel frame ``[B, …]`` as ``decode`` made it
    → ``[B, C, 1, H, W]``, encoded alone (a first-frame latent)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode(self, frame: torch.Tensor) -> torch.Tensor: ...


class DecodedFrames:
    """Krea's ``frame_context_cache``: the last ``1 + (K−1)·4`` decoded frames (``generate_block_internal``
    decodes every block and extends the deque)."""

    def __init__(self, vae: ContextVAE, settings: KreaSettings):
        self.vae = vae
        self.frames: deque[torch.Tensor] = deque(maxlen=settings.pixel_window)
        self.count = 0  # frames decoded so far
        self.latents = 0  # latent frames decoded so far

    def push(self, latents: torch.Tensor) -> None:
        pixels = self.vae.decode(latents)
        self.latents += latents.shape[2]
        self.count += pixels.shape[1]
        if self.count != video_frames_for(self.latents):
            raise ShapeError(f"the VAE decoded {self.count} frames from {self.latents} latent frames; a Wan 2.1 VAE "
                             f"decodes T latent frames to 4T−3 ({video_frames_for(self.latents)})")
        self.frames.extend(pixels.unbind(1))

    def encode(self, index: int) -> torch.Tensor:
        """Decoded frame ``index`` (it must be the oldest one kept, as Krea's rule reads it) encoded alone."""
        oldest = self.count - len(self.frames)
        if index != oldest:
            raise RuntimeError(f"Krea's rule reads decoded frame {index}; the oldest kept is {oldest}")
        return self.vae.encode(self.frames[0])


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class KreaSampler:
    """Carries out a :class:`KreaRequest` on an :class:`ARSampler` (``full`` policy, absolute RoPE) whose cache
    is made anew for every block."""

    runner: WanRunner
    settings: KreaSettings
    backend_name: str = "auto"
    sampler: ARSampler = field(init=False)

    def __post_init__(self):
        self.sampler = ARSampler(self.runner, make_policy("full"), self.settings.schedule(),
                                 int(self.settings.frames_per_block), self.backend_name)
        self.sampler.draw_renoise = lambda shape, generator, like: krea_renoise(shape, generator, like,
                                                                                  dtype=self.runner.dtype)

    @torch.no_grad()
    def run(self, request: KreaRequest, noise: torch.Tensor, generator: torch.Generator | None,
            vae: ContextVAE | None = None, hooks: Hooks | None = None) -> torch.Tensor:
        """Generate the video (``noise`` ``[B, C, T, H, W]``, all of it drawn at the start); returns the clean
        latents in ``noise``'s layout, device and dtype."""
        hooks = hooks or Hooks()
        if request.needs_pixels and vae is None:
            raise KreaError("Krea's context re-encode needs a VAE: connect the Wan 2.1 VAE, or choose the 'latent' "
                            "approximation or Krea's keep_first option")
        b, _, t, h, w = noise.shape
        if t != request.latent_frames:
            raise ShapeError(f"noise has {t} latent frames; the run makes {request.latent_frames}")
        ar, runner = self.sampler, self.runner
        pixels = DecodedFrames(vae, self.settings) if request.needs_pixels else None
        k, f = int(self.settings.context_frames), int(self.settings.frames_per_block)
        out = torch.empty(noise.shape, dtype=noise.dtype, device=runner.device)
        total, done = request.model_calls, 0
        texts: dict[int, TextContext] = {}  # by id of the embedding object (one or two live at a time)
        previous = None
        for blk, embedding in zip(request.blocks, request.embeddings):
            text = texts.get(id(embedding)) or runner.encode_text(embedding)
            # the context first (a re-encode runs while no cache is held), then a fresh cache
            ctx = torch.cat([self._context_latent(c, out, pixels) for c in blk.context], dim=2) if blk.context else None
            ar.start(b, h, w, k + f)
            if ctx is not None:
                ar.text = previous  # the context pass keeps the previous block's prompt
                done = ar.prefill(ctx, hooks, done, total)
            ar.text = text
            x = noise[:, :, blk.start:blk.start + blk.frames].to(runner.device)
            x0 = ar.run_chunk(x, blk.rope_start, generator, hooks, done, total, commit=False)
            ar.cache = ar.last_plan = None  # rebuilt before the next block: the decode below runs without it
            done += len(self.settings.steps)
            out[:, :, blk.start:blk.start + blk.frames] = x0
            if pixels is not None:
                pixels.push(x0)
            if hooks.on_chunk is not None:
                hooks.on_chunk(blk.index, x0)
            texts = {id(embedding): text}
            previous = text
        return out.to(noise.device)

    @staticmethod
    def _context_latent(src: ContextFrame, out: torch.Tensor, pixels: DecodedFrames | None) -> torch.Tensor:
        if src.kind == "latent":
            return out[:, :, src.index:src.index + 1]
        return pixels.encode(src.index).to(out.device, out.dtype)


def generate_krea(backbone: torch.nn.Module, prompt: torch.Tensor | PromptSchedule, noise: torch.Tensor,
                  generator: torch.Generator | None, settings: KreaSettings | None = None, *,
                  vae: ContextVAE | None = None, hooks: Hooks | None = None, attention_backend: str = "auto",
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Generate a video with Krea Realtime's loop (module docstring; docs/krea.md).

    ``prompt``: a conditioning ``[B, L, 4096]`` or a :class:`PromptSchedule` (prompt changes between blocks,
    interpolated over ``settings.interpolation_blocks`` blocks). ``noise``: ``[B, 16, T, H, W]``, the whole
    video's initial noise (Krea's draw: :func:`~.noise.krea_initial_noise`); ``generator``: the re-noising
    draws (Krea's: the same generator, :func:`~.noise.krea_generator`). ``vae``: the context re-encode
    (:class:`ContextVAE`), needed by ``first_latent="reencode"`` (Krea's rule, the default)."""
    settings = settings or KreaSettings()
    runner = WanRunner(backbone, dtype=dtype, device=device)
    if noise.ndim != 5 or noise.shape[1] != runner.spec.in_dim:
        raise ShapeError(f"noise must be [batch, {runner.spec.in_dim}, frames, height, width], got {tuple(noise.shape)}")
    runner.spec.token_grid(*noise.shape[-2:])
    request = resolve_krea(runner.spec, prompt, settings, latent_frames=noise.shape[2], batch=noise.shape[0])
    if request.needs_pixels and vae is None:
        raise KreaError("first_latent 'reencode' (Krea's rule) needs a VAE to re-encode the context's first frame; "
                        "give one, or use first_latent='latent' (an approximation) or 'keep_first' (Krea's option)")
    return KreaSampler(runner, settings, attention_backend).run(request, noise, generator, vae, hooks)


# ---------------------------------------------------------------------------------------------
# memory


# The Wan 2.1 VAE in Krea's re-encode, measured with ComfyUI 0.3.75's own module
# (tests/core/vae_stream_memory.py: the real architecture, base dim 96, random weights, float32 on a CPU, at
# 208x128 and 416x240; it scales with a frame's pixels): the streaming decode's causal cache, kept from block to
# block, holds ≈ 2365 values per pixel of a frame; decoding one more block takes ≈ 2350 more at its peak, encoding
# one frame ≈ 1365 (docs/krea.md)
WAN_VAE_STREAM_CACHE_PER_PIXEL = 2365
WAN_VAE_DECODE_PER_PIXEL = 2350
WAN_VAE_ENCODE_PER_PIXEL = 1365


def wan_vae_stream_bytes(latent_height: int, latent_width: int, dtype: torch.dtype, batch: int = 1) -> tuple[int, int]:
    """(the streaming decode's causal cache, the peak of decoding a block or encoding a frame), in bytes, for a Wan
    2.1 VAE computing in ``dtype``."""
    pixels = batch * latent_height * latent_width * SPACE_COMPRESSION ** 2
    item = torch.finfo(dtype).bits // 8
    return (WAN_VAE_STREAM_CACHE_PER_PIXEL * pixels * item,
            max(WAN_VAE_DECODE_PER_PIXEL, WAN_VAE_ENCODE_PER_PIXEL) * pixels * item)


def pixel_frame_bytes(latent_height: int, latent_width: int, batch: int = 1) -> int:
    """One decoded frame as the deque keeps it: 3 float32 channels at 8× the latent size."""
    return batch * 3 * latent_height * latent_width * SPACE_COMPRESSION ** 2 * 4


def estimate_krea(spec: BackboneSpec, settings: KreaSettings, *, latent_frames: int, latent_height: int,
                  latent_width: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16, weights_bytes: int = 0,
                  vae_dtype: torch.dtype | None = None, switches: bool = False, output_copies: int = 0) -> RunEstimate:
    """The pre-flight of a Krea run: :func:`~.memory.estimate_run` of the ``full`` policy over the rebuilt cache
    (K context frames + one block) holding the whole video's noise and output, plus Krea's own terms: the
    context latents, with the re-encode the decoded frames kept and the VAE's streaming state on the device
    (``vae_dtype``: the VAE computes there in that dtype; its weights are the caller's, like the model's), and,
    with prompt changes, the previous block's cross-attention K/V next to the current one's. The VAE decodes and
    encodes while no KV cache is held (:meth:`KreaSampler.run`): that phase counts only where it is the larger."""
    k, f = int(settings.context_frames), int(settings.frames_per_block)
    base = estimate_run(spec, "full", latent_frames=k + f, new_frames=latent_frames, latent_height=latent_height,
                        latent_width=latent_width, frames_per_block=f, batch=batch, dtype=dtype,
                        weights_bytes=weights_bytes, capture_state=False, output_copies=output_copies)
    held = latent_bytes(spec, k, latent_height, latent_width, batch) + (base.text_bytes if switches else 0)
    vae_cache = vae_work = 0
    if settings.needs_vae:
        held += settings.pixel_window * pixel_frame_bytes(latent_height, latent_width, batch)
        if vae_dtype is not None:
            vae_cache, vae_work = wan_vae_stream_bytes(latent_height, latent_width, vae_dtype, batch)
    run_phase = base.phases["run"] + held + vae_cache
    vae_phase = base.latent_bytes + base.text_bytes + held + vae_cache + vae_work  # no KV cache, no activations
    extra = held + vae_cache + max(0, vae_phase - run_phase)
    return replace(base, policy="krea", extra_bytes=base.extra_bytes + extra,
                   extra_label="Krea context (VAE, decoded frames)" if vae_cache else "Krea context",
                   notes=(f"Krea's loop: a cache of {k} context + {f} block frames, rebuilt every block",))
