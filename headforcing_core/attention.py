"""Attention backends for one layer's planned sequences.

The plan (:mod:`headforcing_core.plan`) folds a layer's heads — and, when key sets differ
by query frame, its query frames — into *sequences*: queries ``q [B, NS, Tq, D]`` against
keys ``k``/``v`` ``[B, NS, L, D]`` where sequence ``i`` attends its first ``lengths[i]``
keys (the rest is padding). A :class:`LayerProblem` carries that plus the host-known
*runs* (consecutive sequences of one length) and, where lengths are only known on the
device (episodic memory), a boolean key mask. Backends:

* ``reference``    — per sequence, explicit softmax in float32/float64. For tests.
* ``padded``       — one ``scaled_dot_product_attention`` call for the whole layer, padding
                     masked (portable; the fewest launches).
* ``grouped``      — one SDPA call per run of equal key length, each on its exact keys
                     (no padding computed; a mask only where lengths live on the device).
* ``flash_varlen`` — flash-attn's ``flash_attn_varlen_func``: every sequence packed back to
                     back on the device (no host sync) and one call per layer. CUDA,
                     fp16/bf16, flash-attn installed.

``select_backend("auto", …)`` picks ``flash_varlen`` when it can run and ``padded`` otherwise (on
an H200 it matched or beat ``grouped`` for every preset: docs/benchmarks.md), and logs its choice once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("headforcing")


@dataclass(frozen=True)
class Run:
    """Sequences ``[first, end)`` of a layer that all attend keys ``[start, start + length)`` (``masked``:
    lengths vary on the device; ``length`` is then their upper bound)."""

    first: int
    end: int
    length: int
    masked: bool = False
    start: int = 0


@dataclass
class LayerProblem:
    """One layer's attention: ``q [B, NS, Tq, D]``, ``k``/``v`` ``[B, NS, L, D]`` (RoPE applied; the
    sequence axis may be split in two, ``[B, H, J, …]``, when each head has one sequence per query frame).

    ``mask``: an additive bias broadcastable to ``[B, NS, Tq, L]`` (0 = attend, -inf = padding) or None
    when every sequence attends all ``L`` keys; ``lengths``: ``[B or 1, NS]`` keys per sequence (device) — the same
    information as ``mask`` for backends that pack; ``runs``: the host-known grouping (grouped
    order only).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    lengths: torch.Tensor | None
    runs: tuple[Run, ...]
    starts: torch.Tensor | None = None  # [B or 1, NS] first key of each sequence (None: 0)


Backend = Callable[[LayerProblem], torch.Tensor]

# CUDA's masked SDPA kernels read the bias in 16-byte vectors: its rows (the key axis of the
# buffers, padded by the plan) and its first key must sit at a multiple of 8 elements.
KEY_ALIGN = 8


def reference_attention(p: LayerProblem) -> torch.Tensor:
    compute = torch.float64 if p.q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(p.q.shape[-1])
    logits = torch.einsum("...qd,...kd->...qk", p.q.to(compute), p.k.to(compute)) * scale
    if p.mask is not None:
        logits = logits + p.mask.to(compute)
    w = torch.softmax(logits, dim=-1)
    return torch.einsum("...qk,...kd->...qd", w, p.v.to(compute)).to(p.q.dtype)


def padded_attention(p: LayerProblem) -> torch.Tensor:
    return F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=p.mask)


def grouped_attention(p: LayerProblem) -> torch.Tensor:
    if len(p.runs) == 1 and not p.runs[0].masked:
        r = p.runs[0]
        keys = slice(r.start, r.start + r.length)
        return F.scaled_dot_product_attention(p.q, p.k[:, :, keys], p.v[:, :, keys])
    outs = []
    for r in p.runs:
        sl, keys = slice(r.first, r.end), slice(r.start, r.start + r.length)
        mask = None
        if r.masked and p.mask is not None:
            # widen to aligned keys (see KEY_ALIGN); the mask hides the extra ones, so this is exact
            lo = r.start - r.start % KEY_ALIGN
            keys = slice(lo, min(p.k.shape[2], -(-(r.start + r.length) // KEY_ALIGN) * KEY_ALIGN))
            mask = p.mask[:, sl, :, keys]
        outs.append(F.scaled_dot_product_attention(p.q[:, sl], p.k[:, sl, keys], p.v[:, sl, keys], attn_mask=mask))
    return torch.cat(outs, dim=1)


def _flash_varlen_fn():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore
    except Exception:  # not installed, or built for another torch
        return None
    return flash_attn_varlen_func


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_varlen_fn() is not None


def flash_varlen_attention(p: LayerProblem) -> torch.Tensor:
    """Pack every sequence's valid keys back to back (positions computed on the device) and make one
    varlen call with (batch, sequence) folded into the varlen batch."""
    fn = _flash_varlen_fn()
    if fn is None:
        raise RuntimeError("flash-attn is not importable; use the 'grouped' or 'padded' backend")
    b, ns, tq, d = p.q.shape
    L = p.k.shape[2]
    dev = p.q.device
    lengths = (p.lengths if p.lengths is not None else torch.full((1, ns), L, device=dev)).expand(b, ns)
    starts = (p.starts if p.starts is not None else torch.zeros((1, ns), dtype=torch.int64, device=dev)).expand(b, ns)
    lengths = lengths.reshape(-1).to(torch.int32)
    starts = starts.reshape(-1)
    n_seq = b * ns
    cu_k = torch.zeros(n_seq + 1, dtype=torch.int32, device=dev)
    cu_k[1:] = torch.cumsum(lengths, 0)
    pos = torch.arange(L, device=dev)
    rel = pos.unsqueeze(0) - starts.unsqueeze(1)  # key index within its sequence's window
    valid = (rel >= 0) & (rel < lengths.unsqueeze(1))  # [n_seq, L]
    dump = n_seq * L  # padding keys go past every real sequence: ignored by cu_seqlens
    dest = torch.where(valid, cu_k[:-1].unsqueeze(1).long() + rel, dump + pos)
    k_flat = p.k.new_zeros(dump + L, 1, d).index_copy_(0, dest.reshape(-1), p.k.reshape(-1, 1, d))
    v_flat = p.v.new_zeros(dump + L, 1, d).index_copy_(0, dest.reshape(-1), p.v.reshape(-1, 1, d))
    cu_q = torch.arange(0, (n_seq + 1) * tq, tq, dtype=torch.int32, device=dev)
    out = fn(p.q.reshape(-1, 1, d), k_flat, v_flat, cu_q, cu_k, tq, L)
    return out.reshape(b, ns, tq, d)


BACKENDS: dict[str, Backend] = {
    "reference": reference_attention,
    "padded": padded_attention,
    "grouped": grouped_attention,
    "flash_varlen": flash_varlen_attention,
}

_announced: set[str] = set()


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Backend]:
    """Resolve ``name`` (``auto`` or a key of :data:`BACKENDS`) and log the choice once."""
    if name == "auto":
        name = "flash_varlen" if flash_varlen_available(device, dtype) else "padded"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name == "flash_varlen" and not flash_varlen_available(device, dtype):
        raise ValueError("the flash_varlen backend needs flash-attn on a CUDA device with fp16/bf16 tensors")
    if name not in _announced:
        _announced.add(name)
        log.info("headforcing: attention backend %s (%s, %s)", name, device.type, str(dtype).replace("torch.", ""))
    return name, BACKENDS[name]
