"""An independent frame-level restatement of Pyramid Forcing's key sets (no code shared with the pack).

Written from a reading of IF-LAB-PKU/Pyramid-Forcing (Apache-2.0), its Python
``AdaptiveKVCache`` path with ``configs/pyramid-forcing.yaml`` (see docs/pyramid_forcing.md
for the citations). Closed forms, where the pack's tracker simulates stores incrementally:

* sinks: frames ``[0, min(S, first chunk))`` (``_capture_sink_if_needed`` only runs when
  ``current_start == 0``), rotated at the sink time ``max(0, t - clamp(t, 18, 21))``;
* dynamic ("recent") store: the newest ``R`` non-sink frames up to the chunk's last frame;
  Anchor heads (stable-stride policy) also keep the first non-sink frame forever;
  absolute times;
* middles, fed with every committed frame on the clean pass before its readout: the frames
  committed before the chunk (noisy passes) or through its last frame (clean pass);
  stride: multiples of the interval, newest ``cap``; cyclic: frames of the query frame's
  phase, newest ``cap``; merge: completed aligned blocks ``[n·b, n·b + n - 1]``, newest
  ``cap``, at time ``(first + last) // 2``; visible when newer than frame 0 and older than
  ``t - R + 1``. Stride / cyclic entries at the sink time, blocks at their own time.

``trace(head, s, f, t, pass_, f0)`` returns ``[(kind, id, rope_time)]`` sorted, with kind in
``sink``, ``recent``, ``middle`` (frames) and ``block``.
"""

from __future__ import annotations

DEFAULTS = {  # configs/pyramid-forcing.yaml: sink / recent / middle per label
    "anchor": dict(S=3, R=4, kind="stride", every=6, cap=4, stable=True),
    "wave": dict(S=1, R=4, kind="cyclic", every=6, cap=4, stable=False),
    "veil": dict(S=3, R=4, kind="merge", patch=2, cap=4, stable=False),
}


def sync(t: int, lo: int = 18, hi: int = 21) -> int:
    return max(0, t - min(max(t, lo), hi))


def trace(head: str, s: int, f: int, t: int, pass_: str, f0: int, cfg: dict | None = None) -> list[tuple]:
    c = dict(DEFAULTS[head], **(cfg or {}))
    S, R = c["S"], c["R"]
    sinks = list(range(min(S, f0)))
    last = s + f - 1
    nonsink = [x for x in range(len(sinks), last + 1)]
    dyn = nonsink[-R:]
    if c["stable"] and nonsink:
        dyn = sorted(set(dyn) | {nonsink[0]})
    out = [("sink", x, sync(t)) for x in sinks] + [("recent", x, x) for x in dyn]
    cmax = last if pass_ == "clean" else s - 1
    lo_excl, hi_excl = (0 if S >= 1 else -1), t - R + 1
    if c["kind"] == "stride":
        store = [x for x in range(0, cmax + 1) if x % c["every"] == 0][-c["cap"]:]
        out += [("middle", x, sync(t)) for x in store if lo_excl < x < hi_excl]
    elif c["kind"] == "cyclic":
        store = [x for x in range(0, cmax + 1) if x % c["every"] == t % c["every"]][-c["cap"]:]
        out += [("middle", x, sync(t)) for x in store if lo_excl < x < hi_excl]
    else:
        n = c["patch"] ** 2
        done = [b for b in range(0, (cmax + 1) // n)][-c["cap"]:]
        out += [("block", b, (n * b + n * b + n - 1) // 2) for b in done if n * b > lo_excl and n * b + n - 1 < hi_excl]
    return sorted(out)
