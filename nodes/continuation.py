"""Continuation nodes (AR_STATE) and the multi-prompt glue of the AR sampler.

* ``HeadForcingContinue`` — AR_STATE + CONDITIONING or PROMPT_SCHEDULE + length → the LATENT of
  the new frames and a new AR_STATE. The input state is never changed (the cache is copied
  onto the device first), so one state can feed several Continue nodes.
* ``HeadForcingSaveARState`` / ``HeadForcingLoadARState`` — AR_STATE files (safetensors + JSON
  metadata) in ``output/headforcing_states/``.

The sampler (``nodes/sampler.py`` via ``comfy_bridge.run_ar_sampler``) uses
:func:`sampler_schedule` and :func:`story_noise` from here, so a schedule run and a chain of
Continue nodes draw the same noise: the segment covering latent frames ``[s, e)`` starts
from frames ``s…e-1`` of the noise a fresh run of ``e`` frames would draw with the same seed.
With the sampler's seed on every Continue, Sampler(A) → Continue(B) → Continue(C) gives what
one Sampler run of the schedule [A, B, C] gives.

To join the segments' latents into one video use ComfyUI's ``LatentConcat`` (dim ``t``) and
decode the joined latent once (see docs/multiprompt.md).
"""
from __future__ import annotations

import logging
import os
import time

import torch
from comfy_api.latest import io, ui

from headforcing_core.errors import StateError
from headforcing_core.memory import GiB, estimate_run
from headforcing_core.policies import describe
from headforcing_core.prompts import (PromptSchedule, count_model_calls, segment_noise)
from headforcing_core.sampler import Hooks
from headforcing_core.names import list_names, safe_path
from headforcing_core.noise import noise_frames
from headforcing_core.state import ARState, continue_generation, load_state, save_state, weights_digest

from . import comfy_bridge as bridge
from . import messages
from .prompts import check_schedule, length_inputs, make_segment, transition_inputs
from .types import AR_STATE, PROMPT_SCHEDULE

log = logging.getLogger("headforcing")

CATEGORY = "sampling/head_forcing/multi-prompt"
STATES_FOLDER = "headforcing_states"


# ---------------------------------------------------------------------------------------------
# glue shared with the sampler


def sampler_schedule(prompt_schedule, conditioning, latent_frames: int, frames_per_block: int) -> PromptSchedule:
    """What the AR sampler generates: the connected schedule (it wins), else the conditioning for
    ``latent_frames``. Lengths in seconds are resolved to whole chunks of ``frames_per_block``."""
    if prompt_schedule is not None:
        return check_schedule(prompt_schedule).resolve(frames_per_block)
    if conditioning is None:
        raise StateError("connect a conditioning (one prompt) or a prompt_schedule (several prompts)")
    return PromptSchedule.single(bridge.conditioning_tensor(conditioning), latent_frames)


def story_noise(shape_of, seed: int, start_frame: int, schedule: PromptSchedule) -> torch.Tensor:
    """The initial noise of ``schedule``'s segments from ``start_frame`` on (see the module docstring).
    Each segment's frames are drawn on their own (same values as the whole draw, bounded memory)."""
    return segment_noise(lambda s, e: noise_frames(shape_of, seed, s, e), start_frame, [s.frames for s in schedule])


def default_recache_mode(policy) -> str:
    """The recache mode of segments that name none: what ``ScheduleSampler.default_recache_mode`` picks
    (``longlive`` under the ``longlive`` preset, else ``block_causal``)."""
    return "longlive" if getattr(policy, "preset", None) == "longlive" else "block_causal"


def story_model_calls(schedule: PromptSchedule, frames_per_block: int, steps: int,
                      state: ARState | None = None) -> int:
    where = {} if state is None else dict(start_frame=state.next_frame, context=state.context, started=True,
                                          tail_frames=state.tail.shape[2],
                                          default_mode=default_recache_mode(state.policy))
    return count_model_calls(schedule, frames_per_block, steps, **where)


def schedule_report(schedule: PromptSchedule, start_frame: int = 0, default_mode: str | None = None) -> str:
    """The schedule's segments for a report (nothing for one segment from frame 0); ``default_mode``: the
    recache mode a recache segment that names none gets (said next to it)."""
    if len(schedule) == 1 and start_frame == 0:
        return ""
    lines = [f"prompt schedule ({len(schedule)} segment{'s' if len(schedule) > 1 else ''}):"]
    pos = start_frame
    for i, seg in enumerate(schedule):
        text = seg.describe()
        if seg.transition == "recache" and not seg.recache_mode and default_mode:
            text = text.replace(f"recache {seg.transition_frames}",
                                f"recache {seg.transition_frames} ({default_mode}, the policy's default)", 1)
        lines.append(f"  {i + 1}. latent frames {pos}-{pos + seg.frames - 1}: {text}")
        pos += seg.frames
    return "\n".join(lines)


