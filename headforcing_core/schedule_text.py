"""The prompt schedule's text format: one ``seconds | prompt [| transition [frames] [mode]]`` per line.

:func:`parse_schedule_text` turns a story written as text into :class:`ScheduleLine`\\ s (lengths in
seconds, prompts still text: the node encodes them into a :class:`~headforcing_core.prompts.PromptSchedule`).
Every error names the line number and its content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .geometry import MAX_VIDEO_SECONDS
from .prompts import MAX_TRANSITION_FRAMES, RECACHE_MODES, TRANSITIONS, ScheduleError, shorten


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
            raise ScheduleError(f"line {n} ({shorten(line, 60)!r}): {why}; expected 'seconds | prompt' "
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
