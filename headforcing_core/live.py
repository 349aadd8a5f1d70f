"""Live prompt switches: steering a run between chunks, and the *take* that records it.

A running :class:`~headforcing_core.story_sampler.ScheduleSampler` asks its :class:`LiveInput` before every
chunk whether the person watching wants another prompt (:meth:`LiveInput.poll`). A :class:`LiveSwitch`
(a prompt already encoded, its text, the transition) is applied at that chunk boundary by editing the
run's own prompt schedule (:func:`splice`): what is made is always the plan the sampler runs, so the
finished run's schedule — its *take* — re-renders exactly.

* **What a switch replaces.** The current segment ends at the switch; the new prompt runs to the end
  of the run; the prepared segments after the switch are dropped (the person directs now).
* **Noise.** A run draws its initial noise for the plan it starts with, one draw per segment
  (:func:`headforcing_core.noise.segment_noise`). A switch changes no frame's noise: the new prompt's
  first piece goes on with the draw it falls in (marked ``same_noise``) and is cut where the next
  draw of the prepared plan starts (the pieces after it keep the same prompt: no switch there). So a
  take written as schedule text (``| same noise`` on those lines) draws the same noise.
* **When.** At the next chunk boundary — except inside a ``blend``, which runs to its end first (the
  sampler says why through ``busy``). ``interpolate`` may be interrupted: the next switch sets off
  from the embedding in effect.

The take: every segment the run made, with its effective transition, is logged in the AR_STATE's
history (:mod:`headforcing_core.story`); :func:`take_lines` / :func:`take_text` write it as the schedule
text the Prompt Schedule From Text node reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .prompts import PromptSchedule, PromptSegment, ScheduleError, shorten
from .schedule_text import ScheduleLine, format_schedule_text, length_text

NO_TEXT = "(conditioning without text)"  # what a take writes for a prompt whose text is not known


@dataclass(frozen=True, eq=False)
class LiveSwitch:
    """A prompt to switch to at the next chunk boundary: its encoded ``context``, its ``text`` (the take's line)
    and the transition into it (as a :class:`~headforcing_core.prompts.PromptSegment` has them)."""

    context: torch.Tensor
    text: str
    transition: str = "cut"
    transition_frames: int = 0
    recache_mode: str | None = None

    def segment(self, frames: int) -> PromptSegment:
        """This prompt as a segment of ``frames`` latent frames (checked like any segment)."""
        return PromptSegment(self.context, frames=frames, transition=self.transition,
                             transition_frames=self.transition_frames, recache_mode=self.recache_mode,
                             label=self.text, text=self.text)


class LiveInput(Protocol):
    """What a running sampler asks before every chunk."""

    def poll(self, frame: int, busy: str | None) -> LiveSwitch | None:
        """The switch to make before the chunk starting at latent frame ``frame``, or None. ``busy``: why no
        switch can be made now (a blend still runs), else None — keep a request for a later chunk then."""


def splice(schedule: PromptSchedule, at: int, switch: LiveSwitch) -> tuple[PromptSegment, ...]:
    """``schedule`` (resolved) with ``switch`` made at its latent frame ``at`` (0 ≤ at < its length): the segments
    before ``at`` as they are (the one ``at`` falls in cut short), then the new prompt to the end, in pieces
    that start where the schedule's noise draws start (see the module docstring)."""
    total = schedule.total_frames
    if not 0 <= at < total:
        raise ScheduleError(f"a live switch at frame {at} is outside the schedule's {total} frames")
    bounds = schedule.bounds()
    draws = {start for (start, _), seg in zip(bounds, schedule) if not seg.same_noise}
    kept = []
    for (start, n), seg in zip(bounds, schedule):
        if start + n <= at:
            kept.append(seg)
        elif start < at:
            try:
                kept.append(seg.with_frames(at - start))
            except ScheduleError as e:
                raise ScheduleError(f"a live switch at frame {at} cannot cut the segment there short: {e}") from None
    edges = sorted(d for d in draws if d > at) + [total]
    pieces, pos = [], at
    for end in edges:
        piece = switch.segment(end - pos)
        if pieces:  # the same prompt again: no switch, a new noise draw
            piece = replace(piece, transition="cut", transition_frames=0, recache_mode=None)
        else:
            piece = replace(piece, same_noise=at not in draws)
        pieces.append(piece)
        pos = end
    return tuple(kept + pieces)


# ---------------------------------------------------------------------------------------------
# the take


def take_lines(history: list[dict], frames_per_block: int) -> tuple[list[ScheduleLine], list[str]]:
    """Schedule lines re-rendering the segments of an AR_STATE ``history`` (one node's part of it), and the
    problems that keep it from re-rendering exactly (a prompt whose text is not known)."""
    lines, problems = [], []
    for i, seg in enumerate(history):
        text = seg.get("text")
        if not text:
            problems.append(f"line {i + 1}'s prompt came from a CONDITIONING without text (not a CLIPTextEncode, "
                            "a Prompt Schedule From Text or a live switch): write its text in before re-rendering")
            text = NO_TEXT
        one_line = " ".join(str(text).replace("|", "/").split())
        if one_line != text and text != NO_TEXT:
            problems.append(f"line {i + 1}'s prompt has line breaks, '|' or extra spaces, which schedule text cannot "
                            "hold: the line writes it on one line, which encodes a little differently")
        transition = seg["transition"]  # the effective one: "cut" where no switch happened
        n = int(seg.get("transition_frames", 0)) if transition != "cut" else 0
        mode = seg.get("recache_mode") if transition == "recache" else None
        lines.append(ScheduleLine(i + 1, prompt=one_line, transition=transition,
                                  transition_frames=max(n, 1) if transition != "cut" else 0, recache_mode=mode,
                                  same_noise=bool(seg.get("same_noise")),
                                  **length_text(int(seg["frames"]), frames_per_block)))
    return lines, problems


def take_text(history: list[dict], frames_per_block: int, comments: list[str] = ()) -> tuple[str, list[str]]:
    """(schedule text of ``history``'s segments after ``# comments``, problems): see :func:`take_lines`."""
    lines, problems = take_lines(history, frames_per_block)
    notes = list(comments) + [f"NOT exact as it stands: {p}" for p in problems]
    return format_schedule_text(lines, notes), problems


def describe_switch(switch: LiveSwitch) -> str:
    """``interpolate 4 → 'a fox in the city'`` (for reports and the panel)."""
    trans = switch.transition if switch.transition == "cut" else f"{switch.transition} {switch.transition_frames}"
    if switch.recache_mode and switch.transition == "recache":
        trans += f" {switch.recache_mode}"
    return f"{trans} → {shorten(switch.text, 60)!r}"
