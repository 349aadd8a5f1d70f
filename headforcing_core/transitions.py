"""Transitions between prompts, planned on the host: what a schedule run will do at every switch.

The meaning of ``cut``, ``recache`` (and its modes), ``blend`` and ``interpolate`` is in
:mod:`headforcing_core.prompts`; this module decides, before any model call, where each segment starts,
whether it switches the prompt (:func:`same_context`), how many frames a recache re-runs
(:func:`recache_frames`, the policy's :func:`default_recache_mode`), the blend weight of each chunk
(:func:`blend_weight`, :func:`blend_text`), the embedding of each chunk of an interpolation
(:class:`Interpolation`: :func:`interpolation_weight`, :func:`interpolate_context` — Krea Realtime's rule)
and how many model calls the run makes (:func:`count_model_calls`, the progress total).
:class:`~headforcing_core.story_sampler.ScheduleSampler` carries the plan out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import TextContext
from .geometry import chunk_bounds
from .memory import TAIL_FRAMES
from .prompts import (LONGLIVE_SINK, LONGLIVE_WINDOW, MAX_TRANSITION_FRAMES, RECACHE_MODES, PromptSchedule,
                      PromptSegment)


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


def krea_interpolation(old: torch.Tensor, new: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """Krea Realtime's prompt change in its own loop: the text embeddings of the next ``blocks`` blocks,
    ``interpolate_context(old, new, interpolation_weight(i, blocks))`` for each (the rule, with its source, is
    :func:`interpolation_weight`: 0, 1/3, 2/3, 1 for Krea's 4 blocks; 1 block is an immediate switch, where
    Krea's code would never reach the new prompt — docs/krea.md). Interpolated in embedding space (the umT5
    output, zero-padded to a common length), not in the cross-attention K/V (:func:`blend_text`).
    ``old`` / ``new``: ``[B, L, C]`` text-encoder outputs (batches broadcast)."""
    n = int(blocks)
    if n < 1:
        raise ValueError(f"a prompt interpolation takes at least 1 block, got {blocks}")
    return [interpolate_context(old, new, interpolation_weight(i, n)) for i in range(n)]


def blend_text(old: TextContext, new: TextContext, alpha: float) -> TextContext:
    """``(1-α)·old + α·new`` of every layer's cross-attention K and V (batches broadcast)."""
    a = float(alpha)
    return TextContext([(1 - a) * ko + a * kn for ko, kn in zip(old.keys, new.keys)],
                       [(1 - a) * vo + a * vn for vo, vn in zip(old.values, new.values)])


def interpolation_weight(step: int, steps: int) -> float:
    """Weight of the new prompt in the ``step``-th chunk (0-based) of an interpolation over ``steps`` chunks.

    Krea Realtime's rule (``krea-ai/realtime-video``, ``release_server.py``,
    ``GenerationSession.interpolate_prompt_embeds``): on a prompt change it makes
    ``torch.lerp(old, new, torch.linspace(0, 1, steps))`` — ``steps`` embeddings, one per generated block, the
    first still the old prompt (weight 0), the last the new one (weight 1) — and every following block takes
    the next (``generate_block_internal``). Its server uses 4 steps: 0, 1/3, 2/3, 1. One step is a plain cut
    (weight 1: ``linspace(0, 1, 1)`` would be ``[0]``, a switch that never arrives; Krea never asks for it).
    """
    steps, step = int(steps), int(step)
    if steps < 1 or not 0 <= step < steps:
        raise ValueError(f"interpolation step {step} of {steps}")
    if steps == 1:
        return 1.0
    return float(torch.linspace(0.0, 1.0, steps, dtype=torch.float32)[step])


