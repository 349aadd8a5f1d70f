"""Multi-prompt stories, the data: prompt segments, prompt schedules and what each transition means.

A :class:`PromptSchedule` is an immutable, ordered tuple of :class:`PromptSegment`\\ s.
Each segment holds a text-encoder output (``[B, L, text_dim]``, what ComfyUI's
CONDITIONING carries), a length (latent frames, or seconds resolved later
against the chunk size) and the *transition* that leads into it from the
segment before:

``cut``
    At the segment's first frame the cross-attention context is swapped for the
    new prompt's. Nothing else changes.
``recache`` (LongLive's recache)
    A cut, and then the last ``transition_frames`` committed latent frames are
    re-run once at timestep 0 under the new prompt, chunk by chunk (chunks of
    ``frames_per_block`` starting at the oldest re-run frame). Each re-run chunk
    attends to the retained history strictly older than itself plus itself, and
    its fresh K/V *replace* the stored K/V of those frames wherever the cache
    still keeps them as whole frames (sinks, recent, strided or cyclic frames, see
    :meth:`HeadwiseKVCache.replace_frames`); pooled summaries (merged blocks,
    episodic memory) keep what they had. The re-run makes no new frames.
``blend``
    The two prompts are interpolated over the first ``transition_frames`` latent
    frames of the segment. We blend the per-layer **cross-attention keys and
    values** (not the text embeddings): for a chunk covering segment frames
    ``j0 … j0+f-1`` the weight of the new prompt is the mean over its frames of
    ``min(1, (j + 0.5) / k)`` and every layer uses ``K = (1-α)·K_old + α·K_new``,
    ``V = (1-α)·V_old + α·V_new`` (computed from the two prompts' K/V, which are
    encoded once). Chunks wholly past ``k`` use the new prompt exactly. With
    ``k = 6`` and 3-frame chunks: α = 0.25, 0.75, then 1. (For interpolation in
    embedding space, see ``interpolate``.)
``interpolate`` (Krea Realtime's prompt switch)
    The text-encoder outputs are interpolated over the next ``transition_frames``
    **chunks** (not latent frames): the ``j``-th chunk from the switch uses
    ``torch.lerp(old, new, linspace(0, 1, N)[j])`` as its conditioning, encoded like
    any prompt (:func:`~headforcing_core.transitions.interpolation_weight`); with the
    default N = 4 of Krea's server the weights are 0, 1/3, 2/3, 1, then the new prompt.
    ``old`` is the embedding in effect when the switch comes — mid-interpolation, the
    last one made — so a segment may be shorter than its interpolation: the next
    switch sets off from where the video is; a following segment with the *same*
    prompt carries the interpolation on (so does an AR_STATE).

Every switch calls the cache's ``on_prompt_switch`` (memory heads of
``head_forcing`` open a new episode). A segment whose conditioning equals the
current prompt (same shape and values) is *not* a switch: it simply continues.
The first segment of a fresh run has no predecessor, so its transition is ignored;
when continuing from an AR_STATE it applies against the state's last prompt.

Chunking restarts at every segment: a segment's chunks start at its first frame
(a segment that is not a whole number of chunks ends with a shorter chunk). Segment
lengths given in seconds are rounded to whole chunks.

Noise: every segment starts a new draw of initial noise (:func:`headforcing_core.noise.segment_noise`)
unless it is marked ``same_noise``: then it goes on with the draw of the segment before, as if the
two were one segment (a switch made live, mid-segment, keeps the noise the run drew when it
started; a recorded take marks those lines, see :mod:`headforcing_core.live`).

Where the rest of a story lives:

* :mod:`headforcing_core.schedule_text` — the ``seconds | prompt [| transition]`` text format;
* :mod:`headforcing_core.transitions` — planning a schedule's switches (where each segment starts,
  whether it switches, how many frames a recache re-runs, blend weights, model calls);
* :mod:`headforcing_core.story_sampler` — :class:`ScheduleSampler`, which runs the transitions;
* :mod:`headforcing_core.story` — ``generate_schedule`` / ``continue_generation`` (a whole run, its AR_STATE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .errors import HeadForcingError
from .geometry import FPS, MAX_LATENT_FRAMES, MAX_VIDEO_SECONDS, TIME_COMPRESSION, seconds_to_chunked_frames
from .policies import TRAINING_WINDOW

TRANSITIONS = ("cut", "recache", "blend", "interpolate")
# how a recache re-runs the frames before a switch (see the module docstring)
RECACHE_MODES = ("block_causal", "longlive", "longlive_local_sink")
# LongLive's own recache window, from its config (configs/longlive_interactive_inference.yaml), not the
# segment's N: sink_size 3 and local_attn_size 12 (the sink + history + the current chunk)
LONGLIVE_SINK = 3
LONGLIVE_WINDOW = 12
MAX_TRANSITION_FRAMES = TRAINING_WINDOW  # recache re-runs at most this many frames (the latents kept)


class ScheduleError(HeadForcingError):
    """A prompt schedule (or schedule text) that cannot be sampled."""


# ---------------------------------------------------------------------------------------------
# segments and schedules


def shorten(text: str, n: int = 40) -> str:
    """``text`` on one line, at most ``n`` characters (for reports and error messages)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass(frozen=True, eq=False)
