"""The prompt schedule's text format: one ``length | prompt [| transition [N] [mode]] [| same noise]`` per line.

:func:`parse_schedule_text` turns a story written as text into :class:`ScheduleLine`\\ s (lengths in
seconds or latent frames, prompts still text: the node encodes them into a
:class:`~headforcing_core.prompts.PromptSchedule`); :meth:`ScheduleLine.text` and :func:`format_schedule_text`
write lines back (a recorded take, :mod:`headforcing_core.live`), so that parsing what was written gives
the same lines. Every parse error names the line number and its content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .geometry import FPS, MAX_LATENT_FRAMES, MAX_VIDEO_SECONDS, TIME_COMPRESSION
from .prompts import MAX_TRANSITION_FRAMES, RECACHE_MODES, TRANSITIONS, ScheduleError, shorten

SAME_NOISE = "same noise"  # the optional last field: no new noise draw (the line before's goes on)
LATENT_UNIT = "latent"  # "13 latent" (or "13 latent frames"): a length in latent frames
SYNTAX = "expected 'seconds | prompt' (optionally '| cut', '| recache N [mode]', '| blend N' or '| interpolate N')"


@dataclass(frozen=True)
class ScheduleLine:
    """One parsed line: its length (``seconds``, or ``frames`` latent frames: exactly one is set), prompt and
    the transition into it; ``same_noise``: it goes on with the noise draw of the line before."""

    line: int  # 1-based line number in the text
    seconds: float | None
    prompt: str
    transition: str = "cut"
    transition_frames: int = 0
    recache_mode: str | None = None
    frames: int | None = None
    same_noise: bool = False

    @property
    def video_seconds(self) -> float:
        """The line's length in seconds (latent frames at 4 per second)."""
        return self.seconds if self.seconds is not None else self.frames * TIME_COMPRESSION / FPS

    def length_keywords(self) -> dict:
        """``PromptSegment`` length keywords: ``{"seconds": s}`` or ``{"frames": n}``."""
        return {"seconds": self.seconds} if self.seconds is not None else {"frames": self.frames}

    def text(self) -> str:
        """The line as the format writes it (always with its transition, so no default applies)."""
        if "|" in self.prompt or "\n" in self.prompt or "\r" in self.prompt or not self.prompt.strip():
            raise ScheduleError(f"the prompt {shorten(self.prompt)!r} cannot be a schedule line (empty, or holds "
                                "'|' or a line break)")
        length = f"{self.seconds:g}" if self.seconds is not None else f"{self.frames} {LATENT_UNIT}"
        trans = self.transition
        if trans != "cut":
            trans += f" {self.transition_frames}" + (f" {self.recache_mode}" if self.recache_mode else "")
        return f"{length} | {self.prompt.strip()} | {trans}" + (f" | {SAME_NOISE}" if self.same_noise else "")


def length_text(frames: int, frames_per_block: int) -> dict:
    """Length keywords of a :class:`ScheduleLine` that resolves to exactly ``frames`` latent frames: seconds
    (4 latent frames a second) when ``frames`` is whole chunks of ``frames_per_block`` — seconds are rounded to
    whole chunks — else latent frames."""
    if frames % frames_per_block == 0:
        return {"seconds": frames * TIME_COMPRESSION / FPS, "frames": None}
    return {"seconds": None, "frames": int(frames)}


def format_schedule_text(lines: list[ScheduleLine], comments: list[str] = ()) -> str:
    """Schedule text of ``lines`` after ``# comment`` lines (what :func:`parse_schedule_text` reads back)."""
    head = [f"# {' '.join(c.split())}" for c in comments]
    return "\n".join(head + [line.text() for line in lines]) + "\n"


def _length(field: str, fail) -> tuple[float | None, int | None]:
    text = field.lower().strip()
    for unit in (LATENT_UNIT + " frames", LATENT_UNIT):
        if text.endswith(unit):
            number = text.removesuffix(unit).strip()
            try:
                frames = int(number)
            except ValueError:
                fail(f"{field!r} is not a whole number of latent frames")
            if frames < 1:
                fail(f"the length must be at least 1 latent frame, got {field!r}")
            if frames > MAX_LATENT_FRAMES:
                fail(f"{field!r} is longer than any video the sampler makes (at most {MAX_LATENT_FRAMES} latent "
                     "frames): shorten it")
            return None, frames
    sec_text = text.removesuffix("s").removesuffix("sec").strip()
    try:
        seconds = float(sec_text)
    except ValueError:
        fail(f"{field!r} is not a length in seconds")
    if not math.isfinite(seconds) or seconds <= 0:
        fail(f"the length must be a positive number of seconds, got {field!r}")
    if seconds > MAX_VIDEO_SECONDS:
        fail(f"{field!r} s is longer than any video the sampler makes (at most {MAX_VIDEO_SECONDS} s): shorten it")
    return seconds, None


