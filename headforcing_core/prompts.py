"""Multi-prompt stories: prompt schedules, transitions and the schedule sampler.

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
    embedding space, average the conditionings with ComfyUI's ConditioningAverage
    and use ``cut``.)

Every switch calls the cache's ``on_prompt_switch`` (memory heads of
``head_forcing`` open a new episode). A segment whose conditioning equals the
current prompt (same shape and values) is *not* a switch: it simply continues.
The first segment of a fresh run has no predecessor, so its transition is ignored;
when continuing from an AR_STATE it applies against the state's last prompt.

Chunking restarts at every segment: a segment's chunks start at its first frame
(a segment that is not a whole number of chunks ends with a shorter chunk). Segment
lengths given in seconds are rounded to whole chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .backbone import TextContext
from .errors import HeadForcingError, ShapeError
from .plan import ChunkAttention, plan_chunk
from .retention import ChunkKeys, Key
from .policies import TRAINING_WINDOW
from .geometry import (FPS, MAX_LATENT_FRAMES, MAX_VIDEO_SECONDS, TIME_COMPRESSION, chunk_bounds,
                       seconds_to_chunked_frames)
from .memory import TAIL_FRAMES
from .sampler import ARSampler, Hooks

TRANSITIONS = ("cut", "recache", "blend")
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


def _short(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass(frozen=True, eq=False)
class PromptSegment:
    """One prompt of a story. Give ``frames`` (latent frames) or ``seconds`` (resolved later).

    ``transition`` / ``transition_frames`` say how the video enters this segment from the
    previous one (see the module docstring); ``transition_frames`` is in latent frames
    (one latent frame = 4 video frames = 0.25 s at 16 fps) and is ignored for ``cut``.
    """

    context: torch.Tensor
    frames: int | None = None
    seconds: float | None = None
    transition: str = "cut"
    transition_frames: int = 0
    label: str = ""
    recache_mode: str | None = None  # None: the policy's default (longlive for the longlive preset)

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
        if self.transition in ("recache", "blend") and k < 1:
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
        mode = self.recache_mode or default_mode
        if self.transition == "recache" and mode:
            default = "" if self.recache_mode else ", the policy's default"
            if mode == "block_causal":
                trans += f" ({mode}{default})"
            else:  # N does not apply: LongLive's window does
                trans = f"recache ({mode}{default}: LongLive's window, {LONGLIVE_WINDOW} frames)"
        return f"{length}, {trans}" + (f": {_short(self.label)}" if self.label else "")


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


# ---------------------------------------------------------------------------------------------
# text format: one "seconds | prompt [| transition [frames]]" per line


@dataclass(frozen=True)
class ScheduleLine:
    line: int  # 1-based line number in the text
    seconds: float
    prompt: str
    transition: str = "cut"
    transition_frames: int = 0
    recache_mode: str | None = None


def parse_schedule_text(text: str, default_transition: str = "cut", default_frames: int = 0) -> list[ScheduleLine]:
    """Parse a multi-line story, one segment per line::

        5 | a red fox runs through fresh snow
        4.5 | the fox stops and looks at the camera | blend 6
        6 | close-up of the fox's eyes | recache 3
        5 | the fox runs off | recache 12 longlive
        # comment lines and blank lines are skipped

    The first field is the length in seconds (``5``, ``4.5``, ``5s``); the second the prompt;
    an optional third the transition into this segment (``cut``, ``recache N [mode]``, ``blend N``,
    N in latent frames; mode one of :data:`RECACHE_MODES`, else the policy's default), else
    ``default_transition`` with ``default_frames``. Errors name the line number and its content.
    """
    if default_transition not in TRANSITIONS:
        raise ScheduleError(f"unknown transition {default_transition!r}; choose one of {', '.join(TRANSITIONS)}")
    out = []
    for n, raw in enumerate(str(text).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def fail(why: str):
            raise ScheduleError(f"line {n} ({_short(line, 60)!r}): {why}; expected 'seconds | prompt' "
                                "(optionally '| cut', '| recache N [mode]' or '| blend N')")

        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 2:
            fail("no '|' between the length and the prompt")
        if len(parts) > 3:
            fail("too many '|' separators (a prompt cannot contain '|')")
        sec_text = parts[0].lower().removesuffix("s").removesuffix("sec").strip()
        try:
            seconds = float(sec_text)
        except ValueError:
            fail(f"{parts[0]!r} is not a length in seconds")
        if not math.isfinite(seconds) or seconds <= 0:
            fail(f"the length must be a positive number of seconds, got {parts[0]!r}")
        if seconds > MAX_VIDEO_SECONDS:
            fail(f"{parts[0]!r} s is longer than any video the sampler makes (at most {MAX_VIDEO_SECONDS} s): "
                 "shorten it")
        prompt = parts[1]
        if not prompt:
            fail("the prompt is empty")
        transition, frames, mode = default_transition, default_frames, None
        if len(parts) == 3:
            words = parts[2].lower().split()
            if len(words) == 3 and words[0] == "recache":
                mode = words.pop()
                if mode not in RECACHE_MODES:
                    fail(f"{mode!r} is not a recache mode ({', '.join(RECACHE_MODES)})")
            if not words or words[0] not in TRANSITIONS or len(words) > 2:
                fail(f"{parts[2]!r} is not a transition (cut, recache N [mode], blend N)")
            transition = words[0]
            frames = 0
            if len(words) == 2:
                try:
                    frames = int(words[1])
                except ValueError:
                    fail(f"{words[1]!r} is not a whole number of latent frames")
            elif transition != "cut":
                fail(f"{transition} needs a frame count, e.g. '{transition} 3'")
        if transition != "cut":
            if frames < 1:
                fail(f"a {transition} transition needs at least 1 latent frame")
            if transition == "recache" and frames > MAX_TRANSITION_FRAMES:
                fail(f"recache re-runs at most {MAX_TRANSITION_FRAMES} latent frames")
        else:
            frames = 0
        out.append(ScheduleLine(n, seconds, prompt, transition, frames, mode))
    if not out:
        raise ScheduleError("the schedule text has no segments; write one 'seconds | prompt' per line")
    if sum(line.seconds for line in out) > MAX_VIDEO_SECONDS:
        raise ScheduleError(f"the lines add up to {sum(line.seconds for line in out):g} s; the sampler makes at "
                            f"most {MAX_VIDEO_SECONDS} s of video: shorten them")
    return out


# ---------------------------------------------------------------------------------------------
# transitions


def same_context(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """True when two conditionings are the same prompt (same shape and values)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    return a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu())


