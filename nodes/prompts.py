"""Multi-prompt nodes: build a PROMPT_SCHEDULE segment by segment or from text.

* ``HeadForcingPromptSegment`` — one prompt (CONDITIONING), its length and the transition
  into it; chain them through ``previous`` to tell a story.
* ``HeadForcingPromptScheduleFromText`` — a CLIP (umT5, CLIPLoader type 'wan') and one
  ``seconds | prompt [| transition N]`` per line.

Feed the schedule to Head Forcing AR Sampler (``prompt_schedule``) or Head Forcing
Continue. Schedules are immutable: chaining makes a new one. See docs/multiprompt.md.
"""
from __future__ import annotations

import math

from comfy_api.latest import io

from headforcing_core.geometry import TIME_COMPRESSION
from headforcing_core.prompts import (LONGLIVE_WINDOW, MAX_TRANSITION_FRAMES, RECACHE_MODES, TRANSITIONS,
                                      PromptSchedule, PromptSegment, ScheduleError)
from headforcing_core.schedule_text import parse_schedule_text

from .comfy_bridge import check_schedule, conditioning_tensor
from .types import PROMPT_SCHEDULE

CATEGORY = "sampling/head_forcing/multi-prompt"
LENGTH_UNITS = ("seconds", "latent_frames", "frames")
TRANSITION_TOOLTIP = (
    "How the video enters this prompt from the one before. cut: swap the prompt at the boundary. "
    "recache: swap it and re-run the last N generated latent frames under the new prompt to refresh "
    "the cache (LongLive). blend: interpolate the two prompts' cross-attention over the first N latent "
    "frames. interpolate: Krea Realtime's switch - interpolate the text embeddings over the next N CHUNKS, "
    "one step per chunk (4: weights 0, 1/3, 2/3, 1). Ignored for the first prompt of a fresh run.")
TRANSITION_FRAMES_TOOLTIP = (
    f"N for a block_causal recache (frames re-run, 1-{MAX_TRANSITION_FRAMES}) and for blend (frames blended), in "
    "latent frames (1 latent frame = 4 video frames = 0.25 s); for interpolate, in chunks (Krea's server: 4). "
    "Ignored for cut, and by the LongLive recache modes, "
    f"which always re-run LongLive's own window ({LONGLIVE_WINDOW} frames).")
RECACHE_MODE_TOOLTIP = (
    "How a recache re-runs the frames before the switch. policy default: longlive for the longlive preset, "
    "block_causal otherwise. block_causal: the last N frames, chunk by chunk, each chunk seeing only older "
    "history, their stored K/V replaced. longlive: LongLive's released recache - ONE model call over the last "
    f"min({LONGLIVE_WINDOW}, s) frames (LongLive's window, whatever N says) with no mask (they all see each "
    f"other), the 3 sink frames keep the old prompt's K/V (past the window only the last {LONGLIVE_WINDOW - 3} "
    "frames matter). longlive_local_sink: the same without LongLive's global "
    "sink - the re-run window's first 3 frames become the sink. Ignored unless transition is recache.")
RECACHE_CHOICES = ("policy default",) + RECACHE_MODES


def segment_length(length: float, unit: str) -> dict:
    """``PromptSegment`` length keywords for a widget value: seconds, or latent frames."""
    if unit not in LENGTH_UNITS:
        raise ScheduleError(f"length_unit must be one of {', '.join(LENGTH_UNITS)}, got {unit!r}")
    if not math.isfinite(length) or length <= 0:
        raise ScheduleError(f"length must be positive, got {length:g} (zero-length segments are not allowed)")
    if unit == "seconds":
        return {"seconds": float(length)}
    if unit == "latent_frames":
        if float(length) != int(length):
            raise ScheduleError(f"length {length:g} is not a whole number of latent frames")
        return {"frames": int(length)}
    # video frames: 4 per latent frame (a continuation adds 4 video frames per latent frame)
    return {"frames": max(1, math.ceil(float(length) / TIME_COMPRESSION))}


def transition_frames_for(transition: str, frames: int) -> int:
    """The transition_frames widget for ``transition``: a cut has none."""
    return 0 if transition == "cut" else int(frames)


def make_segment(context, length: float, unit: str, transition: str, transition_frames: int,
                 label: str = "", recache_mode: str = "policy default") -> PromptSegment:
    frames = transition_frames_for(transition, transition_frames)
    if recache_mode not in RECACHE_CHOICES:
        raise ScheduleError(f"recache_mode must be one of {', '.join(RECACHE_CHOICES)}, got {recache_mode!r}")
    mode = None if recache_mode == "policy default" or transition != "recache" else recache_mode
    return PromptSegment(context, transition=transition, transition_frames=frames, label=str(label or "").strip(),
                         recache_mode=mode, **segment_length(length, unit))


def length_inputs(default: float = 5.0) -> list:
    return [
        io.Float.Input("length", default=default, min=0.0, max=100000.0, step=0.25,
                       tooltip="Length of this part, in length_unit. Seconds are rounded to whole chunks "
                               "(3 latent frames = 0.75 s at 16 fps)."),
        io.Combo.Input("length_unit", options=list(LENGTH_UNITS), default="seconds",
                       tooltip="seconds (16 fps) | latent_frames (4 video frames each) | frames (video frames, "
                               "rounded up to whole latent frames)."),
    ]