def interpolate_context(old: torch.Tensor, new: torch.Tensor, weight: float) -> torch.Tensor:
    """``torch.lerp(old, new, weight)`` of two text-encoder outputs ``[B, L, C]`` (Krea's arithmetic: the weight
    in the embeddings' dtype). A shorter one is padded with zero tokens first, as Wan pads every prompt to 512
    tokens after the encoder, so this is the interpolation of the padded embeddings Krea's encoder returns."""
    length = max(old.shape[1], new.shape[1])
    old = F.pad(old, (0, 0, 0, length - old.shape[1]))
    new = F.pad(new.to(old.device, old.dtype), (0, 0, 0, length - new.shape[1]))
    return torch.lerp(old, new, torch.tensor(weight, dtype=torch.float32).to(old.dtype))


@dataclass
class Interpolation:
    """An interpolation in progress: from ``source`` (the embedding in effect when the switch came) to
    ``target`` over ``steps`` chunks, ``step`` of them made. A new switch starts from :meth:`current`, the
    embedding of the last chunk made (Krea's ``current_prompt_embeds``), so a prompt sent mid-interpolation
    sets off from where the video is."""

    source: torch.Tensor
    target: torch.Tensor
    steps: int
    step: int = 0

    def next_context(self) -> torch.Tensor:
        """The embedding of the next chunk (and count it)."""
        ctx = interpolate_context(self.source, self.target, interpolation_weight(self.step, self.steps))
        self.step += 1
        return ctx

    def current(self) -> torch.Tensor:
        """The embedding of the last chunk made (the source before the first)."""
        if self.step == 0:
            return self.source
        return interpolate_context(self.source, self.target, interpolation_weight(self.step - 1, self.steps))

    @property
    def done(self) -> bool:
        return self.step >= self.steps


@dataclass
class SegmentPlan:
    """How one segment of a schedule is entered (:func:`plan_segments`)."""

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
    if longlive_sink_attended(mode, switch_frame):
        n = min(LONGLIVE_WINDOW - LONGLIVE_SINK, tail)
    return max(n, 0)


def longlive_sink_attended(mode: str, switch_frame: int) -> int:
    """Sink frames a recache at ``switch_frame`` attends besides the frames it re-runs: LongLive's global sink,
    once the switch is past its window (``longlive``); none otherwise."""
    return LONGLIVE_SINK if mode == "longlive" and switch_frame > LONGLIVE_WINDOW else 0


def plan_segments(schedule: PromptSchedule, frames_per_block: int, *, start_frame: int = 0,
                  context: torch.Tensor | None = None, started: bool = False, tail_frames: int = 0,
                  default_mode: str = "block_causal") -> list[SegmentPlan]:
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
        plans.append(SegmentPlan(seg, pos, switch, rec, mode))
        started, ctx = True, seg.context
        pos += seg.frames
        tail = min(TAIL_FRAMES, tail + seg.frames)
    return plans


def planned_recaches(schedule: PromptSchedule, frames_per_block: int, policy, *, start_frame: int = 0,
                     live: bool = False) -> tuple[tuple[str, int, int], ...]:
    """``(mode, frames re-run, sink frames attended besides them)`` of the recaches a run of ``schedule`` may
    make, what :func:`~headforcing_core.memory.estimate_run` sizes their model calls by: those its segments ask
    for (a continuation from ``start_frame`` counts its first segment's too) and, for a run that takes live
    prompts, the widest recache of every mode (:data:`LIVE_RECACHES`)."""
    plans = plan_segments(schedule, frames_per_block, start_frame=start_frame, started=start_frame > 0,
                          tail_frames=min(start_frame, TAIL_FRAMES), default_mode=default_recache_mode(policy))
    asked = tuple((p.mode, p.recache, longlive_sink_attended(p.mode, p.start)) for p in plans if p.recache)
    return asked + (LIVE_RECACHES if live else ())


# a live run may switch with any recache at any frame: the widest of each mode's calls, at a switch past
# LongLive's window and the kept tail
_LATE_SWITCH = max(LONGLIVE_WINDOW, TAIL_FRAMES) + 1
LIVE_RECACHES = tuple((mode, recache_frames(mode, MAX_TRANSITION_FRAMES, _LATE_SWITCH, TAIL_FRAMES),
                       longlive_sink_attended(mode, _LATE_SWITCH))
                      for mode in RECACHE_MODES)


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