def blend_weight(first: int, frames: int, k: int) -> float:
    """Weight of the new prompt for a chunk of ``frames`` starting at segment frame ``first``."""
    return sum(min(1.0, (j + 0.5) / k) for j in range(first, first + frames)) / frames


def blend_text(old: TextContext, new: TextContext, alpha: float) -> TextContext:
    """``(1-α)·old + α·new`` of every layer's cross-attention K and V (batches broadcast)."""
    a = float(alpha)
    return TextContext([(1 - a) * ko + a * kn for ko, kn in zip(old.keys, new.keys)],
                       [(1 - a) * vo + a * vn for vo, vn in zip(old.values, new.values)])


@dataclass
class _SegmentPlan:
    segment: PromptSegment
    start: int  # first frame (absolute)
    switch: bool  # the prompt changes here
    recache: int  # frames actually re-run (0: none)
    mode: str = "block_causal"  # how a recache re-runs them


def recache_frames(mode: str, requested: int, switch_frame: int, tail: int) -> int:
    """Frames a recache at ``switch_frame`` re-runs. ``block_causal``: the last ``requested`` committed frames
    (the segment's N). The LongLive modes (``pipeline/interactive_causal_inference.py`` ``_recache_after_switch``)
    ignore N: ``min(LONGLIVE_WINDOW, s)``, of which, past the window with the global sink (``longlive``), only
    the last ``window - sink`` matter."""
    if mode == "block_causal":
        return max(min(requested, switch_frame, tail), 0)
    n = min(LONGLIVE_WINDOW, switch_frame, tail)
    if mode == "longlive" and switch_frame > LONGLIVE_WINDOW:
        n = min(LONGLIVE_WINDOW - LONGLIVE_SINK, tail)
    return max(n, 0)