def parse_schedule_text(text: str, default_transition: str = "cut", default_frames: int = 0) -> list[ScheduleLine]:
    """Parse a multi-line story, one segment per line::

        5 | a red fox runs through fresh snow
        4.5 | the fox stops and looks at the camera | blend 6
        6 | close-up of the fox's eyes | recache 3
        5 | the fox runs off | recache 12 longlive
        3 | the fox in a snowstorm | interpolate 4
        13 latent | the storm clears | cut | same noise
        # comment lines and blank lines are skipped

    The first field is the length: seconds (``5``, ``4.5``, ``5s``) or latent frames (``13 latent``); the
    second the prompt; an optional third the transition into this segment (``cut``, ``recache N [mode]``,
    ``blend N``: N in latent frames; ``interpolate N``: N in chunks; mode one of :data:`RECACHE_MODES`,
    else the policy's default), else ``default_transition`` with ``default_frames``; an optional fourth,
    ``same noise``, goes on with the line before's noise draw (what a recorded take writes for a switch
    made live). Errors name the line number and its content.
    """
    if default_transition not in TRANSITIONS:
        raise ScheduleError(f"unknown transition {default_transition!r}; choose one of {', '.join(TRANSITIONS)}")
    out = []
    for n, raw in enumerate(str(text).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def fail(why: str):
            raise ScheduleError(f"line {n} ({shorten(line, 60)!r}): {why}; {SYNTAX}")

        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 2:
            fail("no '|' between the length and the prompt")
        if len(parts) > 4:
            fail("too many '|' separators (a prompt cannot contain '|')")
        same_noise = False
        if len(parts) == 4:
            if " ".join(parts[3].lower().split()) != SAME_NOISE:
                fail(f"too many '|' separators: a prompt cannot contain '|', and after the transition only "
                     f"'| {SAME_NOISE}' may follow, not {parts[3]!r}")
            same_noise = True
            if not out:
                fail(f"'{SAME_NOISE}' goes on with the noise of the line before, and this is the first line")
        seconds, frames = _length(parts[0], fail)
        prompt = parts[1]
        if not prompt:
            fail("the prompt is empty")
        transition, count, mode = default_transition, default_frames, None
        if len(parts) >= 3:
            words = parts[2].lower().split()
            if len(words) == 3 and words[0] == "recache":
                mode = words.pop()
                if mode not in RECACHE_MODES:
                    fail(f"{mode!r} is not a recache mode ({', '.join(RECACHE_MODES)})")
            if not words or words[0] not in TRANSITIONS or len(words) > 2:
                fail(f"{parts[2]!r} is not a transition (cut, recache N [mode], blend N, interpolate N)")
            transition = words[0]
            count = 0
            if len(words) == 2:
                try:
                    count = int(words[1])
                except ValueError:
                    fail(f"{words[1]!r} is not a whole number of "
                         + ("chunks" if transition == "interpolate" else "latent frames"))
            elif transition != "cut":
                fail(f"{transition} needs a {'chunk' if transition == 'interpolate' else 'frame'} count, "
                     f"e.g. '{transition} {4 if transition == 'interpolate' else 3}'")
        if transition != "cut":
            if count < 1:
                fail(f"a {transition} transition needs at least 1 "
                     + ("chunk" if transition == "interpolate" else "latent frame"))
            if transition == "recache" and count > MAX_TRANSITION_FRAMES:
                fail(f"recache re-runs at most {MAX_TRANSITION_FRAMES} latent frames")
        else:
            count = 0
        out.append(ScheduleLine(n, seconds, prompt, transition, count, mode, frames, same_noise))
    if not out:
        raise ScheduleError("the schedule text has no segments; write one 'seconds | prompt' per line")
    total = sum(line.video_seconds for line in out)
    if total > MAX_VIDEO_SECONDS:
        raise ScheduleError(f"the lines add up to {total:g} s; the sampler makes at most {MAX_VIDEO_SECONDS} s of "
                            "video: shorten them")
    return out
