"""RoPE re-encoding: the time each attended key is rotated at.

Keys are stored un-roped with their own time (a frame's index, a merged block's time, an
episode's mean frame). Queries always sit at their absolute frame index; a policy's
RoPE mode decides the time of every key of a query frame's key set:

* ``absolute``     — every key at its own time (Self Forcing).
* ``window_clamp`` — Pyramid Forcing's dynamic RoPE (``rope.py`` ``map_sink_time`` with
  ``window_clamp``; ``adaptive_cache.py`` ``_build_readout_spec``): sinks and strided /
  cyclic entries (``Key.anchor``) at the query frame's *sink time*
  ``max(0, t - clamp(t, clamp_min, clamp_max))``; everything else at its own time.
* ``window_shift`` — ours: the ``window`` frames ending at the chunk's last frame are the
  visible range; sinks sit at its start, every other history key is clamped to no earlier
  than right after the sinks, the chunk keeps its place.
* ``compact``      — head-wise re-encoding: the retained history of a head is renumbered
  1, 2, … in time order right before the chunk (spread evenly over the window when more
  entries are kept than fit).

RoPE is relative, so only differences matter: placing queries at their absolute index
and shifting the keys accordingly computes exactly what placing the window at 0 does.
While nothing has been evicted and the video fits the window, all modes agree.

:func:`key_times` computes a key set's times on the host (plain Python: the frame-index
rules, once per chunk); :func:`map_times` is the same rule on tensors, for the episodic
memory, whose size and times live on the device. A test holds the two together.
"""

from __future__ import annotations

import torch

from .errors import PolicyError


def sink_time(t: int, clamp_min: int, clamp_max: int) -> int:
    """Pyramid Forcing's ``map_sink_time`` in ``window_clamp`` mode for query frame ``t``."""
    return max(0, t - min(max(t, clamp_min), clamp_max))


def key_times(mode: str, own: list[float], *, is_chunk: list[bool], is_sink: list[bool], is_anchor: list[bool],
              chunk_start: int, frames: int, query_frame: int, window: int, clamp_min: int,
              clamp_max: int) -> list[float]:
    """RoPE times of a key set whose entries are all known on the host (see :func:`map_times`)."""
    own = [float(t) for t in own]
    if mode == "absolute":
        return own
    if mode == "window_clamp":
        st = float(sink_time(query_frame, clamp_min, clamp_max))
        return [st if a else t for t, a in zip(own, is_anchor)]
    hist = [not c for c in is_chunk]
    if mode == "window_shift":
        low = max(0, chunk_start + frames - window)
        if low == 0:
            return own
        n_sinks = sum(1 for s, h in zip(is_sink, hist) if s and h)
        out, i = [], 0
        for t, s, h in zip(own, is_sink, hist):
            if h and s:
                out.append(float(low + i))
                i += 1
            elif h:
                out.append(max(t, float(low + n_sinks)))
            else:
                out.append(t)
        return out
    if mode == "compact":
        room = window - frames
        if room < 0:
            raise PolicyError(f"a chunk of {frames} frames does not fit the RoPE window of {window}")
        order = sorted((i for i in range(len(own)) if hist[i]), key=lambda i: (own[i], i))
        n = len(order)
        rank = {i: r for r, i in enumerate(order)}
        out = list(own)
        for i, r in rank.items():
            pos = float(r) - n if n <= room else (room - 1) * r / max(n - 1, 1) - room
            out[i] = pos + chunk_start
        return out
    raise PolicyError(f"unknown RoPE mode {mode!r}")


def map_times(mode: str, own: torch.Tensor, *, is_chunk: torch.Tensor, is_sink: torch.Tensor,
              is_anchor: torch.Tensor, valid: torch.Tensor | None, chunk_start: int, frames: int,
              query_frame: int, window: int, clamp_min: int, clamp_max: int) -> torch.Tensor:
    """RoPE times of a key set (``own``: ``[..., E]`` own times; flags ``[E]`` or ``[..., E]``;
    ``valid``: which entries exist, None for all). Returns a tensor shaped like ``own``."""
    own = own.to(torch.float64)
    if mode == "absolute":
        return own
    if mode == "window_clamp":
        st = float(sink_time(query_frame, clamp_min, clamp_max))
        return torch.where(is_anchor, torch.full_like(own, st), own)
    hist = ~is_chunk if valid is None else (~is_chunk & valid)
    if mode == "window_shift":
        low = max(0, chunk_start + frames - window)
        if low == 0:
            return own
        sinks = (is_sink & hist).to(torch.float64)
        sink_rank = torch.cumsum(sinks, dim=-1) - 1  # i-th sink, in key order
        n_sinks = sinks.sum(dim=-1, keepdim=True)
        shifted = torch.where(is_sink, low + sink_rank, torch.maximum(own, low + n_sinks))
        return torch.where(hist, shifted, own)
    if mode == "compact":
        room = window - frames
        if room < 0:
            raise PolicyError(f"a chunk of {frames} frames does not fit the RoPE window of {window}")
        h = hist.to(torch.float64)
        n = h.sum(dim=-1, keepdim=True)
        # rank = how many valid history keys come before this one in time (ties: key order)
        e = own.shape[-1]
        idx = torch.arange(e, device=own.device)
        earlier = (own.unsqueeze(-1) < own.unsqueeze(-2)) | (
            (own.unsqueeze(-1) == own.unsqueeze(-2)) & (idx.unsqueeze(-1) < idx.unsqueeze(-2)))
        rank = (earlier.to(torch.float64) * h.unsqueeze(-1)).sum(dim=-2)
        fits = n <= room
        start = torch.where(fits, n, torch.full_like(n, float(room)))
        spread = (room - 1) * rank / torch.clamp(n - 1, min=1)
        pos = torch.where(fits, rank, spread) - start + chunk_start
        return torch.where(hist, pos, own)
    raise PolicyError(f"unknown RoPE mode {mode!r}")