def plan_segments(schedule: PromptSchedule, frames_per_block: int, *, start_frame: int = 0,
                  context: torch.Tensor | None = None, started: bool = False, tail_frames: int = 0,
                  default_mode: str = "block_causal") -> list[_SegmentPlan]:
    """Where each segment starts, whether it switches the prompt and how many frames a recache re-runs.

    ``context``/``started``: the current prompt, if any (a fresh run has none); ``tail_frames``:
    committed latents available for a recache; ``default_mode``: the recache mode of segments
    that do not name one.
    """
    sched = schedule.resolve(frames_per_block)
    plans, pos, ctx, tail = [], start_frame, context, tail_frames
    for seg in sched:
        switch = started and not same_context(ctx, seg.context)
        mode = seg.recache_mode or default_mode
        rec = recache_frames(mode, seg.transition_frames, pos, tail) if switch and seg.transition == "recache" else 0
        plans.append(_SegmentPlan(seg, pos, switch, rec, mode))
        started, ctx = True, seg.context
        pos += seg.frames
        tail = min(TAIL_FRAMES, tail + seg.frames)
    return plans


def default_recache_mode(policy) -> str:
    """The recache mode of a segment that names none: LongLive's own (``longlive``) under the
    ``longlive`` preset — the model was trained for it — and ``block_causal`` otherwise. ``policy``:
    a :class:`CachePolicy`, a preset name, or ``None``."""
    preset = policy if isinstance(policy, str) else getattr(policy, "preset", None)
    return "longlive" if preset == "longlive" else "block_causal"


def count_model_calls(schedule: PromptSchedule, frames_per_block: int, steps: int, *, first_steps: int | None = None,
                      **where) -> int:
    """Model calls a schedule run makes: ``steps + 1`` per chunk (``first_steps + 1`` for the run's very first
    chunk when given), plus a recache's re-runs: one per re-run chunk (block_causal) or one (LongLive)."""
    calls = 0
    first = first_steps
    for p in plan_segments(schedule, frames_per_block, **where):
        chunks = len(chunk_bounds(0, p.segment.frames, frames_per_block))
        calls += chunks * (steps + 1)
        if first is not None and chunks:
            calls += first - steps
            first = None
        if p.recache:
            calls += len(chunk_bounds(0, p.recache, frames_per_block)) if p.mode == "block_causal" else 1
    return calls


def segment_noise(draw, start_frame: int, frames: list[int]) -> torch.Tensor:
    """Initial noise of consecutive segments, the same whether they are sampled in one run or one by one.

    ``draw(s, e)`` returns frames ``[s, e)`` of the noise a fresh run of ``e`` latent frames
    starts from (``[B, C, e - s, H, W]``; :func:`headforcing_core.noise.noise_frames` draws them
    without the rest). The segment covering absolute frames ``[s, e)`` gets ``draw(s, e)``: a
    single segment from frame 0 is exactly a fresh run's noise, and sampling segments one by one
    (Continue) draws what one run of the whole schedule draws. Memory: the result and one
    segment's draw, whatever the number of segments.
    """
    out, pos = None, start_frame
    for n in frames:
        part = draw(pos, pos + n)
        if len(frames) == 1:
            return part
        if out is None:
            out = part.new_empty((*part.shape[:2], sum(frames), *part.shape[3:]))
        out[:, :, pos - start_frame:pos - start_frame + n] = part
        pos += n
    return out


