"""HeadForcingContinue: AR_STATE + CONDITIONING or PROMPT_SCHEDULE + length → the LATENT of the new
frames and a new AR_STATE.

The input state is never changed (the cache is copied onto the device first), so one state can
feed several Continue nodes. A schedule run of the sampler and a chain of Continue nodes draw the
same noise (``nodes/run.py``, :func:`~.run.story_noise`): with the sampler's seed on every
Continue, Sampler(A) → Continue(B) → Continue(C) gives what one Sampler run of the schedule
[A, B, C] gives. AR_STATE files: ``nodes/states.py``.

To join the segments' latents into one video use ComfyUI's ``LatentConcat`` (dim ``t``) and
decode the joined latent once (see docs/multiprompt.md).
"""
from __future__ import annotations

import logging

from comfy_api.latest import io

from headforcing_core.errors import StateError
from headforcing_core.geometry import FPS, SPACE_COMPRESSION, added_video_frames, video_frames_for
from headforcing_core.memory import estimate_run
from headforcing_core.policies import describe
from headforcing_core.prompts import PromptSchedule
from headforcing_core.state import ARState, weights_digest
from headforcing_core.story import continue_generation
from headforcing_core.transitions import planned_recaches

from .comfy_bridge import (MAX_SEED, check_schedule, check_state, compute_dtype, conditioning_tensor,
                           describe_schedule_length, latent_shape, on_host, wan_backbone)
from .live import CLIP_TOOLTIP, TAKE_TOOLTIP, live_input, schedule_texts, take_result
from .messages import TAKE_KEY, live_panel, preview_report
from .prompts import length_inputs, make_segment, transition_inputs
from .run import (ModelRun, default_recache_mode, finish_report, memory_line, schedule_report, story_model_calls,
                  story_noise, story_panel, text_encoder)
from .types import AR_STATE, PROMPT_SCHEDULE

log = logging.getLogger("headforcing")

CATEGORY = "sampling/head_forcing/multi-prompt"


def describe_continue_length(unit: str):
    """``describe_length`` for Continue's length widget: new latent frames → the user's unit."""
    def text(t: int) -> str:
        if unit == "latent_frames":
            return f"{t} latent frames"
        if unit == "frames":
            return f"{added_video_frames(t)} frames"
        return f"{added_video_frames(t) / FPS:g} seconds"
    return text