def transition_inputs() -> list:
    return [
        io.Combo.Input("transition", options=list(TRANSITIONS), default="cut", tooltip=TRANSITION_TOOLTIP),
        io.Int.Input("transition_frames", default=3, min=0, max=1000, tooltip=TRANSITION_FRAMES_TOOLTIP),
    ]


class HeadForcingPromptSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingPromptSegment",
            display_name="Head Forcing Prompt Segment",
            category=CATEGORY,
            description=("One prompt of a multi-prompt video: its conditioning, how long it lasts and how the video "
                         "enters it. Chain segments through 'previous'; the result is a PROMPT_SCHEDULE for Head "
                         "Forcing AR Sampler or Head Forcing Continue."),
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="This segment's prompt (CLIPTextEncode with umT5)."),
                *length_inputs(),
                *transition_inputs(),
                io.Combo.Input("recache_mode", options=list(RECACHE_CHOICES), default="policy default",
                               optional=True, tooltip=RECACHE_MODE_TOOLTIP),
                PROMPT_SCHEDULE.Input("previous", optional=True,
                                      tooltip="The segments before this one (another Prompt Segment or a "
                                              "schedule from text). Left empty, this segment starts a schedule."),
                io.String.Input("label", default="", optional=True,
                                tooltip="A name for reports (e.g. the prompt text)."),
            ],
            outputs=[
                PROMPT_SCHEDULE.Output(display_name="prompt_schedule",
                                       tooltip="The schedule so far, this segment last."),
                io.String.Output(display_name="summary", tooltip="The segments of the schedule."),
            ],
        )

    @classmethod
    def execute(cls, conditioning, length, length_unit, transition, transition_frames, previous=None,
                label="", recache_mode="policy default") -> io.NodeOutput:
        segment = make_segment(conditioning_tensor(conditioning), length, length_unit, transition,
                               transition_frames, label, recache_mode)
        if previous is None:
            schedule = PromptSchedule((segment,))
        else:
            schedule = check_schedule(previous).then(segment)
        return io.NodeOutput(schedule, schedule.describe())


def encode_prompt(clip, text: str):
    """ComfyUI's CLIPTextEncode, as a function: CONDITIONING for one prompt."""
    if clip is None:
        raise ScheduleError("connect a CLIP (CLIPLoader type 'wan' with the umT5-XXL text encoder)")
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


class HeadForcingPromptScheduleFromText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingPromptScheduleFromText",
            display_name="Head Forcing Prompt Schedule From Text",
            category=CATEGORY,
            description=("A whole story as text, one segment per line: 'seconds | prompt', optionally "
                         "'| cut', '| recache N [mode]', '| blend N' (N in latent frames; mode block_causal, "
                         "longlive or longlive_local_sink, see Prompt Segment's recache_mode) or '| interpolate N' "
                         "(N chunks), and last '| same noise' (a take's live switch: no new noise draw). A length "
                         "may be latent frames ('13 latent'). Lines starting with '#' are comments. Each prompt is "
                         "encoded with the connected CLIP. A sampler's 'take' output is such a text."),
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder: CLIPLoader with umt5_xxl, type 'wan'."),
                io.String.Input("text", multiline=True,
                                default="5 | a red fox trots through fresh snow in a pine forest\n"
                                        "5 | the fox stops and looks straight at the camera | blend 3\n"
                                        "5 | the fox leaps into a snow bank | recache 3",
                                tooltip="One 'seconds | prompt [| transition] [| same noise]' per line; the transition "
                                        "is 'cut', 'recache N [mode]' (mode: block_causal, longlive or "
                                        "longlive_local_sink; none = the policy's default), 'blend N' or "
                                        "'interpolate N' (N chunks)."),
                io.Combo.Input("default_transition", options=list(TRANSITIONS), default="cut", optional=True,
                               tooltip="Transition of lines that name none. " + TRANSITION_TOOLTIP),
                io.Int.Input("default_transition_frames", default=3, min=0, max=1000, optional=True,
                             tooltip=TRANSITION_FRAMES_TOOLTIP),
            ],
            outputs=[
                PROMPT_SCHEDULE.Output(display_name="prompt_schedule", tooltip="One segment per line."),
                io.String.Output(display_name="summary", tooltip="The parsed segments."),
            ],
        )

    @classmethod
    def validate_inputs(cls, text):
        # A bad line is reported when the prompt is queued, before anything runs. ComfyUI files the
        # answer once per argument of this method, so it takes the text alone (the lines' own
        # syntax); how lines without a transition combine with the default is checked when the
        # node runs.
        if not isinstance(text, str):  # the text comes from a link: checked when the node runs
            return True
        try:
            parse_schedule_text(text)
        except ScheduleError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, clip, text, default_transition="cut", default_transition_frames=3) -> io.NodeOutput:
        lines = parse_schedule_text(text, default_transition,
                                    transition_frames_for(default_transition, default_transition_frames))
        segments = []
        for line in lines:
            cond = conditioning_tensor(encode_prompt(clip, line.prompt))
            try:
                segments.append(PromptSegment(cond, transition=line.transition,
                                              transition_frames=line.transition_frames, label=line.prompt,
                                              recache_mode=line.recache_mode, text=line.prompt,
                                              same_noise=line.same_noise, **line.length_keywords()))
            except ScheduleError as e:
                raise ScheduleError(f"line {line.line}: {e}") from None
        schedule = PromptSchedule(tuple(segments))
        return io.NodeOutput(schedule, schedule.describe())