@dataclass
class ScheduleSampler(ARSampler):
    """An :class:`~headforcing_core.sampler.ARSampler` that runs prompt schedules.

    Besides the sampler state it remembers the current prompt's conditioning
    (``context``) and the last committed latents (``tail``, up to 21 frames, for
    ``recache``). ``events`` logs every transition applied:
    ``{"frame", "transition", "switch", "frames", "replaced"}``.
    """

    context: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    events: list = field(default_factory=list)

    # ---- planning --------------------------------------------------------------------------
    def plan_schedule(self, schedule: PromptSchedule) -> list[_SegmentPlan]:
        return plan_segments(schedule, self.frames_per_block, **self._where())

    def schedule_model_calls(self, schedule: PromptSchedule, start_frame: int | None = None) -> int:
        """Model calls running ``schedule`` makes from here (or, for a run that first puts ``start_frame``
        initial frames into the cache, from there)."""
        first = len(self.first_schedule.timesteps) if (self.first_schedule is not None
                                                        and self.chunks_generated == 0) else None
        where = self._where()
        if start_frame is not None:
            where["start_frame"] = start_frame
        return count_model_calls(schedule, self.frames_per_block, len(self.schedule.timesteps), first_steps=first,
                                 **where)

    def _where(self) -> dict:
        return dict(start_frame=self.next_frame, context=self.context, started=self.text is not None,
                    tail_frames=0 if self.tail is None else self.tail.shape[2],
                    default_mode=default_recache_mode(self.policy))

    # ---- running ---------------------------------------------------------------------------
    @torch.no_grad()
    def run_schedule(self, schedule: PromptSchedule, noise: torch.Tensor, generator: torch.Generator | None = None,
                     hooks: Hooks | None = None, calls_done: int = 0, calls_total: int | None = None) -> torch.Tensor:
        """Generate every segment of ``schedule`` (noise ``[B, C, total, H, W]``), continuing from the cache.

        Call :meth:`start` first (and nothing else: the first segment sets the prompt), or
        restore the sampler from an AR_STATE.
        """
        if self.cache is None:
            raise RuntimeError("call start() before run_schedule()")
        hooks = hooks or Hooks()
        plans = self.plan_schedule(schedule)
        total_frames = sum(p.segment.frames for p in plans)
        if noise.ndim != 5 or noise.shape[2] != total_frames:
            raise ShapeError(f"noise {tuple(noise.shape)} does not cover the schedule's {total_frames} latent frames")
        total = calls_total or (calls_done + self.schedule_model_calls(schedule))
        done = calls_done
        out = torch.empty_like(noise)
        for p in plans:
            seg = p.segment
            previous = self.text
            done = self._enter(p, hooks, done, total)
            local0 = p.start - plans[0].start
            seg_noise = noise[:, :, local0:local0 + seg.frames]
            new_text = self.text
            if p.switch and seg.transition == "blend":
                k = seg.transition_frames
                for s, f in chunk_bounds(0, seg.frames, self.frames_per_block):
                    if s >= k:
                        self.text = new_text
                        out[:, :, local0 + s:local0 + seg.frames], done = self._sample(
                            seg_noise[:, :, s:], generator, hooks, done, total)
                        break
                    self.text = blend_text(previous, new_text, blend_weight(s, f, k))
                    out[:, :, local0 + s:local0 + s + f], done = self._sample(seg_noise[:, :, s:s + f], generator,
                                                                              hooks, done, total)
                self.text = new_text
            else:
                out[:, :, local0:local0 + seg.frames], done = self._sample(seg_noise, generator, hooks, done, total)
        return out

    def _sample(self, noise, generator, hooks: Hooks, done: int, total: int) -> tuple[torch.Tensor, int]:
        """Sample frames (chunk indexes of ``on_chunk`` run on across segments); returns (frames, calls done)."""
        offset = self.chunks_generated
        calls = self.total_model_calls(noise.shape[2])
        on_chunk = hooks.on_chunk
        wrapped = Hooks(hooks.progress, hooks.should_stop,
                        (lambda i, x0: on_chunk(offset + i, x0)) if on_chunk is not None else None)
        out = self.sample(noise, generator, wrapped, done, total)
        self.remember(out)
        return out, done + calls

    def remember(self, latents: torch.Tensor) -> None:
        """Keep the newest committed latents (up to 21 frames) for a later recache."""
        self.tail = latents if self.tail is None else torch.cat([self.tail.to(latents.device, latents.dtype), latents],
                                                                dim=2)
        self.tail = self.tail[:, :, -TAIL_FRAMES:]

    def _enter(self, p: _SegmentPlan, hooks: Hooks, done: int, total: int) -> int:
        seg = p.segment
        if self.text is None:
            self.set_prompt(seg.context)
            self.context = seg.context
            return done
        if not p.switch:
            self.context = seg.context
            return done
        self.set_prompt(seg.context)  # a switch: the cache's memory heads open a new episode
        self.context = seg.context
        event = {"frame": self.next_frame, "transition": seg.transition, "switch": True,
                 "frames": seg.transition_frames if seg.transition != "cut" else 0, "replaced": 0}
        if seg.transition == "recache" and p.recache:
            if p.mode == "block_causal":
                done, event["replaced"] = self.recache(p.recache, hooks, done, total)
            else:
                done, event["replaced"] = self.recache_longlive(LONGLIVE_WINDOW, p.mode == "longlive", hooks,
                                                                done, total)
            event["frames"] = p.recache
            event["mode"] = p.mode
        self.events.append(event)
        return done

    @torch.no_grad()
    def recache(self, frames: int, hooks: Hooks | None = None, done: int = 0, total: int = 0) -> tuple[int, int]:
        """Re-run the last ``frames`` committed frames at t = 0 under the current prompt (LongLive).

        Returns (model calls done, cache entries replaced). See the module docstring.
        """
        hooks = hooks or Hooks()
        if self.tail is None or self.cache is None:
            return done, 0
        n = min(int(frames), self.next_frame, self.tail.shape[2])
        if n <= 0:
            return done, 0
        start = self.next_frame - n
        latents = self.tail[:, :, -n:]
        b = latents.shape[0]
        cache, pol = self.cache, self.policy
        replaced = 0
        for s, f in chunk_bounds(start, n, self.frames_per_block):
            done = self._call_model_checked(hooks, done, total)
            keys = {ts.head_type: ts.tracker.history_keys(s, f) for ts in cache.types}
            plan = plan_chunk(cache, pol.rope, pol.window, pol.clamp_min, pol.clamp_max, s, f, keys=keys,
                              episodes_before=s, gather_prerotated=True)
            self.last_plan = plan
            stage = self._stage(f)
            self.runner.forward(latents[:, :, s - start:s - start + f], torch.zeros(b, f, device=self.runner.device),
                                self.text, ChunkAttention(plan, cache, self.backend, "clean", stage, self.observer),
                                hooks.should_stop)
            k, v = stage
            if cache.prerotated:  # the pool keeps keys rotated at their own (absolute) frames
                k = plan.rotation.apply(k)
            replaced += cache.replace_frames(s, f, k, v)
            self._report(hooks, done, total)
        return done, replaced

    @torch.no_grad()
    def recache_longlive(self, window: int = LONGLIVE_WINDOW, global_sink: bool = True, hooks: Hooks | None = None,
                         done: int = 0, total: int = 0) -> tuple[int, int]:
        """LongLive's released recache (``pipeline/interactive_causal_inference.py`` ``_recache_after_switch``) at
        the switch frame ``s = next_frame``: one model call at timestep 0 under the new prompt, absolute positions,
        no mask (the block-causal mask it builds is never used by the KV-cache branch; LongLive issue #19):

        * ``s <= window``: frames ``[0, s)`` attend each other; all of their stored K/V are rewritten, the sink
          frames included;
        * past the window, with the global sink: frames ``[s - (window - 3), s)`` attend the 3 sink frames (their
          stored, old-prompt K/V) and each other; their K/V are rewritten, the sink keeps its own;
        * past the window, without it (``global_sink=False``): frames ``[s - window, s)`` attend each other and are
          all rewritten, and their first 3 become the sink until the next switch.

        Returns (model calls done, stored frame entries rewritten)."""
        hooks = hooks or Hooks()
        s = self.next_frame
        if self.tail is None or self.cache is None or s == 0:
            return done, 0
        sink = LONGLIVE_SINK
        if s <= window:
            first, attend_sink, new_sink = 0, False, None
        elif global_sink:
            first, attend_sink, new_sink = s - (window - sink), True, None
        else:
            first, attend_sink, new_sink = s - window, False, list(range(s - window, s - window + sink))
        first = max(first, s - self.tail.shape[2])
        n = s - first
        if n <= 0:
            return done, 0
        cache = self.cache
        keys = {}
        for ts in cache.types:
            held = [Key("frame", f, float(f), "sink", True) for f in range(sink)
                    if attend_sink and f in ts.frames.page_of]
            one = tuple(held + [Key("chunk", j, float(first + j), "recent") for j in range(n)])
            keys[ts.head_type] = ChunkKeys(first, n, (one,) * n, (one,) * n)
        done = self._call_model_checked(hooks, done, total)
        plan = plan_chunk(cache, "absolute", self.policy.window, self.policy.clamp_min, self.policy.clamp_max, first, n,
                          keys=keys, gather_prerotated=True)
        self.last_plan = plan
        stage = self._stage(n)
        latents = self.tail[:, :, self.tail.shape[2] - n:]
        self.runner.forward(latents, torch.zeros(latents.shape[0], n, device=self.runner.device), self.text,
                            ChunkAttention(plan, cache, self.backend, "clean", stage, self.observer), hooks.should_stop)
        k, v = stage
        if cache.prerotated:  # the pool keeps keys rotated at their own (absolute) frames
            k = plan.rotation.apply(k)
        if new_sink is not None:
            cache.move_sinks(new_sink)
        replaced = cache.replace_frames(first, n, k, v)
        self._report(hooks, done, total)
        return done, replaced