class PromptSegment:
    """One prompt of a story. Give ``frames`` (latent frames) or ``seconds`` (resolved later).

    ``transition`` / ``transition_frames`` say how the video enters this segment from the
    previous one (see the module docstring); ``transition_frames`` is N: latent frames for
    ``recache`` and ``blend`` (one latent frame = 4 video frames = 0.25 s at 16 fps), chunks for
    ``interpolate`` (Krea's blocks), ignored for ``cut``. ``text``: the prompt as text when it is
    known (a take writes it); ``same_noise``: go on with the noise draw of the segment before.
    """

    context: torch.Tensor
    frames: int | None = None
    seconds: float | None = None
    transition: str = "cut"
    transition_frames: int = 0
    label: str = ""
    recache_mode: str | None = None  # None: the policy's default (longlive for the longlive preset)
    text: str | None = None  # the prompt's text, when known (Schedule From Text, a live switch, the graph)
    same_noise: bool = False  # no new noise draw: the segment before's goes on

    def __post_init__(self):
        where = self.where()
        if not torch.is_tensor(self.context) or self.context.ndim != 3:
            shape = tuple(self.context.shape) if torch.is_tensor(self.context) else type(self.context).__name__
            raise ScheduleError(f"{where}: conditioning must be a [batch, tokens, width] tensor, got {shape}")
        if (self.frames is None) == (self.seconds is None):
            raise ScheduleError(f"{where}: give the length either in latent frames or in seconds (exactly one)")
        if self.frames is not None:
            if int(self.frames) != self.frames or self.frames < 1:
                raise ScheduleError(f"{where}: a segment needs at least 1 latent frame, got {self.frames} "
                                    "(zero-length segments are not allowed)")
            object.__setattr__(self, "frames", int(self.frames))
        if self.frames is not None and self.frames > MAX_LATENT_FRAMES:
            raise ScheduleError(f"{where}: {self.frames} latent frames is longer than any video the sampler makes "
                                f"(at most {MAX_LATENT_FRAMES} latent frames = {MAX_VIDEO_SECONDS} s); shorten it")
        if self.seconds is not None:
            if not math.isfinite(self.seconds) or self.seconds <= 0:
                raise ScheduleError(f"{where}: length must be a positive number of seconds, got {self.seconds}")
            if self.seconds > MAX_VIDEO_SECONDS:
                raise ScheduleError(f"{where}: {self.seconds:g} s is longer than any video the sampler makes "
                                    f"(at most {MAX_VIDEO_SECONDS} s); shorten it")
            object.__setattr__(self, "seconds", float(self.seconds))
        if self.transition not in TRANSITIONS:
            raise ScheduleError(f"{where}: unknown transition {self.transition!r}; choose one of "
                                f"{', '.join(TRANSITIONS)}")
        k = int(self.transition_frames)
        if k != self.transition_frames or k < 0:
            raise ScheduleError(f"{where}: transition frames must be a whole number ≥ 0, got {self.transition_frames}")
        object.__setattr__(self, "transition_frames", k)
        if self.transition in ("recache", "blend", "interpolate") and k < 1:
            raise ScheduleError(f"{where}: a {self.transition} transition needs at least 1 frame "
                                "(0 frames is a plain cut)")
        if self.recache_mode is not None and self.recache_mode not in RECACHE_MODES:
            raise ScheduleError(f"{where}: unknown recache mode {self.recache_mode!r}; choose one of "
                                f"{', '.join(RECACHE_MODES)}")
        if self.transition == "recache" and k > MAX_TRANSITION_FRAMES:
            raise ScheduleError(f"{where}: recache re-runs at most {MAX_TRANSITION_FRAMES} latent frames, "
                                f"got {k}")
        if self.transition == "blend" and self.frames is not None and k > self.frames:
            raise ScheduleError(f"{where}: a blend over {k} latent frames does not fit the segment's "
                                f"{self.frames} frames; shorten the blend or lengthen the segment")

    def where(self) -> str:
        return f"segment {self.label!r}" if self.label else "segment"

    @property
    def resolved(self) -> bool:
        return self.frames is not None

    def with_frames(self, frames: int) -> "PromptSegment":
        return replace(self, frames=int(frames), seconds=None)

    def describe(self, default_mode: str | None = None) -> str:
        """One line for reports; ``default_mode``: the recache mode a recache that names none gets."""
        length = f"{self.frames} latent frames" if self.frames is not None else f"{self.seconds:g} s"
        trans = self.transition if self.transition == "cut" else f"{self.transition} {self.transition_frames}"
        if self.transition == "interpolate":
            trans += " chunks"
        mode = self.recache_mode or default_mode
        if self.transition == "recache" and mode:
            default = "" if self.recache_mode else ", the policy's default"
            if mode == "block_causal":
                trans += f" ({mode}{default})"
            else:  # N does not apply: LongLive's window does
                trans = f"recache ({mode}{default}: LongLive's window, {LONGLIVE_WINDOW} frames)"
        return f"{length}, {trans}" + (f": {shorten(self.label)}" if self.label else "")


