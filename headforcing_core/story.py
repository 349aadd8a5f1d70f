"""Running a story: a whole multi-prompt run, or the continuation of one, and its AR_STATE.

* :func:`generate_schedule` — a :class:`~headforcing_core.prompts.PromptSchedule` (or one prompt) from
  scratch, optionally after initial latents, returning the latents and an
  :class:`~headforcing_core.state.ARState`;
* :func:`continue_generation` — more segments after an AR_STATE, exactly as if the run had not stopped;
* :func:`capture_state` / :func:`restore_sampler` — between a
  :class:`~headforcing_core.story_sampler.ScheduleSampler` and an AR_STATE (CPU copies both ways: the
  state is never changed).

The segments themselves are sampled by :class:`~headforcing_core.story_sampler.ScheduleSampler`;
AR_STATE files are :mod:`headforcing_core.state_file`.
"""

from __future__ import annotations

import json

import torch

from .backbone import WanRunner
from .errors import HeadForcingError, StateError
from .geometry import chunk_bounds
from .policies import CachePolicy, policy_to_dict
from .prompts import PromptSchedule, as_schedule
from .sampler import Hooks, build_sampler, validate_initial_latent, validate_inputs
from .schedule import SELF_FORCING_SHIFT, SELF_FORCING_STEPS, FlowMatchSchedule
from .state import ARState, weights_digest
from .state_format import STATE_FORMAT, STATE_VERSION
from .live import LiveInput
from .story_sampler import ScheduleSampler
from .transitions import Interpolation


# ---------------------------------------------------------------------------------------------
# sampler <-> state


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def capture_state(sampler: ScheduleSampler, generator: torch.Generator | None, *,
                  history: list[dict] | None = None, digest: str | None = None) -> ARState:
    """Snapshot a sampler after a run (CPU copies: the sampler may go on or be dropped)."""
    if sampler.cache is None or sampler.context is None or sampler.tail is None:
        raise StateError("nothing to capture: the sampler has not generated any frames")
    tensors, cache_meta = sampler.cache.state_dict()
    tensors["context"] = _cpu_copy(sampler.context)
    tensors["tail"] = _cpu_copy(sampler.tail)
    interpolation = sampler.interpolation
    if interpolation is not None:  # from interp_source towards context, `step` of `steps` chunks made
        tensors["interp_source"] = _cpu_copy(interpolation.source)
    rng_device = None
    if generator is not None:
        tensors["rng"] = _cpu_copy(generator.get_state())
        rng_device = str(generator.device)
    h, w = sampler.latent_hw
    meta = {
        "format": STATE_FORMAT, "version": STATE_VERSION,
        "fingerprint": sampler.runner.spec.fingerprint(), "weights_digest": digest,
        "policy": policy_to_dict(sampler.policy),
        "steps": list(sampler.noise_schedule.steps), "shift": sampler.noise_schedule.shift,
        "frames_per_block": sampler.frames_per_block,
        "batch": sampler.batch, "latent_size": [h, w], "channels": sampler.runner.spec.in_dim,
        "next_frame": sampler.next_frame, "chunks_done": sampler.chunks_generated,
        "dtype": str(sampler.runner.dtype), "rng_device": rng_device,
        "history": list(history or []), "cache": cache_meta,
    }
    if interpolation is not None:
        meta["interpolation"] = {"step": interpolation.step, "steps": interpolation.steps}
    return ARState(json.dumps(meta), tensors)