def run_continue(model, state, *, conditioning=None, prompt_schedule=None, length: float = 5.0,
                 length_unit: str = "seconds", transition: str = "cut", transition_frames: int = 3,
                 seed: int = 0, clip=None, graph=None) -> tuple[dict, ARState, str, str]:
    """HeadForcingContinue's work: check, pre-flight and load, continue the state, report; returns
    ``(latent, new state, report, take)``. ``clip``, ``graph``: as for the sampler (live prompts, the take)."""
    state = check_state(state)
    module, spec = wan_backbone(model)
    state.check_model(spec)  # another model shape: refuse before loading anything
    fpb = state.frames_per_block
    if prompt_schedule is not None:
        schedule = check_schedule(prompt_schedule).resolve(fpb)
    elif conditioning is not None:
        schedule = PromptSchedule((make_segment(conditioning_tensor(conditioning), length, length_unit,
                                                transition, transition_frames),)).resolve(fpb)
    else:
        raise StateError("connect a conditioning (the next prompt) or a prompt_schedule")
    schedule = schedule_texts(graph, schedule)
    new_frames = schedule.total_frames
    h, w = state.latent_size
    width, height = w * SPACE_COMPRESSION, h * SPACE_COMPRESSION
    policy = state.policy
    dtype = compute_dtype(model)
    text_tokens = max([seg.context.shape[1] for seg in schedule] + [state.context.shape[1]])

    recaches = planned_recaches(schedule, fpb, policy, start_frame=state.next_frame, live=clip is not None)

    def estimate_at(t: int, lh: int, lw: int):
        return estimate_run(spec, policy, latent_frames=state.next_frame + t, new_frames=t, latent_height=lh,
                            latent_width=lw, frames_per_block=fpb, batch=state.batch, dtype=dtype,
                            state_on_device=on_host(model), input_state_bytes=state.nbytes,
                            output_copies=1, text_tokens=text_tokens, recaches=recaches)

    run = ModelRun.load(
        model, spec, estimate_at, dtype=dtype, latent_frames=new_frames, latent_height=h, latent_width=w,
        min_frames=fpb,
        describe_length=(describe_schedule_length if prompt_schedule is not None
                         else describe_continue_length(length_unit)),
        what="the schedule" if prompt_schedule is not None else "the continuation",
        bounded_policy_hint=not policy.is_bounded(), extra_models=text_encoder(clip))
    notes = state.check_model(spec, weights_digest(module))
    for note in notes:
        log.warning("headforcing: %s", note)
    noise = story_noise(lambda n: latent_shape(width, height, n, batch=state.batch, channels=state.channels),
                        seed, state.next_frame, schedule)
    with live_input(schedule, clip=clip, spec=spec, batch=state.batch, start_frame=state.next_frame,
                    frames_per_block=fpb) as live:
        latents, new_state = run.call(
            lambda hooks: continue_generation(module, state, schedule, noise.to(run.device), hooks=hooks, dtype=dtype,
                                              live=live),
            model_calls=story_model_calls(schedule, fpb, len(state.steps), start_frame=state.next_frame,
                                          context=state.context, tail_frames=state.tail.shape[2], policy=policy),
            panel=story_panel(model, spec, policy, schedule, start_frame=state.next_frame, frames_per_block=fpb,
                              latent_size=(h, w), width=width, height=height, dtype=dtype, batch=state.batch,
                              live=live))
    take, take_lines = take_result(new_state.history[len(state.history):], fpb, live, seed=seed)
    first, last = state.next_frame, new_state.next_frame
    report = finish_report(model, [
        f"Head Forcing Continue: latent frames {first}-{last - 1} ({new_frames} new = "
        f"{added_video_frames(new_frames)} video frames, {added_video_frames(new_frames) / FPS:.2f} s at {FPS} fps) "
        f"at {width}x{height}, seed {seed}; the video is now {last} latent frames ({video_frames_for(last)} frames)",
        schedule_report(schedule, first, default_recache_mode(policy))
        or f"transition: {new_state.history[-1]['transition']}",
        f"policy: {describe(policy)}",
        f"{memory_line(run)}; AR_STATE {new_state.nbytes / 2**20:.1f} MiB in CPU memory",
        f"time: {run.seconds:.2f} s on {run.computed_on()}",
        *take_lines,
        preview_report(),
        *notes,
    ])
    return run.latent_output(latents), new_state, report, take


class HeadForcingContinue(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingContinue",
            display_name="Head Forcing Continue",
            category=CATEGORY,
            description=("Extends a finished Head Forcing run (AR_STATE) with a new prompt or prompt schedule, "
                         "keeping its cache, so the video goes on where it stopped. Outputs only the new frames' "
                         "latent (join with LatentConcat, dim t) and a new AR_STATE for the next Continue. The "
                         "input state is not changed: several Continue nodes may branch from one state."),
            inputs=[
                io.Model.Input("model", tooltip="The model that made the state (same checkpoint)."),
                AR_STATE.Input("ar_state", tooltip="From Head Forcing AR Sampler, another Continue or Load AR State."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The next prompt. Ignored when a prompt_schedule is connected."),
                PROMPT_SCHEDULE.Input("prompt_schedule", optional=True,
                                      tooltip="Several next prompts; their lengths and transitions replace the "
                                              "length and transition widgets."),
                *length_inputs(),
                *transition_inputs(),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Noise seed of the new frames. Use the sampler's seed to get exactly what "
                                     "one sampler run of the whole schedule gives; another seed varies them."),
                io.Clip.Input("clip", optional=True, tooltip=CLIP_TOOLTIP),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The new frames only, [1, 16, T_new, H/8, W/8]."),
                AR_STATE.Output(display_name="ar_state", tooltip="The longer run, for the next Continue."),
                io.String.Output(display_name="report", tooltip="Frames, transition, memory and timing."),
                io.String.Output(display_name="take", tooltip=TAKE_TOOLTIP),
            ],
            hidden=[io.Hidden.prompt],  # the queued prompt: the texts behind the conditionings, for the take
        )

    @classmethod
    def execute(cls, model, ar_state, length, length_unit, transition, transition_frames, seed,
                conditioning=None, prompt_schedule=None, clip=None) -> io.NodeOutput:
        with live_panel():  # per-chunk progress events for the browser panel (web/headforcing.js)
            latent, state, report, take = run_continue(
                model, ar_state, conditioning=conditioning, prompt_schedule=prompt_schedule, length=length,
                length_unit=length_unit, transition=transition, transition_frames=transition_frames, seed=seed,
                clip=clip, graph=cls.hidden.prompt)
        return io.NodeOutput(latent, state, report, take, ui={TAKE_KEY: [take]})