def seconds_to_latent_frames(seconds: float, frames_per_block: int, fps: float = FPS) -> int:
    """Latent frames for ``seconds`` of video, rounded to whole chunks (:func:`geometry.seconds_to_chunked_frames`)."""
    return seconds_to_chunked_frames(seconds, frames_per_block, fps)


@dataclass(frozen=True, eq=False)
class PromptSchedule:
    """An immutable, ordered list of prompt segments. Build with :meth:`single` / :meth:`then`."""

    segments: tuple[PromptSegment, ...]

    def __post_init__(self):
        segs = tuple(self.segments)
        if not segs:
            raise ScheduleError("a prompt schedule needs at least one segment")
        for i, s in enumerate(segs):
            if not isinstance(s, PromptSegment):
                raise ScheduleError(f"schedule item {i + 1} is a {type(s).__name__}, not a PromptSegment")
        widths = {s.context.shape[-1] for s in segs}
        if len(widths) > 1:
            raise ScheduleError(f"the segments' conditionings have different widths {sorted(widths)}: encode "
                                "every prompt with the same text encoder")
        object.__setattr__(self, "segments", segs)

    @classmethod
    def single(cls, context: torch.Tensor, frames: int, label: str = "") -> "PromptSchedule":
        return cls((PromptSegment(context, frames=frames, label=label),))

    def then(self, segment: PromptSegment) -> "PromptSchedule":
        """A new schedule with ``segment`` appended (this one is unchanged)."""
        return PromptSchedule(self.segments + (segment,))

    def __len__(self) -> int:
        return len(self.segments)

    def __iter__(self):
        return iter(self.segments)

    def __getitem__(self, i) -> PromptSegment:
        return self.segments[i]

    @property
    def resolved(self) -> bool:
        return all(s.resolved for s in self.segments)

    def resolve(self, frames_per_block: int, fps: float = FPS) -> "PromptSchedule":
        """Every segment in latent frames (seconds rounded to whole chunks); blends checked to fit."""
        out = []
        for i, s in enumerate(self.segments):
            try:
                out.append(s if s.resolved else s.with_frames(seconds_to_latent_frames(s.seconds, frames_per_block, fps)))
            except ScheduleError as e:
                msg = str(e).removeprefix("segment: ")
                raise ScheduleError(f"segment {i + 1}: {msg}") from None
        total = sum(s.frames for s in out)
        if total > MAX_LATENT_FRAMES:
            raise ScheduleError(f"the schedule adds up to {total} latent frames ({total * TIME_COMPRESSION / FPS:g} s); the sampler "
                                f"makes at most {MAX_LATENT_FRAMES} ({MAX_VIDEO_SECONDS} s): shorten the segments")
        return PromptSchedule(tuple(out))

    @property
    def total_frames(self) -> int:
        if not self.resolved:
            raise ScheduleError("the schedule has lengths in seconds; resolve(frames_per_block) it first")
        return sum(s.frames for s in self.segments)

    def bounds(self) -> list[tuple[int, int]]:
        """(first latent frame, frames) of every segment, from 0 (lengths must be resolved)."""
        out, pos = [], 0
        for s in self.segments:
            out.append((pos, s.frames))
            pos += s.frames
        return out

    def noise_lengths(self) -> list[int]:
        """Frames of each noise draw (lengths must be resolved): a segment marked ``same_noise`` joins the one
        before (:func:`headforcing_core.noise.segment_noise` draws one piece per entry)."""
        if self.segments[0].same_noise:
            raise ScheduleError("segment 1 is marked 'same noise' (go on with the noise draw of the segment before), "
                                "but nothing comes before it")
        out: list[int] = []
        for s in self.segments:
            if s.same_noise:
                out[-1] += s.frames
            else:
                out.append(s.frames)
        return out

    def describe(self) -> str:
        return "\n".join(f"{i + 1}. {s.describe()}" for i, s in enumerate(self.segments))


def as_schedule(value, frames: int | None = None) -> PromptSchedule:
    """A schedule from a schedule or a bare ``[B, L, C]`` context (one cut segment of ``frames``)."""
    if isinstance(value, PromptSchedule):
        return value
    if isinstance(value, PromptSegment):
        return PromptSchedule((value,))
    if torch.is_tensor(value):
        if frames is None:
            raise ScheduleError("a bare conditioning needs a length in latent frames")
        return PromptSchedule.single(value, frames)
    raise ScheduleError(f"expected a PromptSchedule or a conditioning tensor, got {type(value).__name__}")
