"""HeadForcingARSampler: chunk-wise autoregressive sampling of a Self Forcing / Causal Forcing model.

:func:`run_ar_sampler` is the node's work: check every input (``comfy_bridge``), then the run
sequence every sampling node shares (``nodes/run.py``: pre-flight and load, the core's
``generate_schedule`` with progress, interrupt, previews and the live panel, the report).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from comfy_api.latest import io

from headforcing_core.backbone import WanRunner
from headforcing_core.errors import StateError
from headforcing_core.geometry import FPS, added_video_frames, chunk_bounds, video_frames_for
from headforcing_core.krea import KREA_CONTEXT_FRAMES, KREA_INTERPOLATION_BLOCKS
from headforcing_core.memory import TAIL_FRAMES, estimate_run, latent_bytes
from headforcing_core.policies import PRESETS, TRAINING_WINDOW, CachePolicy, describe
from headforcing_core.prompts import PromptSchedule
from headforcing_core.sampler import validate_inputs
from headforcing_core.story import generate_schedule
from headforcing_core.transitions import planned_recaches

from .comfy_bridge import (CUSTOM_PRESET, DEFAULT_SAMPLER_POLICY, DEFAULT_SHIFT, DEFAULT_STEPS, FIRST_LATENT_CHOICES,
                           LENGTH_UNITS, LOOPS, MAX_SEED, MODEL_PRESETS, SamplerRequest, apply_model_preset,
                           check_initial_latent, check_model_layout, check_schedule, compute_dtype,
                           conditioning_tensor, count_noun, describe_pixels, describe_schedule_length,
                           describe_video_length, initial_latent_samples, krea_settings, latent_shape, make_request,
                           on_host, renoise_generator, sampler_policy, steps_text, wan_backbone)
from .krea import run_krea_sampler
from .live import CLIP_TOOLTIP, TAKE_TOOLTIP, live_input, schedule_texts, take_result
from .messages import TAKE_KEY, live_panel, preview_report
from .run import (ModelRun, default_recache_mode, finish_report, memory_line, schedule_report, story_model_calls,
                  story_noise, story_panel, text_encoder)
from .types import AR_STATE, KV_POLICY, PROMPT_SCHEDULE

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION


class HeadForcingARSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingARSampler",
            display_name="Head Forcing AR Sampler",
            category="sampling/head_forcing",
            description=(
                "Generates a video autoregressively, chunk by chunk, with a Self Forcing / Causal Forcing / "
                "LongLive (Wan2.1-T2V-1.3B distilled) or Krea Realtime 14B model and a head-aware KV cache. No "
                "CFG, no negative prompt. Outputs a LATENT for VAEDecode (T latent frames decode to 4T-3 frames "
                "at 16 fps). With an initial_latent it starts from an image or extends a video, and outputs only "
                "the new frames. model_preset 'Krea Realtime 14B' runs Krea's own loop (docs/krea.md)."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="A Self Forcing, Causal Forcing or LongLive checkpoint (Wan2.1-T2V-1.3B) or Krea "
                            "Realtime 14B (Wan2.1-T2V-14B) from 'Load Diffusion Model'. Other model families are "
                            "refused, and a model_preset made for the other size."),
                io.Conditioning.Input(
                    "conditioning", optional=True,
                    tooltip="The prompt: CLIPTextEncode with the umT5-XXL text encoder (CLIPLoader type 'wan'). "
                            "Positive only: these distilled models run without CFG. Not needed when a "
                            "prompt_schedule is connected."),
                io.Int.Input(
                    "width", default=832, min=16, max=MAX_RESOLUTION, step=16,
                    tooltip="Video width in pixels, a multiple of 16. The models were trained at 832x480."),
                io.Int.Input(
                    "height", default=480, min=16, max=MAX_RESOLUTION, step=16,
                    tooltip="Video height in pixels, a multiple of 16."),
                io.Int.Input(
                    "length", default=81, min=1, max=1_000_000, step=1,
                    tooltip="Video length in the unit of 'length_unit'. Frames are rounded down to 4k+1 "
                            "(81 frames = 21 latent frames = 5 s; 961 = 60 s). Seconds give 16*s+1 frames. With an "
                            "initial_latent it counts the whole video, the initial frames included."),
                io.Int.Input(
                    "seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                    tooltip="Initial noise seed (same noise as KSampler's for an empty latent of this size); "
                            "the re-noising between steps uses seed+1."),
                # optional: an API prompt may leave these out and gets the defaults
                KV_POLICY.Input(
                    "kv_policy", optional=True,
                    tooltip="A cache policy from 'Head Forcing Cache Policy'. When connected it replaces the "
                            "'policy' dropdown."),
                io.Combo.Input(
                    "length_unit", options=list(LENGTH_UNITS), default="frames", optional=True,
                    tooltip="'frames': length counts video frames. 'seconds': length counts seconds at 16 fps "
                            "(60 -> 961 frames)."),
                io.String.Input(
                    "steps", default=DEFAULT_STEPS, optional=True,
                    tooltip="Comma-separated nominal timesteps, highest first. Self Forcing / Causal Forcing "
                            "use 1000,750,500,250; they are warped through the shifted schedule "
                            "(-> about 1000, 937.5, 833.3, 625). Each chunk also gets one clean pass. Filled by "
                            "model_preset; used as set with 'custom'."),
                io.Float.Input(
                    "shift", default=DEFAULT_SHIFT, min=0.01, max=100.0, step=0.01, optional=True,
                    tooltip="Flow-matching shift of the schedule. 5.0 is Self Forcing's training value; "
                            "ComfyUI's Wan default of 8.0 (ModelSamplingSD3) is wrong for these models. Filled by "
                            "model_preset; used as set with 'custom'."),
                io.Int.Input(
                    "frames_per_block", default=3, min=1, max=21, optional=True,
                    tooltip="Latent frames generated per chunk: 3 for chunk-wise checkpoints, 1 for frame-wise "
                            "ones. A last chunk may be shorter. Filled by model_preset; used as set with 'custom'."),
                io.Combo.Input(
                    "policy", options=list(PRESETS), default=DEFAULT_SAMPLER_POLICY, optional=True,
                    tooltip="KV-cache preset used when no kv_policy is connected. self_forcing_window keeps "
                            "the last 21 latent frames (identical to 'full', i.e. Self Forcing, up to 81 "
                            "frames; bounded beyond). Use the Cache Policy node to tune a policy."),
                PROMPT_SCHEDULE.Input(
                    "prompt_schedule", optional=True,
                    tooltip="Several prompts in a row (Prompt Segment / Prompt Schedule From Text). When "
                            "connected it replaces 'conditioning' and 'length': the video is the schedule's "
                            "segments with their transitions (after the initial latent, if one is connected)."),
                # added last so that workflows saved before them keep their widget values in place
                io.Latent.Input(
                    "initial_latent", optional=True,
                    tooltip="Start from existing frames: VAEEncode (Wan 2.1 VAE) of an image (image-to-video, "
                            "needs a frame-wise model: frames per block 1) or of a video's frames (extension: a "
                            "whole number of chunks, e.g. 9, 21, 33 ... 81 frames with 3-frame chunks). They are put "
                            "into the cache first, at the same size as width x height. 'length' then counts the "
                            "whole video; the LATENT output holds only the NEW frames: join them after the initial "
                            "latent with LatentConcat (dim t) and decode once."),
                io.Combo.Input(
                    "model_preset", options=list(MODEL_PRESETS), default=CUSTOM_PRESET, optional=True,
                    tooltip="The sampling settings of a public checkpoint, from its own inference config: "
                            "frames per block, steps, first-chunk steps and shift. In the editor, choosing one FILLS "
                            "the frames_per_block, steps, first_chunk_steps and shift widgets; editing one of them "
                            "afterwards switches this to 'custom'. At run time any preset but 'custom' uses its own "
                            "values (an API prompt with other widget values: the report names the ones it "
                            "replaced); 'custom' uses the widgets. "
                            "Self Forcing / Causal Forcing chunk-wise / LongLive: 3, 1000,750,500,250, none, 5. "
                            "Causal Forcing frame-wise 4-step: 1, 1000,750,500,250, none, 5. Causal Forcing++ "
                            "frame-wise 2-step: 1, 1000,500, first chunk 1000,750,500,250, 5; 1-step: 1, 1000, "
                            "first chunk 1000,750,500,250, 5. Krea Realtime 14B: 3, 1000,750,500,250,0, none, 5, "
                            "and KREA'S LOOP (the cache rebuilt every block; context_frames, interpolation_blocks, "
                            "context_first_latent and vae below apply, the cache policy does not). 'Krea Realtime "
                            "14B, Self Forcing loop': the same steps through Self Forcing's loop, with the cache "
                            "policy (head_forcing etc.)."),
                io.String.Input(
                    "first_chunk_steps", default="", optional=True,
                    tooltip="Step list of the first GENERATED chunk (after an initial latent: the first new one), "
                            "like 'steps'; empty = the same steps as every chunk. Causal Forcing++ 1- and 2-step "
                            "models run their first chunk with 1000,750,500,250 "
                            "(denoising_step_list_first_chunk). Filled by model_preset; used as set with 'custom'."),
                # Krea's loop (model_preset "Krea Realtime 14B"); added last, see above
                io.Vae.Input(
                    "vae", optional=True,
                    tooltip="Krea's loop only: the Wan 2.1 VAE, for Krea's context re-encode (each block's first "
                            "context latent is a decoded frame encoded again, as Krea's server does). Without it the "
                            "sampler uses an approximation and says so in its report. Other presets ignore it."),
                io.Int.Input(
                    "context_frames", default=KREA_CONTEXT_FRAMES, min=1, max=TRAINING_WINDOW - 1, optional=True,
                    tooltip="Krea's loop only: latent frames the cache is rebuilt from before every block "
                            "(Krea's kv_cache_num_frames, default 3). Context + block must stay within the 21 "
                            "positions the model was trained on."),
                io.Int.Input(
                    "interpolation_blocks", default=KREA_INTERPOLATION_BLOCKS, min=1, max=64, optional=True,
                    tooltip="Krea's loop only: at a prompt change (a new prompt_schedule segment) the text "
                            "embedding moves to the new prompt linearly over this many blocks (Krea's "
                            "interp_steps, default 4: the first still the old prompt, the fourth the new). 1: "
                            "switch at once."),
                io.Combo.Input(
                    "context_first_latent", options=list(FIRST_LATENT_CHOICES), default="auto", optional=True,
                    tooltip="Krea's loop only: the context's first latent once the video is longer than the "
                            "context. reencode: Krea's rule, the oldest of the last decoded frames VAE-encoded alone "
                            "(needs the vae input). latent: approximation without a VAE, the generated latent that "
                            "frame came from. keep_first: Krea's keep_first_frame option, always the video's first "
                            "latent. auto: reencode with a VAE connected, else latent."),
                io.Clip.Input("clip", optional=True, tooltip=CLIP_TOOLTIP),
            ],
            outputs=[
                io.Latent.Output(display_name="latent",
                                 tooltip="Clean video latent [1, 16, T, H/8, W/8] for VAEDecode. With an "
                                         "initial_latent: the new frames only (LatentConcat them after it)."),
                io.String.Output(display_name="report",
                                 tooltip="What was used (model preset, frames per block, steps, first-chunk steps, "
                                         "shift, initial latent frames), policy, memory estimate and timing."),
                AR_STATE.Output(display_name="ar_state",
                                tooltip="The finished run (cache, position, RNG state) for Head Forcing Continue "
                                        "or Save AR State. Held in CPU memory (about the KV cache's size)."),
                io.String.Output(display_name="take", tooltip=TAKE_TOOLTIP),
            ],
            hidden=[io.Hidden.prompt],  # the queued prompt: the texts behind the conditionings, for the take
        )

    @classmethod
    def execute(cls, model, width, height, length, seed, conditioning=None, kv_policy=None, length_unit="frames",
                steps=DEFAULT_STEPS, shift=DEFAULT_SHIFT, frames_per_block=3,
                policy=DEFAULT_SAMPLER_POLICY, prompt_schedule=None, initial_latent=None,
                model_preset=CUSTOM_PRESET, first_chunk_steps="", vae=None, context_frames=KREA_CONTEXT_FRAMES,
                interpolation_blocks=KREA_INTERPOLATION_BLOCKS, context_first_latent="auto",
                clip=None) -> io.NodeOutput:
        with live_panel():  # per-chunk progress events for the browser panel (web/headforcing.js)
            latent, report, state, take = run_ar_sampler(
                model, conditioning, kv_policy=kv_policy, policy_preset=policy, width=width, height=height,
                length=length, length_unit=length_unit, seed=seed, steps=steps, shift=shift,
                frames_per_block=frames_per_block, prompt_schedule=prompt_schedule, initial_latent=initial_latent,
                model_preset=model_preset, first_chunk_steps=first_chunk_steps, vae=vae,
                context_frames=context_frames, interpolation_blocks=interpolation_blocks,
                context_first_latent=context_first_latent, clip=clip, graph=cls.hidden.prompt)
        return io.NodeOutput(latent, report, state, take, ui={TAKE_KEY: [take]})


def sampler_schedule(prompt_schedule, conditioning, latent_frames: int, frames_per_block: int) -> PromptSchedule:
    """What the AR sampler generates: the connected schedule (it wins), else the conditioning for
    ``latent_frames``. Lengths in seconds are resolved to whole chunks of ``frames_per_block``."""
    if prompt_schedule is not None:
        return check_schedule(prompt_schedule).resolve(frames_per_block)
    if conditioning is None:
        raise StateError("connect a conditioning (one prompt) or a prompt_schedule (several prompts)")
    return PromptSchedule.single(conditioning_tensor(conditioning), latent_frames)


def run_ar_sampler(model, conditioning, *, kv_policy: CachePolicy | None, policy_preset: str, width: int,
                   height: int, length: int, length_unit: str, seed: int, steps: str, shift: float,
                   frames_per_block: int, prompt_schedule=None, initial_latent=None, model_preset: str = CUSTOM_PRESET,
                   first_chunk_steps: str = "", vae=None, context_frames: int = KREA_CONTEXT_FRAMES,
                   interpolation_blocks: int = KREA_INTERPOLATION_BLOCKS, context_first_latent: str = "auto",
                   clip=None, graph=None) -> tuple[dict, str, object, str]:
    """HeadForcingARSampler's work: validate, pre-flight memory check, load, generate, un-normalize.

    Returns ``({"samples": latents}, report, ar_state, take)``. Every input error is raised (as a ValueError
    subclass) before the model is loaded or anything is allocated. A connected ``prompt_schedule``
    (PROMPT_SCHEDULE) replaces ``conditioning`` and ``length`` (one segment from frame 0 samples exactly
    like ``generate``).

    ``model_preset`` (:data:`~.comfy_bridge.MODEL_PRESETS`): ``custom`` uses ``frames_per_block`` / ``steps`` /
    ``first_chunk_steps`` / ``shift`` as given, any other preset replaces them
    (:func:`~.comfy_bridge.apply_model_preset`). ``initial_latent`` (a LATENT from VAEEncode, the VAE's raw
    space) is mapped into the model's space with ``process_latent_in`` (as KSampler does) and put into the
    cache first; ``length`` then counts the whole video and the output LATENT holds only the new frames (join
    them with LatentConcat).

    A preset whose loop is Krea's (``KREA_PRESET``) goes to :func:`~.krea.run_krea_sampler` with
    ``vae``, ``context_frames``, ``interpolation_blocks`` and ``context_first_latent`` (no AR_STATE, no live
    prompts: its take is empty); a model of another public layout than the preset's is refused
    (:func:`~.comfy_bridge.check_model_layout`).

    ``clip`` (optional): the text encoder of prompts typed live in the panel (``nodes/live.py``); ``graph``:
    the queued prompt (ComfyUI's hidden ``PROMPT``), where the texts behind the conditionings are read for
    the take (the run as schedule text, live switches included).
    """
    policy = sampler_policy(kv_policy, policy_preset)
    sampling = apply_model_preset(model_preset, frames_per_block=frames_per_block, steps=steps,
                                         first_chunk_steps=first_chunk_steps, shift=shift)
    krea = None
    if sampling.loop == "krea":
        krea = krea_settings(sampling, context_frames=context_frames, interpolation_blocks=interpolation_blocks,
                             first_latent=context_first_latent, has_vae=vae is not None)
    initial = initial_latent_samples(initial_latent)
    t0 = 0 if initial is None else int(initial.shape[2])
    req = make_request(width=width, height=height, length=length, length_unit=length_unit, seed=seed,
                              steps=sampling.steps, shift=sampling.shift, frames_per_block=sampling.frames_per_block,
                              policy=policy, first_chunk_steps=sampling.first_chunk_steps, initial_frames=t0,
                              sampling=sampling)
    module, spec = wan_backbone(model)
    check_model_layout(sampling, spec)
    schedule = schedule_texts(graph, sampler_schedule(prompt_schedule, conditioning, req.latent_frames,
                                                      req.frames_per_block))
    req = replace(req, latent_frames=schedule.total_frames)
    shape = latent_shape(req.width, req.height, req.latent_frames, channels=spec.in_dim)
    # text width, channels, grid: checked on a shape-only tensor (nothing allocated yet)
    for segment in schedule:
        validate_inputs(WanRunner(module), segment.context, torch.empty(shape, device="meta"), req.frames_per_block)
    if krea is not None:
        latent, report, state = run_krea_sampler(model, module, spec, schedule, req, krea, vae=vae,
                                                 kv_policy=kv_policy, policy_preset=policy_preset,
                                                 initial_latent=initial_latent,
                                                 prompt_schedule_given=prompt_schedule is not None,
                                                 report_head=_report_lines(req, policy, None))
        if clip is not None:
            report += "\nlive prompts: not with Krea's loop (the clip input is not used)"
        return latent, report, state, ""
    if initial is not None:
        check_initial_latent(initial, req, spec.in_dim)

    dtype = compute_dtype(model)
    text_tokens = max(seg.context.shape[1] for seg in schedule)

    recaches = planned_recaches(schedule, req.frames_per_block, policy, start_frame=t0, live=clip is not None)

    def estimate_at(t: int, h: int, w: int):
        # the cache covers the initial frames and the new ones; the initial latent is held on the device
        # (the model's-space copy and the latents kept for a recache) next to the new frames' noise and output
        return estimate_run(spec, policy, latent_frames=t0 + t, new_frames=t, latent_height=h, latent_width=w,
                            frames_per_block=req.frames_per_block, batch=1, dtype=dtype,
                            state_on_device=on_host(model), output_copies=1, text_tokens=text_tokens,
                            extra_bytes=2 * latent_bytes(spec, t0, h, w) if t0 else 0,
                            extra_label="initial latent", recaches=recaches)

    if t0:
        def describe_length(t: int) -> str:
            return describe_video_length(length_unit)(t0 + t) + " in all, initial frames included"
    else:
        describe_length = describe_video_length(length_unit)
    # one pre-flight (refuse before anything is allocated; the runner reads its device off the
    # weights, so they are loaded whole, no lowvram split)
    run = ModelRun.load(
        model, spec, estimate_at, dtype=dtype, latent_frames=req.latent_frames, latent_height=shape[-2],
        latent_width=shape[-1], min_frames=req.frames_per_block,
        describe_length=describe_schedule_length if prompt_schedule is not None else describe_length,
        describe_size=None if t0 else describe_pixels,  # the initial latent fixes the size
        what="the schedule" if prompt_schedule is not None else "the video",
        bounded_policy_hint=not policy.is_bounded(), extra_models=text_encoder(clip))
    device = run.device
    # the segment covering latent frames [s, e) starts from frames s..e-1 of a fresh e-frame draw (the new
    # frames after an initial latent: frames t0.. of it)
    noise = story_noise(lambda n: latent_shape(req.width, req.height, n, channels=spec.in_dim), req.seed, t0,
                        schedule)
    first = None if req.first_chunk_steps is None else len(req.first_chunk_steps)
    calls = story_model_calls(schedule, req.frames_per_block, len(req.steps), first_steps=first, start_frame=t0,
                              context=schedule[0].context, tail_frames=min(t0, TAIL_FRAMES), policy=policy)
    calls += len(chunk_bounds(0, t0, req.frames_per_block)) if t0 else 0  # the initial latent's clean passes
    # ComfyUI's LATENT is in the VAE's raw space; the model samples in the normalized one (KSampler's
    # process_latent_in)
    start = None if initial is None else model.model.process_latent_in(initial.float()).to(device)
    with live_input(schedule, clip=clip, spec=spec, start_frame=t0, frames_per_block=req.frames_per_block) as live:
        latents, state = run.call(
            lambda hooks: generate_schedule(
                module, schedule, noise.to(device), steps=req.steps, shift=req.shift,
                frames_per_block=req.frames_per_block, policy=policy, generator=renoise_generator(req.seed),
                first_chunk_steps=req.first_chunk_steps, initial_latent=start, hooks=hooks, dtype=dtype, live=live),
            model_calls=calls,
            panel=story_panel(model, spec, policy, schedule, start_frame=t0, frames_per_block=req.frames_per_block,
                              latent_size=shape[-2:], width=req.width, height=req.height, dtype=dtype, live=live))
    take, take_lines = take_result(state.history[1 if t0 else 0:], req.frames_per_block, live, seed=req.seed)
    report = finish_report(model, [
        *_report_lines(req, policy, run, initial_latent),
        schedule_report(schedule, t0 if prompt_schedule is not None else 0, default_recache_mode(policy)),
        *take_lines,
        preview_report(),
        f"AR_STATE: {state.nbytes / 2**20:.1f} MiB in CPU memory",
    ])
    return run.latent_output(latents), report, state, take


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


def _report_lines(req: SamplerRequest, policy: CachePolicy, run: ModelRun | None, initial_latent=None) -> list[str]:
    """The report's lines; without ``run`` (before it), only those that do not need it."""
    seconds, chunk_seconds = (run.seconds, run.chunk_seconds) if run is not None else (0.0, [])
    per_chunk = seconds / max(1, len(chunk_seconds))
    steady = sum(chunk_seconds[1:]) / (len(chunk_seconds) - 1) if len(chunk_seconds) > 1 else per_chunk
    new_video = added_video_frames(req.latent_frames) if req.initial_frames else req.frames
    asked = f" (asked for {req.frames_requested} frames)" if req.frames_requested != req.frames else ""
    if req.initial_frames:
        t0 = req.initial_frames
        head = (f"Head Forcing AR sampler: {new_video} new frames ({req.latent_frames} latent) after an initial latent "
                f"of {count_noun(t0, 'latent frame')} ({count_noun(video_frames_for(t0), 'video frame')}); the whole "
                f"video is {req.frames} frames ({req.total_latent_frames} latent, {req.frames / FPS:.2f} s at {FPS} "
                f"fps) at {req.width}x{req.height}, seed {req.seed}" + asked)
        ignored = sorted(k for k in (initial_latent or {}) if k != "samples")
        passes = len(chunk_bounds(0, t0, req.frames_per_block))
        init = [f"initial latent: {count_noun(t0, 'latent frame')} put into the cache first "
                f"({count_noun(passes, 'clean pass', 'clean passes')} at timestep 0); the LATENT output "
                "holds only the new frames: join them after it with LatentConcat (dim t) and decode once"
                + (f"; its {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not used" if ignored else "")]
    else:
        head = (f"Head Forcing AR sampler: {req.frames} frames ({req.latent_frames} latent, "
                f"{req.frames / FPS:.2f} s at {FPS} fps) at {req.width}x{req.height}, seed {req.seed}" + asked)
        init = []
    first = (f"; the first chunk {len(req.first_chunk_steps)} steps ({steps_text(req.first_chunk_steps)})"
             if req.first_chunk_steps is not None else "")
    if run is None:
        return [head, *init, *sampling_lines(req)]
    return [
        head,
        *init,
        *sampling_lines(req),
        f"loop: {LOOPS['self_forcing']}",
        f"chunks: {req.chunks} of {req.frames_per_block} latent frames"
        + (f" (the last one {req.latent_frames % req.frames_per_block})" if req.latent_frames % req.frames_per_block
           else "")
        + f", {len(req.steps)} steps + clean pass each{first}, "
        f"steps {','.join(f'{s:g}' for s in req.steps)}, shift {req.shift:g}",
        f"policy: {describe(policy)}",
        *[f"  {n}" for n in run.estimate.notes],
        memory_line(run),
        f"time: {seconds:.2f} s, {per_chunk:.3f} s/chunk (steady {steady:.3f} s/chunk), "
        f"{new_video / seconds if seconds > 0 else 0:.2f} video frames/s on {run.computed_on()}",
    ]