def restore_sampler(state: ARState, backbone: torch.nn.Module, new_frames: int, *,
                    generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                    attention_backend: str = "auto", device: torch.device | str | None = None
                    ) -> tuple[ScheduleSampler, torch.Generator | None]:
    """A sampler continuing ``state`` with room for ``new_frames`` more frames, and the re-noise generator.

    The cache is *copied* into fresh device buffers (the state is not touched). Without
    ``generator`` the state's saved RNG state is restored into a new generator.
    """
    runner = WanRunner(backbone, dtype=dtype, device=device)
    state.check_model(runner.spec)
    meta = state.meta
    sampler = ScheduleSampler(runner, state.policy, FlowMatchSchedule(state.steps, state.shift),
                              state.frames_per_block, attention_backend)
    h, w = state.latent_size
    cache_meta = meta["cache"]
    total = max(state.next_frame + int(new_frames), int(cache_meta.get("total_frames", 0)))
    sampler.start(state.batch, h, w, total)
    sampler.cache.load_state_dict(state.tensors, cache_meta)
    sampler.set_prompt(state.context)  # the first prompt of this sampler: not a switch
    sampler.context = state.context
    interp = meta.get("interpolation")
    if interp is not None:
        sampler.interpolation = Interpolation(state.tensors["interp_source"], state.context, int(interp["steps"]),
                                              int(interp["step"]))
    sampler.tail = state.tail.to(runner.device, copy=True)
    sampler.next_frame = state.next_frame
    sampler.chunks_generated = int(meta.get("chunks_done", 0))
    if generator is None and state.rng_state is not None:
        rng_device = torch.device(meta.get("rng_device") or "cpu")
        if rng_device.type == "cuda" and not torch.cuda.is_available():
            raise StateError(f"this AR_STATE continues a re-noise generator on {rng_device}, which this machine "
                             "lacks; continue it on a CUDA machine or pass a generator")
        generator = torch.Generator(device=rng_device)
        generator.set_state(state.rng_state.clone())
    return sampler, generator


# ---------------------------------------------------------------------------------------------
# running


def _history(sampler: ScheduleSampler, first_frame: int) -> list[dict]:
    """The segments the sampler's last run made (live switches included), as an AR_STATE logs them: the
    transition each one actually got ("cut" where the prompt did not change), and what a take needs to
    write it again (the prompt's text, the recache mode used, whether it went on with the noise before,
    whether it was switched to live)."""
    out = []
    events = {e["frame"]: e for e in sampler.events}
    live = set(sampler.live_frames)
    pos = first_frame
    for seg in sampler.executed:
        ev = events.get(pos)
        entry = {"start": pos, "frames": seg.frames, "transition": seg.transition if ev else "cut",
                 "transition_frames": (ev["frames"] if ev else 0), "switch": bool(ev),
                 "replaced": ev["replaced"] if ev else 0, "label": seg.label, "text": seg.text,
                 "same_noise": seg.same_noise, "live": pos in live}
        if ev and "mode" in ev:
            entry["recache_mode"] = ev["mode"]
        out.append(entry)
        pos += seg.frames
    return out


def _hooks(progress, should_stop, on_chunk, hooks: Hooks | None) -> Hooks:
    return hooks if hooks is not None else Hooks(progress, should_stop, on_chunk)


