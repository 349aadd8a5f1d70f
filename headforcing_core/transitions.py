"""Transitions between prompts, planned on the host: what a schedule run will do at every switch.

The meaning of ``cut``, ``recache`` (and its modes) and ``blend`` is in :mod:`headforcing_core.prompts`;
this module decides, before any model call, where each segment starts, whether it switches the
prompt (:func:`same_context`), how many frames a recache re-runs (:func:`recache_frames`, the policy's
:func:`default_recache_mode`), the blend weight of each chunk (:func:`blend_weight`, :func:`blend_text`)
and how many model calls the run makes (:func:`count_model_calls`, the progress total).
:class:`~headforcing_core.story_sampler.ScheduleSampler` carries the plan out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import TextContext
from .geometry import chunk_bounds
from .memory import TAIL_FRAMES
from .prompts import LONGLIVE_SINK, LONGLIVE_WINDOW, PromptSchedule, PromptSegment


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
    """Krea Realtime's prompt change: the text embeddings of the next ``blocks`` blocks.

    ``release_server.py`` ``GenerationSession.interpolate_prompt_embeds``: ``torch.lerp(old, new, w)`` with
    ``w = torch.linspace(0, 1, steps=blocks)``, one embedding per block, taken one per block by
    ``generate_block_internal`` (``self.interpolated_prompt_embeds.pop(0)``); ``ws_session`` asks for
    ``interp_steps`` blocks, default 4 (so 0, 1/3, 2/3, 1: the first block after the change still has
    the old embedding, the fourth the new one). Interpolated in embedding space — the umT5 output, both
    zero-padded to a common length (Krea's text encoder pads to 512; the runner pads the result the
    same way) — not in the cross-attention K/V (:func:`blend_text`).

    ``blocks = 1`` is an immediate switch (``w = [1]``). Krea's code would give ``linspace(0, 1, 1) = [0]``,
    the old embedding, and never reach the new prompt; docs/krea.md lists this as one of our differences.
    ``old`` / ``new``: ``[B, L, C]`` text-encoder outputs (batches broadcast)."""
    n = int(blocks)
    if n < 1:
        raise ValueError(f"a prompt interpolation takes at least 1 block, got {blocks}")
    length = max(old.shape[1], new.shape[1])
    a = torch.nn.functional.pad(old, (0, 0, 0, length - old.shape[1]))
    b = torch.nn.functional.pad(new.to(old.device, old.dtype), (0, 0, 0, length - new.shape[1]))
    a, b = torch.broadcast_tensors(a, b)
    if n == 1:
        return [b]
    weights = torch.linspace(0, 1, steps=n, dtype=torch.float32)
    return [torch.lerp(a, b, w.to(a.dtype)) for w in weights]


def blend_text(old: TextContext, new: TextContext, alpha: float) -> TextContext:
    """``(1-α)·old + α·new`` of every layer's cross-attention K and V (batches broadcast)."""
    a = float(alpha)
    return TextContext([(1 - a) * ko + a * kn for ko, kn in zip(old.keys, new.keys)],
                       [(1 - a) * vo + a * vn for vo, vn in zip(old.values, new.values)])


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
    if mode == "longlive" and switch_frame > LONGLIVE_WINDOW:
        n = min(LONGLIVE_WINDOW - LONGLIVE_SINK, tail)
    return max(n, 0)


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
