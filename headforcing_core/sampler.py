"""The autoregressive loop: Self Forcing's chunk-wise few-step sampling with a head-wise cache.

For each chunk of ``frames_per_block`` latent frames (the first starts at frame 0):

1. plan the chunk (which entries each head group attends to, at which positions);
2. for every denoising timestep ``t_i``: predict the flow with every frame of the
   chunk at ``t_i``, take ``x0 = x_t - sigma_i·v``, and unless it is the last step
   re-noise ``x = (1 - sigma_{i+1})·x0 + sigma_{i+1}·ε`` with fresh noise ε drawn
   from ``generator`` (shape of the chunk, ``[B, C, f, H, W]``, float32, in chunk
   then step order). These calls read the cache and never change it;
3. run the chunk's final ``x0`` once more at timestep 0 (the *clean pass*) and
   commit that pass's raw K/V to the cache.

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
from .plan import ChunkAttention, ChunkPlan, Observer, plan_chunk
from .policies import CachePolicy, RetentionRule, make_policy, resolve_labels
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


def chunk_bounds(start_frame: int, num_frames: int, frames_per_block: int) -> list[tuple[int, int]]:
    """(first frame, frames) of every chunk; the last one may be shorter."""
    if frames_per_block < 1:
        raise ShapeError(f"frames per block must be ≥ 1, got {frames_per_block}")
    out, s = [], start_frame
    end = start_frame + num_frames
    while s < end:
        out.append((s, min(frames_per_block, end - s)))
        s += frames_per_block
    return out


def as_policy(policy: str | CachePolicy) -> CachePolicy:
    return make_policy(policy) if isinstance(policy, str) else policy


@dataclass
class ARSampler:
    """Chunk-wise AR sampling state: model runner, schedule, policy and KV cache.

    ``start`` allocates the cache for a batch and latent size; ``set_prompt``
    (re)encodes the text; ``sample`` extends the video by the frames of the
    given noise.
    """

    runner: WanRunner
    policy: CachePolicy
    schedule: FlowMatchSchedule = field(default_factory=FlowMatchSchedule)
    frames_per_block: int = 3
    backend_name: str = "auto"
    cache: HeadwiseKVCache | None = None
    text: TextContext | None = None
    next_frame: int = 0
    latent_hw: tuple[int, int] | None = None
    batch: int = 0
    last_plan: ChunkPlan | None = None
    observer: Observer | None = None  # sees rotated q/k of every layer (head profiling; full cache only)

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
                                     prerotated=keys_stay_in_place(self.policy))
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
    def total_model_calls(self, num_frames: int) -> int:
        return len(chunk_bounds(0, num_frames, self.frames_per_block)) * (len(self.schedule.timesteps) + 1)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, generator: torch.Generator | None = None, hooks: Hooks | None = None,
               calls_done: int = 0, calls_total: int | None = None) -> torch.Tensor:
        """Generate the frames of ``noise`` (``[B, C, f, H, W]``), continuing from the cache."""
        if self.cache is None or self.text is None:
            raise RuntimeError("call start() and set_prompt() before sample()")
        hooks = hooks or Hooks()
        b, c, t, h, w = noise.shape
        if (h, w) != self.latent_hw or b != self.batch:
            raise ShapeError(f"noise {tuple(noise.shape)} does not match the started size {self.latent_hw}, "
                             f"batch {self.batch}")
        calls_total = calls_total or self.total_model_calls(t)
        source_device = noise.device
        noise = noise.to(self.runner.device)  # the chunk math runs where the model runs
        out = torch.empty_like(noise)
        done = calls_done
        for chunk_index, (start, f) in enumerate(chunk_bounds(self.next_frame, t, self.frames_per_block)):
            local = slice(start - self.next_frame, start - self.next_frame + f)
            x0 = self.run_chunk(noise[:, :, local], start, generator, hooks, done, calls_total)
            done += len(self.schedule.timesteps) + 1
            out[:, :, local] = x0
            if hooks.on_chunk is not None:
                hooks.on_chunk(chunk_index, x0)
        self.next_frame += t
        return out.to(source_device)

    def run_chunk(self, x: torch.Tensor, start: int, generator: torch.Generator | None, hooks: Hooks,
                  done: int, total: int) -> torch.Tensor:
        """Denoise one chunk (noise ``x`` ``[B, C, f, H, W]`` on the model's device) and commit it."""
        b, f = x.shape[0], x.shape[2]
        schedule, runner, cache, pol = self.schedule, self.runner, self.cache, self.policy
        cache.reserve(start, f)
        plan = plan_chunk(cache, pol.rope, pol.window, pol.clamp_min, pol.clamp_max, start, f)
        self.last_plan = plan
        reader = ChunkAttention(plan, cache, self.backend, "noisy", observer=self.observer)
        x0 = x
        for i, t_i in enumerate(schedule.timesteps):
            done = self._call_model_checked(hooks, done, total)
            timesteps = torch.full((b, f), t_i, device=runner.device)
            flow = runner.forward(x, timesteps, self.text, reader, hooks.should_stop)
            x0 = schedule.to_x0(x, flow.to(x.dtype), i)
            if i + 1 < len(schedule.timesteps):
                x = schedule.renoise(x0, _draw_noise(x0.shape, generator, x0), i + 1)
            self._report(hooks, done, total)
        # clean pass at t = 0: its K/V are what the cache keeps for this chunk
        done = self._call_model_checked(hooks, done, total)
        stage = None if plan.prerotated else self._stage(f)
        runner.forward(x0, torch.zeros(b, f, device=runner.device), self.text,
                       ChunkAttention(plan, cache, self.backend, "clean", stage, self.observer), hooks.should_stop)
        cache.commit(start, f, *(stage or (None, None)))
        self._report(hooks, done, total)
        return x0

    def _stage(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers receiving the clean pass's raw K/V of every layer (committed after the call)."""
        spec, cache = self.runner.spec, self.cache
        shape = (spec.num_layers, self.batch, frames * cache.tokens, spec.num_heads, spec.head_dim)
        return (torch.empty(shape, dtype=self.runner.dtype, device=self.runner.device),
                torch.empty(shape, dtype=self.runner.dtype, device=self.runner.device))

    @staticmethod
    def _call_model_checked(hooks: Hooks, done: int, total: int) -> int:
        if hooks.should_stop is not None and hooks.should_stop():
            raise Interrupted(f"generation interrupted after {done} of {total} model calls")
        return done + 1

    @staticmethod
    def _report(hooks: Hooks, done: int, total: int) -> None:
        if hooks.progress is not None:
            hooks.progress(done, total)


def keys_stay_in_place(policy: CachePolicy) -> bool:
    """Whether a policy's keys never change position: one head type, our rule without a middle, absolute
    RoPE. Its pool then stores rotated keys and is read in place (no per-chunk gather)."""
    rules = list(policy.rule_map.values())
    return (policy.rope == "absolute" and len(rules) == 1 and isinstance(rules[0], RetentionRule)
            and rules[0].middle is None)


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
            f"ask for at least {4 * frames_per_block - 3} video frames"
        )
    if context.ndim != 3 or context.shape[-1] != spec.text_dim:
        raise ShapeError(
            f"conditioning of shape {tuple(context.shape)} does not fit the model's text width {spec.text_dim}: "
            "encode the prompt with the umT5-XXL text encoder (CLIPLoader type 'wan')"
        )
    if context.shape[0] not in (1, b):
        raise ShapeError(f"conditioning batch {context.shape[0]} does not match the latent batch {b}")


def generate(backbone: torch.nn.Module, context: torch.Tensor, noise: torch.Tensor,
             steps: tuple[float, ...] = SELF_FORCING_STEPS, shift: float = SELF_FORCING_SHIFT,
             frames_per_block: int = 3, policy: str | CachePolicy = "full",
             generator: torch.Generator | None = None, *, progress: ProgressFn | None = None,
             should_stop: StopFn | None = None, on_chunk: ChunkFn | None = None,
             attention_backend: str = "auto", dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Generate a video latent autoregressively, chunk by chunk.

    ``backbone``: a Wan2.1-shaped module (ComfyUI's ``WanModel``, the official one,
    or :class:`~headforcing_core.wan_model.WanBackbone`). ``context``: ``[B, L, 4096]``
    text-encoder output, L ≤ 512. ``noise``: ``[B, 16, T, H, W]`` initial noise in
    ComfyUI's latent layout. Returns the clean latents in the same layout and dtype.
    ``generator`` drives the re-noising draws. ``policy``: a preset name or a
    :class:`~headforcing_core.policies.CachePolicy`. ``dtype`` / ``device``: where and in
    what precision to compute (default: the weights'; ComfyUI's casting ops allow weights
    that live elsewhere, e.g. partially offloaded).
    """
    sampler = build_sampler(backbone, policy, steps=steps, shift=shift, frames_per_block=frames_per_block,
                            attention_backend=attention_backend, dtype=dtype, device=device,
                            latent_frames=noise.shape[2] if noise.ndim == 5 else 0)
    validate_inputs(sampler.runner, context, noise, frames_per_block)
    b, _, t, h, w = noise.shape
    sampler.start(b, h, w, t)
    sampler.set_prompt(context)
    return sampler.sample(noise, generator, Hooks(progress, should_stop, on_chunk))


def build_sampler(backbone: torch.nn.Module, policy: str | CachePolicy, *, steps: tuple[float, ...],
                  shift: float, frames_per_block: int, attention_backend: str = "auto",
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  latent_frames: int = 0, sampler_cls: type[ARSampler] | None = None) -> ARSampler:
    """Runner, schedule and policy checked and put together (the cache is allocated by ``start``)."""
    runner = WanRunner(backbone, dtype=dtype, device=device)
    pol = as_policy(policy)
    sampler = (sampler_cls or ARSampler)(runner, pol, FlowMatchSchedule(tuple(steps), shift), frames_per_block,
                                         attention_backend)
    if pol.preset == "full" and latent_frames > pol.window:
        log.warning("headforcing: the 'full' policy beyond %d latent frames leaves the trained RoPE range; "
                    "use a bounded policy for long videos", pol.window)
    return sampler
