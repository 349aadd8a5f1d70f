"""The autoregressive loop: Self Forcing's chunk-wise few-step sampling with a head-wise cache.

For each chunk of ``frames_per_block`` latent frames (the first starts at frame 0):

1. plan the chunk (which entries each head group attends to, at which positions);
2. for every denoising timestep ``t_i``: predict the flow with every frame of the
   chunk at ``t_i``, take ``x0 = x_t - sigma_i·v``, and unless it is the last step
   re-noise ``x = (1 - sigma_{i+1})·x0 + sigma_{i+1}·ε`` with fresh noise ε drawn
   from ``generator`` (shape of the chunk, ``[B, C, f, H, W]``, float32, in chunk
   then step order). These calls read the cache and never change it;
3. run the chunk's final ``x0`` once more at timestep 0 (the *clean pass*) and
   write that pass's K/V into the cache (each layer after its attention) and commit.

With the ``full`` policy this is exactly Self Forcing's inference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import select_backend
from .backbone import TextContext, WanRunner
from .cache import HeadwiseKVCache
from .errors import Interrupted, ShapeError
from .geometry import chunk_bounds, video_frames_for
from .chunk_attention import ChunkAttention, Observer
from .plan import ChunkPlan, plan_chunk
from .policies import CachePolicy, make_policy, resolve_labels
from .schedule import SELF_FORCING_SHIFT, SELF_FORCING_STEPS, FlowMatchSchedule

log = logging.getLogger("headforcing")

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]
ChunkFn = Callable[[int, torch.Tensor], None]


@dataclass
class Hooks:
    """Optional callbacks: ``progress(done, total)`` after every model call,
    ``should_stop()`` before every model call and between its transformer blocks (True raises
    :class:`Interrupted`),
    ``on_chunk(chunk_index, x0)`` after every committed chunk."""

    progress: ProgressFn | None = None
    should_stop: StopFn | None = None
    on_chunk: ChunkFn | None = None


def as_policy(policy: str | CachePolicy) -> CachePolicy:
    return make_policy(policy) if isinstance(policy, str) else policy


@dataclass
class ARSampler:
    """Chunk-wise AR sampling state: model runner, noise schedule, policy and KV cache.

    ``start`` allocates the cache for a batch and latent size; ``set_prompt``
    (re)encodes the text; ``sample`` extends the video by the frames of the
    given noise.
    """

    runner: WanRunner
    policy: CachePolicy
    noise_schedule: FlowMatchSchedule = field(default_factory=FlowMatchSchedule)
    frames_per_block: int = 3
    backend_name: str = "auto"
    cache: HeadwiseKVCache | None = None
    text: TextContext | None = None
    next_frame: int = 0
    latent_hw: tuple[int, int] | None = None
    batch: int = 0
    last_plan: ChunkPlan | None = None
    observer: Observer | None = None  # sees rotated q/k of every layer (head profiling; full cache only)
    first_noise_schedule: FlowMatchSchedule | None = None  # the first generated chunk's steps (Causal Forcing++)
    chunks_generated: int = 0  # chunks denoised so far (initial latents put into the cache do not count)
    # the re-noising draw between steps, ``(shape, generator, like) -> noise`` (None: float32 from the generator,
    # shape [B, C, f, H, W]; Krea's loop draws its own way, :func:`~headforcing_core.noise.krea_renoise`)
    draw_renoise: Callable | None = None

    def __post_init__(self):
        spec = self.runner.spec
        if self.frames_per_block < 1:
            raise ShapeError(f"frames per block must be ≥ 1, got {self.frames_per_block}")
        self.policy = resolve_labels(self.policy, spec.num_layers, spec.num_heads)
        self.policy.validate(self.frames_per_block)
        self.head_types = self.policy.head_types(spec.num_layers, spec.num_heads)
        self.backend_name, self.backend = select_backend(self.backend_name, self.runner.device, self.runner.dtype)

    # ---- set-up ---------------------------------------------------------------------------
    def start(self, batch: int, latent_height: int, latent_width: int, total_frames: int) -> None:
        spec = self.runner.spec
        grid = spec.token_grid(latent_height, latent_width)
        self.policy.check_grid(grid)
        self.batch, self.latent_hw = batch, (latent_height, latent_width)
        self.cache = HeadwiseKVCache(self.head_types, self.policy.rule_map, batch=batch, grid=grid,
                                     head_dim=spec.head_dim, frames_per_block=self.frames_per_block,
                                     total_frames=total_frames, dtype=self.runner.dtype, device=self.runner.device,
                                     prerotated=self.policy.keys_stay_in_place())
        self.next_frame = 0

    def set_prompt(self, context: torch.Tensor) -> None:
        """Encode a prompt's text context; after the first, this is a prompt switch."""
        text = self.runner.encode_text(context)
        if text.batch not in (1, self.batch or text.batch):
            raise ShapeError(f"conditioning batch {text.batch} does not match the latent batch {self.batch}")
        if self.text is not None and self.cache is not None:
            self.cache.on_prompt_switch(self.next_frame)
        self.text = text

    # ---- sampling -------------------------------------------------------------------------
    def noise_schedule_for_chunk(self, chunk_index: int) -> FlowMatchSchedule:
        """The steps of the ``chunk_index``-th generated chunk: ``first_noise_schedule`` for the very first."""
        if chunk_index == 0 and self.first_noise_schedule is not None:
            return self.first_noise_schedule
        return self.noise_schedule

    def total_model_calls(self, num_frames: int) -> int:
        n = len(chunk_bounds(0, num_frames, self.frames_per_block))
        return sum(len(self.noise_schedule_for_chunk(self.chunks_generated + i).timesteps) + 1 for i in range(n))

    def _check_started(self, latents: torch.Tensor, what: str) -> int:
        """Frames of ``latents`` once they fit the started batch and size (``start`` / ``set_prompt`` done)."""
        if self.cache is None or self.text is None:
            raise RuntimeError("call start() and set_prompt() first")
        b, _, t, h, w = latents.shape
        if (h, w) != self.latent_hw or b != self.batch:
            raise ShapeError(f"{what} {tuple(latents.shape)} does not match the started size {self.latent_hw}, "
                             f"batch {self.batch}")
        return t

    @torch.no_grad()
    def prefill(self, latents: torch.Tensor, hooks: Hooks | None = None, calls_done: int = 0,
                calls_total: int | None = None) -> int:
        """Put clean latents (``[B, C, T0, H, W]``) into the cache, chunk by chunk, at timestep 0 — what Self
        Forcing's and Causal Forcing's ``inference(..., initial_latent=…)`` do before generating. Each chunk is
        one clean pass that attends the cache and itself and commits its K/V. Returns the model calls done."""
        t = self._check_started(latents, "initial latent")
        hooks = hooks or Hooks()
        total = calls_total or len(chunk_bounds(0, t, self.frames_per_block))
        latents = latents.to(self.runner.device, self.runner.dtype if latents.dtype != torch.float64 else latents.dtype)
        done = calls_done
        for start, f in chunk_bounds(self.next_frame, t, self.frames_per_block):
            local = start - self.next_frame
            done = self._call_model_checked(hooks, done, total)
            self._clean_pass(latents[:, :, local:local + f], start, hooks)
            self._report(hooks, done, total)
        self.next_frame += t
        return done

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, generator: torch.Generator | None = None, hooks: Hooks | None = None,
               calls_done: int = 0, calls_total: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Generate the frames of ``noise`` (``[B, C, f, H, W]``), continuing from the cache; into ``out``
        (a tensor like ``noise`` on the model's device) when given."""
        t = self._check_started(noise, "noise")
        hooks = hooks or Hooks()
        calls_total = calls_total or self.total_model_calls(t)
        source_device = noise.device
        noise = noise.to(self.runner.device)  # the chunk math runs where the model runs
        out = torch.empty_like(noise) if out is None else out
        done = calls_done
        for chunk_index, (start, f) in enumerate(chunk_bounds(self.next_frame, t, self.frames_per_block)):
            local = slice(start - self.next_frame, start - self.next_frame + f)
            steps = len(self.noise_schedule_for_chunk(self.chunks_generated).timesteps) + 1
            x0 = self.run_chunk(noise[:, :, local], start, generator, hooks, done, calls_total)
            done += steps
            out[:, :, local] = x0
            if hooks.on_chunk is not None:
                hooks.on_chunk(chunk_index, x0)
        self.next_frame += t
        return out.to(source_device)

    def run_chunk(self, x: torch.Tensor, start: int, generator: torch.Generator | None, hooks: Hooks,
                  done: int, total: int, commit: bool = True) -> torch.Tensor:
        """Denoise one chunk (noise ``x`` ``[B, C, f, H, W]`` on the model's device) and commit it. With
        ``commit=False`` there is no clean pass: the cache is left as it was (Krea's loop, which rebuilds
        the cache before every block)."""
        b, f = x.shape[0], x.shape[2]
        noise_schedule, runner = self.noise_schedule_for_chunk(self.chunks_generated), self.runner
        plan = self._plan(start, f)
        reader = ChunkAttention(plan, self.cache, self.backend, "noisy", self.observer)
        x0 = x
        for i, t_i in enumerate(noise_schedule.timesteps):
            done = self._call_model_checked(hooks, done, total)
            timesteps = torch.full((b, f), t_i, device=runner.device)
            flow = runner.forward(x, timesteps, self.text, reader, hooks.should_stop)
            x0 = noise_schedule.to_x0(x, flow.to(x.dtype), i)
            if i + 1 < len(noise_schedule.timesteps):
                x = noise_schedule.renoise(x0, (self.draw_renoise or _draw_noise)(x0.shape, generator, x0), i + 1)
            self._report(hooks, done, total)
        del reader  # its views of the plan's scratch; the clean pass makes its own
        if commit:
            # clean pass at t = 0: its K/V are what the cache keeps for this chunk
            done = self._call_model_checked(hooks, done, total)
            self._clean_pass(x0, start, hooks, plan)
            self._report(hooks, done, total)
        else:
            plan.release()
        self.chunks_generated += 1
        return x0

    def _plan(self, start: int, frames: int) -> ChunkPlan:
        pol = self.policy
        self.last_plan = None  # the previous chunk's metadata goes before this one's is made
        self.cache.reserve(start, frames)
        plan = plan_chunk(self.cache, pol.rope, pol.window, pol.clamp_min, pol.clamp_max, start, frames,
                          grouped=self.backend_name == "grouped")
        self.last_plan = plan
        return plan

    def _clean_pass(self, x0: torch.Tensor, start: int, hooks: Hooks, plan: ChunkPlan | None = None) -> None:
        """Run ``x0`` at timestep 0 — each layer writes the chunk's K/V into the cache after its attention —
        and commit (planning the chunk first when not yet planned)."""
        b, f = x0.shape[0], x0.shape[2]
        plan = plan or self._plan(start, f)
        self.runner.forward(x0, torch.zeros(b, f, device=self.runner.device), self.text,
                            ChunkAttention(plan, self.cache, self.backend, "clean", self.observer),
                            hooks.should_stop)
        plan.release()  # the chunk is done: its scratch goes before the commit's temporaries come
        self.cache.commit(start, f)

    @staticmethod
    def _call_model_checked(hooks: Hooks, done: int, total: int) -> int:
        if hooks.should_stop is not None and hooks.should_stop():
            raise Interrupted(f"generation interrupted after {done} of {total} model calls")
        return done + 1

    @staticmethod
    def _report(hooks: Hooks, done: int, total: int) -> None:
        if hooks.progress is not None:
            hooks.progress(done, total)


def _draw_noise(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    eps = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return eps.to(like.device, like.dtype)


def validate_inputs(runner: WanRunner, context: torch.Tensor, noise: torch.Tensor, frames_per_block: int) -> None:
    spec = runner.spec
    if noise.ndim != 5:
        raise ShapeError(f"noise must be [batch, {spec.in_dim}, frames, height, width], got {tuple(noise.shape)}")
    b, c, t, h, w = noise.shape
    if c != spec.in_dim:
        raise ShapeError(f"latents have {c} channels; this model expects {spec.in_dim}")
    spec.token_grid(h, w)
    if t < frames_per_block:
        raise ShapeError(
            f"{t} latent frame(s) is shorter than one chunk of {frames_per_block}; "
            f"ask for at least {video_frames_for(frames_per_block)} video frames"
        )
    spec.check_context(context, b)


def validate_initial_latent(initial: torch.Tensor | None, noise_shape: tuple, frames_per_block: int,
                            channels: int) -> None:
    """An initial latent must match the new frames' batch, channels and size and be whole chunks."""
    if initial is None:
        return
    if not torch.is_tensor(initial) or initial.ndim != 5:
        shape = tuple(initial.shape) if torch.is_tensor(initial) else type(initial).__name__
        raise ShapeError(f"initial_latent must be [batch, {channels}, frames, height, width], got {shape}")
    b, c, t0, h, w = initial.shape
    nb, _, _, nh, nw = noise_shape
    if c != channels:
        raise ShapeError(f"initial_latent has {c} channels; this model's latents have {channels} (encode the image "
                         "or video with the Wan 2.1 VAE)")
    if b != nb:
        raise ShapeError(f"initial_latent has batch {b}; the new frames' batch is {nb}")
    if (h, w) != (nh, nw):
        raise ShapeError(f"initial_latent is {w * 8}x{h * 8} (latent {w}x{h}); the new frames are {nw * 8}x{nh * 8}: "
                         "encode the image or video at the size you generate")
    if t0 < 1 or t0 % frames_per_block:
        whole = max(frames_per_block, t0 // frames_per_block * frames_per_block)
        raise ShapeError(
            f"initial_latent has {t0} latent frame(s); the cache takes whole chunks of {frames_per_block} frames "
            f"(as Self Forcing's and Causal Forcing's pipelines do): use {whole} or {whole + frames_per_block} "
            f"frames ({video_frames_for(whole)} or {video_frames_for(whole + frames_per_block)} video frames)"
            + ("; a single image (1 latent frame) needs a frame-wise model (frames_per_block 1)"
               if t0 == 1 else ""))
    if not bool(torch.isfinite(initial).all()):
        raise ShapeError("initial_latent holds NaN or infinite values")


def generate(backbone: torch.nn.Module, context: torch.Tensor, noise: torch.Tensor,
             steps: tuple[float, ...] = SELF_FORCING_STEPS, shift: float = SELF_FORCING_SHIFT,
             frames_per_block: int = 3, policy: str | CachePolicy = "full",
             generator: torch.Generator | None = None, first_chunk_steps: tuple[float, ...] | None = None,
             initial_latent: torch.Tensor | None = None, *, progress: ProgressFn | None = None,
             should_stop: StopFn | None = None, on_chunk: ChunkFn | None = None,
             attention_backend: str = "auto", dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Generate a video latent autoregressively, chunk by chunk.

    ``backbone``: a Wan2.1-shaped module (ComfyUI's ``WanModel``, the official one,
    or :class:`~headforcing_core.wan_model.WanBackbone`). ``context``: ``[B, L, 4096]``
    text-encoder output, L ≤ 512. ``noise``: ``[B, 16, T, H, W]`` initial noise in
    ComfyUI's latent layout. Returns the clean latents in the same layout and dtype.
    ``generator`` drives the re-noising draws (where it lives decides where noise is drawn: a CPU
    generator reproduces across machines). ``policy``: a preset name or a
    :class:`~headforcing_core.policies.CachePolicy`.

    ``first_chunk_steps``: the nominal steps of the first generated chunk (warped like ``steps``;
    Causal Forcing++'s 1/2-step models run it with 4 steps). ``initial_latent``: ``[B, 16, T0, H, W]``
    clean latents put into the cache first, chunk by chunk at timestep 0 (image-to-video with a
    frame-wise model: one frame; video extension: whole chunks); ``noise`` then covers only the new
    frames, which is what is returned. ``dtype`` / ``device``: where and in what precision to compute
    (default: the weights'; ComfyUI's casting ops allow weights that live elsewhere).
    """
    t0 = initial_latent.shape[2] if torch.is_tensor(initial_latent) and initial_latent.ndim == 5 else 0
    sampler = build_sampler(backbone, policy, steps=steps, shift=shift, frames_per_block=frames_per_block,
                            attention_backend=attention_backend, dtype=dtype, device=device,
                            latent_frames=t0 + (noise.shape[2] if noise.ndim == 5 else 0),
                            first_chunk_steps=first_chunk_steps)
    validate_inputs(sampler.runner, context, noise, frames_per_block)
    validate_initial_latent(initial_latent, tuple(noise.shape), frames_per_block, sampler.runner.spec.in_dim)
    b, _, t, h, w = noise.shape
    sampler.start(b, h, w, t0 + t)
    sampler.set_prompt(context)
    hooks = Hooks(progress, should_stop, on_chunk)
    calls = sampler.total_model_calls(t) + (t0 // frames_per_block if t0 else 0)
    done = sampler.prefill(initial_latent, hooks, 0, calls) if t0 else 0
    return sampler.sample(noise, generator, hooks, done, calls)


def build_sampler(backbone: torch.nn.Module, policy: str | CachePolicy, *, steps: tuple[float, ...],
                  shift: float, frames_per_block: int, attention_backend: str = "auto",
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  latent_frames: int = 0, sampler_cls: type[ARSampler] | None = None,
                  first_chunk_steps: tuple[float, ...] | None = None) -> ARSampler:
    """Runner, noise schedule and policy checked and put together (the cache is allocated by ``start``)."""
    runner = WanRunner(backbone, dtype=dtype, device=device)
    pol = as_policy(policy)
    sampler = (sampler_cls or ARSampler)(runner, pol, FlowMatchSchedule(tuple(steps), shift), frames_per_block,
                                         attention_backend)
    if first_chunk_steps is not None:
        try:
            sampler.first_noise_schedule = FlowMatchSchedule(tuple(first_chunk_steps), shift)
        except ShapeError as e:
            raise ShapeError(f"first_chunk_steps: {e}") from None
    if pol.preset == "full" and latent_frames > pol.window:
        log.warning("headforcing: the 'full' policy beyond %d latent frames leaves the trained RoPE range; "
                    "use a bounded policy for long videos", pol.window)
    return sampler
