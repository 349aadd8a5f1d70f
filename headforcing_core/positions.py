"""RoPE re-encoding: the time index each retained entry (and the query) is rotated at.

Keys are stored un-roped with their absolute frame time; before every chunk a
head group's entries are given the time indices its policy's mode prescribes:

* ``absolute``     — entries and queries at their absolute frame index (Self Forcing).
* ``window_clamp`` — Pyramid Forcing's dynamic RoPE, made exact: the positions
  visible to a chunk are the ``window`` frames ending at the chunk's last frame.
  Sink entries sit at the start of that window, every other entry is clamped to
  no earlier than right after the sinks, and the query keeps its place at the
  end. Everything is then shifted so the window starts at 0 (RoPE is relative,
  so the shift changes nothing but keeps numbers inside the trained table).
* ``compact``      — head-wise re-encoding: a head's retained entries are
  renumbered 0, 1, 2, … in time order and the current chunk follows them. If a
  head keeps more entries than fit, they are spread evenly over the window.

While nothing has been evicted and the video is inside the window, all three
modes give the absolute positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PolicyError


@dataclass(frozen=True)
class EntryTime:
    """An entry's absolute time and whether it is a sink frame."""

    time: float
    sink: bool = False


def map_times(mode: str, entries: list[EntryTime], chunk_start: int, frames: int,
              window: int) -> tuple[list[float], list[float]]:
    """Return (entry times, query times) for one head group and one chunk."""
    queries = [float(chunk_start + j) for j in range(frames)]
    if mode == "absolute":
        return [e.time for e in entries], queries
    if mode == "window_clamp":
        low = max(0, chunk_start + frames - window)
        if low == 0:
            return [e.time for e in entries], queries
        sinks = [e for e in entries if e.sink]
        after_sinks = low + len(sinks)
        out, sink_i = [], 0
        for e in entries:
            if e.sink:
                out.append(float(low + sink_i))
                sink_i += 1
            else:
                out.append(max(e.time, float(after_sinks)))
        return [t - low for t in out], [q - low for q in queries]
    if mode == "compact":
        n = len(entries)
        room = window - frames
        if room < 0:
            raise PolicyError(f"a chunk of {frames} frames does not fit the RoPE window of {window}")
        order = sorted(range(n), key=lambda i: entries[i].time)
        rank = [0.0] * n
        if n <= room:
            for r, i in enumerate(order):
                rank[i] = float(r)
            start = float(n)
        else:  # more entries than room: spread evenly over [0, room-1]
            span = max(room - 1, 0)
            for r, i in enumerate(order):
                rank[i] = span * r / max(n - 1, 1)
            start = float(room)
        return rank, [start + j for j in range(frames)]
    raise PolicyError(f"unknown RoPE mode {mode!r}")