def check_state(value) -> ARState:
    if not isinstance(value, ARState):
        raise StateError(f"ar_state must come from a Head Forcing sampler, Continue or Load AR State node, got "
                         f"{type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Continue


def describe_continue_length(unit: str):
    """``describe_length`` for Continue's length widget: new latent frames → the user's unit."""
    def text(t: int) -> str:
        if unit == "latent_frames":
            return f"{t} latent frames"
        if unit == "frames":
            return f"{t * bridge.TIME_COMPRESSION} frames"
        return f"{t * bridge.TIME_COMPRESSION / bridge.FPS:g} seconds"
    return text


def run_continue(model, state, *, conditioning=None, prompt_schedule=None, length: float = 5.0,
                 length_unit: str = "seconds", transition: str = "cut", transition_frames: int = 3,
                 seed: int = 0) -> tuple[dict, ARState, str]:
    import comfy.model_management as mm

    state = check_state(state)
    module, spec = bridge.wan_backbone(model)
    state.check_model(spec)  # another model shape: refuse before loading anything
    fpb = state.frames_per_block
    if prompt_schedule is not None:
        schedule = check_schedule(prompt_schedule).resolve(fpb)
    elif conditioning is not None:
        schedule = PromptSchedule((make_segment(bridge.conditioning_tensor(conditioning), length, length_unit,
                                                transition, transition_frames),)).resolve(fpb)
    else:
        raise StateError("connect a conditioning (the next prompt) or a prompt_schedule")
    new_frames = schedule.total_frames
    h, w = state.latent_size
    width, height = w * bridge.SPACE_COMPRESSION, h * bridge.SPACE_COMPRESSION

    def shape_of(n: int) -> tuple:
        return bridge.latent_shape(width, height, n, batch=state.batch, channels=state.channels)

    policy = state.policy
    dtype = bridge.compute_dtype(model)
    text_tokens = max([seg.context.shape[1] for seg in schedule] + [state.context.shape[1]])

    def estimate_at(t: int, lh: int, lw: int):
        return estimate_run(spec, policy, latent_frames=state.next_frame + t, new_frames=t, latent_height=lh,
                            latent_width=lw, frames_per_block=fpb, batch=state.batch, dtype=dtype,
                            state_on_device=bridge.on_host(model), input_state_bytes=state.nbytes,
                            output_copies=1, text_tokens=text_tokens)

    estimate = bridge.preflight(
        model, spec, estimate_at, latent_frames=new_frames, latent_height=h, latent_width=w, min_frames=fpb,
        describe_length=(bridge.describe_schedule_length if prompt_schedule is not None
                         else describe_continue_length(length_unit)),
        what="the schedule" if prompt_schedule is not None else "the continuation",
        bounded_policy_hint=not policy.is_bounded())
    device = model.load_device
    notes = state.check_model(spec, weights_digest(module))
    for note in notes:
        log.warning("headforcing: %s", note)
    noise = story_noise(shape_of, seed, state.next_frame, schedule)

    hooks = bridge.ComfyHooks(model, story_model_calls(schedule, fpb, len(state.steps), state))
    messages.describe_run(  # the node's live panel in the browser (nodes/messages.py)
        total_latent_frames=new_frames, start_frame=state.next_frame, frames_per_block=fpb, policy=policy.preset,
        latent_format=model.model.latent_format, segments=[(seg.label, seg.frames) for seg in schedule],
        kv_bytes_at=lambda n: estimate_run(spec, policy, latent_frames=max(1, n), latent_height=h, latent_width=w,
                                           frames_per_block=fpb, batch=state.batch, dtype=dtype).kv_bytes,
        kv_budget_bytes=estimate.kv_bytes, width=width, height=height)
    t0 = time.perf_counter()
    latents, new_state = bridge.run_interruptible(lambda: continue_generation(
        module, state, schedule, noise.to(device), hooks=Hooks(hooks.progress, hooks.should_stop, hooks.on_chunk),
        dtype=dtype), hooks)
    seconds = time.perf_counter() - t0
    samples = model.model.process_latent_out(latents.float()).to(mm.intermediate_device())
    first, last = state.next_frame, new_state.next_frame
    lines = [
        f"Head Forcing Continue: latent frames {first}-{last - 1} ({new_frames} new = {4 * new_frames} video "
        f"frames, {4 * new_frames / bridge.FPS:.2f} s at {bridge.FPS} fps) at {width}x{height}, seed {seed}; "
        f"the video is now {last} latent frames ({bridge.decoded_frames(last)} frames)",
        schedule_report(schedule, first, default_recache_mode(policy)) or f"transition: {new_state.history[-1]['transition']}",
        f"policy: {describe(policy)}",
        f"memory estimate: {estimate.breakdown()}; peak ≈ {estimate.run_bytes / GiB:.3f} GiB ({estimate.peak_phase}) "
        f"+ weights; AR_STATE {new_state.nbytes / 2**20:.1f} MiB in CPU memory",
        f"time: {seconds:.2f} s on {device} in {str(dtype).replace('torch.', '')}",
        *notes,
        *bridge.model_patch_lines(model),
    ]
    report = "\n".join(line for line in lines if line)
    log.info("headforcing: %s", report.replace("\n", " | "))
    return {"samples": samples}, new_state, report


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
                io.Int.Input("seed", default=0, min=0, max=bridge.MAX_SEED, control_after_generate=True,
                             tooltip="Noise seed of the new frames. Use the sampler's seed to get exactly what "
                                     "one sampler run of the whole schedule gives; another seed varies them."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The new frames only, [1, 16, T_new, H/8, W/8]."),
                AR_STATE.Output(display_name="ar_state", tooltip="The longer run, for the next Continue."),
                io.String.Output(display_name="report", tooltip="Frames, transition, memory and timing."),
            ],
        )

    @classmethod
    def execute(cls, model, ar_state, length, length_unit, transition, transition_frames, seed,
                conditioning=None, prompt_schedule=None) -> io.NodeOutput:
        with messages.live_panel():  # per-chunk progress events for the browser panel (web/headforcing.js)
            latent, state, report = run_continue(model, ar_state, conditioning=conditioning,
                                                 prompt_schedule=prompt_schedule, length=length,
                                                 length_unit=length_unit, transition=transition,
                                                 transition_frames=transition_frames, seed=seed)
        return io.NodeOutput(latent, state, report)