def generate_schedule(backbone: torch.nn.Module, schedule: PromptSchedule | torch.Tensor, noise: torch.Tensor,
                      steps: tuple[float, ...] = SELF_FORCING_STEPS, shift: float = SELF_FORCING_SHIFT,
                      frames_per_block: int = 3, policy: str | CachePolicy = "full",
                      generator: torch.Generator | None = None, first_chunk_steps: tuple[float, ...] | None = None,
                      initial_latent: torch.Tensor | None = None, *, hooks: Hooks | None = None,
                      progress=None, should_stop=None, on_chunk=None, attention_backend: str = "auto",
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      live: LiveInput | None = None) -> tuple[torch.Tensor, ARState]:
    """Generate a multi-prompt video and return ``(latents, ARState)``.

    ``schedule``: a :class:`PromptSchedule` (or one conditioning tensor: a single segment
    covering the noise). ``noise``: ``[B, C, total, H, W]`` for all segments. With one
    segment this is exactly :func:`headforcing_core.generate` (plus the state);
    ``first_chunk_steps`` and ``initial_latent`` work as they do there (the initial frames are
    put into the cache under the first segment's prompt and are part of the state's video).
    ``dtype`` / ``device``: where and in what precision to compute, as for ``generate``. ``live``: asked
    for a prompt switch before every chunk (:mod:`headforcing_core.live`); the state's history is what was
    made, switches included (:func:`headforcing_core.live.take_text` writes it as schedule text).
    """
    t0 = initial_latent.shape[2] if torch.is_tensor(initial_latent) and initial_latent.ndim == 5 else 0
    sampler = build_sampler(backbone, policy, steps=steps, shift=shift, frames_per_block=frames_per_block,
                            attention_backend=attention_backend, dtype=dtype, device=device,
                            latent_frames=t0 + (noise.shape[2] if noise.ndim == 5 else 0), sampler_cls=ScheduleSampler,
                            first_chunk_steps=first_chunk_steps)
    sched = as_schedule(schedule, noise.shape[2] if noise.ndim == 5 else None).resolve(frames_per_block)
    for seg in sched:
        validate_inputs(sampler.runner, seg.context, noise, frames_per_block)
    if noise.shape[2] != sched.total_frames:
        raise HeadForcingError(f"the noise has {noise.shape[2]} latent frames but the schedule's segments add up to "
                               f"{sched.total_frames}")
    validate_initial_latent(initial_latent, tuple(noise.shape), frames_per_block, sampler.runner.spec.in_dim)
    b, _, t, h, w = noise.shape
    sampler.start(b, h, w, t0 + t)
    hooks = _hooks(progress, should_stop, on_chunk, hooks)
    done, total, history = 0, None, []
    if t0:
        sampler.set_prompt(sched[0].context)
        sampler.context = sched[0].context
        sampler.remember(initial_latent.to(sampler.runner.device))  # a recache may reach into these frames
        total = len(chunk_bounds(0, t0, frames_per_block)) + sampler.schedule_model_calls(sched, start_frame=t0)
        done = sampler.prefill(initial_latent, hooks, 0, total)
        history = [{"start": 0, "frames": t0, "transition": "cut", "transition_frames": 0, "switch": False,
                    "replaced": 0, "label": "initial latent"}]
    out = sampler.run_schedule(sched, noise, generator, hooks, done, total, live=live)
    state = capture_state(sampler, generator, history=history + _history(sampler, t0),
                          digest=weights_digest(backbone))
    return out, state


def continue_generation(backbone: torch.nn.Module, state: ARState, schedule: PromptSchedule | torch.Tensor,
                        noise: torch.Tensor, *, generator: torch.Generator | None = None, hooks: Hooks | None = None,
                        progress=None, should_stop=None, on_chunk=None, attention_backend: str = "auto",
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        live: LiveInput | None = None) -> tuple[torch.Tensor, ARState]:
    """Extend the video of ``state`` by the segments of ``schedule``; returns ``(new latents, new state)``.

    ``noise`` covers the new frames only. The first segment's transition applies against
    the state's last prompt. The re-noising draws continue the state's RNG stream unless
    ``generator`` is given. ``state`` is left unchanged; an interpolation it was in the middle of goes on
    (a first segment with the state's prompt carries it on, as one run would). ``live``: as for
    :func:`generate_schedule`.
    """
    if not isinstance(state, ARState):
        raise StateError(f"expected an AR_STATE, got {type(state).__name__}")
    if noise.ndim != 5:
        raise StateError(f"noise must be [batch, channels, frames, height, width], got {tuple(noise.shape)}")
    state.check_latents(tuple(noise.shape))
    sched = as_schedule(schedule, noise.shape[2]).resolve(state.frames_per_block)
    if noise.shape[2] != sched.total_frames:
        raise HeadForcingError(f"the noise has {noise.shape[2]} latent frames but the schedule's segments add up to "
                               f"{sched.total_frames}")
    sampler, gen = restore_sampler(state, backbone, sched.total_frames, generator=generator, dtype=dtype,
                                   attention_backend=attention_backend, device=device)
    for seg in sched:
        sampler.runner.spec.check_context(seg.context, state.batch)
    first = sampler.next_frame
    out = sampler.run_schedule(sched, noise.to(sampler.runner.device), gen,
                               _hooks(progress, should_stop, on_chunk, hooks), live=live)
    new_state = capture_state(sampler, gen, history=state.history + _history(sampler, first),
                              digest=state.meta.get("weights_digest") or weights_digest(backbone))
    return out.to(noise.device), new_state