# ---------------------------------------------------------------------------------------------
# files


def _register_folder() -> None:
    import folder_paths

    if STATES_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(
            STATES_FOLDER, os.path.join(folder_paths.get_output_directory(), STATES_FOLDER), is_default=True)
    exts = folder_paths.folder_names_and_paths[STATES_FOLDER][1]
    if isinstance(exts, set):
        exts.add(".safetensors")


def state_folders() -> list[str]:
    import folder_paths

    _register_folder()
    return folder_paths.get_folder_paths(STATES_FOLDER)


def state_file_names() -> list[str]:
    """AR_STATE files Load AR State offers: the names in the states folder(s) the name policy accepts."""
    names: set[str] = set()
    for folder in state_folders():
        names.update(list_names(folder, suffix=".safetensors"))
    return sorted(names)


def state_path(folder, name: str):
    """``folder/<name>`` under the pack's one name policy (headforcing_core.names)."""
    return safe_path(folder, name, kind="AR_STATE", error=StateError)


def find_state_file(name: str):
    for folder in state_folders():
        path = state_path(folder, name)
        if path.is_file():
            return path
    raise StateError(f"no AR_STATE file {name!r} in {', '.join(state_folders())}")


class HeadForcingSaveARState(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingSaveARState",
            display_name="Head Forcing Save AR State",
            category=CATEGORY,
            description=("Saves an AR_STATE (the run's cache, position, RNG state and settings; safetensors + JSON) "
                         "to output/headforcing_states, where Load AR State finds it, to continue the video "
                         "in a later session."),
            inputs=[
                AR_STATE.Input("ar_state", tooltip="From Head Forcing AR Sampler or Continue."),
                io.String.Input("filename", default="story",
                                tooltip="File name inside output/headforcing_states: letters, digits, spaces and "
                                        "- _ . , + = ( ) [ ] @ #, up to 100 characters, no folders; "
                                        "'.safetensors' is added."),
                io.Boolean.Input("overwrite", default=True, optional=True,
                                 tooltip="Replace an existing file of that name (off: refuse)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the state was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ar_state, filename, overwrite=True) -> io.NodeOutput:
        state = check_state(ar_state)
        folder = state_folders()[0]
        path = state_path(folder, filename)
        if path.exists() and not overwrite:
            raise StateError(f"an AR_STATE {path.name!r} already exists in {folder}; turn on overwrite or pick "
                             "another filename")
        save_state(state, path)
        rel = path.relative_to(os.path.realpath(folder)).as_posix()
        text = f"saved AR_STATE {rel} ({path.stat().st_size / 2**20:.1f} MiB)\n" + state.describe()
        log.info("headforcing: saved AR_STATE to %s", path)
        return io.NodeOutput(str(path), ui=ui.PreviewText(text))


class HeadForcingLoadARState(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingLoadARState",
            display_name="Head Forcing Load AR State",
            category=CATEGORY,
            description="Loads an AR_STATE saved by Save AR State, to continue that video with Head Forcing Continue.",
            inputs=[
                io.Combo.Input("state_name", options=state_file_names(),
                               tooltip="A file in output/headforcing_states (refresh the page after saving)."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: check now that the state was made with this model's shape."),
            ],
            outputs=[
                AR_STATE.Output(display_name="ar_state", tooltip="For Head Forcing Continue."),
                io.String.Output(display_name="summary", tooltip="Frames, size, policy and segments so far."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, state_name, model=None):
        try:
            st = find_state_file(state_name).stat()
            return f"{state_name}:{st.st_mtime_ns}:{st.st_size}"
        except StateError:
            return state_name

    @classmethod
    def execute(cls, state_name, model=None) -> io.NodeOutput:
        state = load_state(find_state_file(state_name))
        if model is not None:
            state.check_model(bridge.wan_backbone(model)[1])
        return io.NodeOutput(state, state.describe())


NODES = [HeadForcingContinue, HeadForcingSaveARState, HeadForcingLoadARState]
