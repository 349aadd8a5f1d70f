"""Attention backends for one layer's planned sequences.

The plan (:mod:`headforcing_core.plan`) folds a layer's heads — and, when key sets differ
by query frame, its query frames — into *sequences*: queries ``q [B, NS, Tq, D]`` against
keys ``k``/``v`` ``[B, NS, L, D]`` where sequence ``i`` attends keys ``[starts[i], starts[i] +
lengths[i])`` (the rest is padding). A :class:`LayerProblem` carries that plus the host-known
*runs* (consecutive sequences of one window) and the same windows as an additive key mask.
Lengths may live only on the device (episodic memory): no backend reads them on the host.
Backends:

* ``reference``    — per sequence, explicit softmax in float32/float64. For tests.
* ``padded``       — one ``scaled_dot_product_attention`` call for the whole layer, padding
                     masked (portable; the fewest launches; SDPA's masked kernels).
* ``grouped``      — one SDPA call per run of equal key window, each on its exact keys
                     (no padding computed; a mask only where lengths live on the device).
* ``torch_varlen`` — PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2
                     built into torch ≥ 2.9): one unmasked call per layer, (batch, sequence)
                     folded into the varlen batch; with ``seqused_k`` the planned buffer is
                     read in place. CUDA, fp16/bf16, no extra package.
* ``flash_varlen`` — flash-attn's ``flash_attn_varlen_func``: every sequence packed back to
                     back on the device (no host sync) and one call per layer. CUDA,
                     fp16/bf16, flash-attn installed.

``select_backend("auto", …)`` picks ``flash_varlen`` when flash-attn is installed, else
``torch_varlen`` when this torch's varlen kernel passes a one-time probe on the device, else
``padded`` (on an H200 ``padded`` matched or beat ``grouped`` for every preset:
docs/benchmarks.md), and logs its choice once. The varlen backends hand a layer without
per-sequence lengths (a prerotated pool read in place) to SDPA, as ``padded`` does.
"""

from __future__ import annotations

import functools
import inspect
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


def bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias: 0 where ``keep``, -inf elsewhere (a plan makes it once per chunk, so no
    model call converts a boolean mask)."""
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.full((), float("-inf"), dtype=dtype, device=keep.device))


def window_bias(starts: torch.Tensor, lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``[..., 1, width]`` bias letting each sequence attend keys ``[start, start + length)`` (the mask
    form of a :class:`LayerProblem`'s ``starts`` / ``lengths``)."""
    pos = torch.arange(width, device=lengths.device)
    keep = (pos >= starts.unsqueeze(-1)) & (pos < (starts + lengths).unsqueeze(-1))
    return bias(keep, dtype).unsqueeze(-2)


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


@functools.lru_cache(maxsize=None)  # a failed import is not cached by Python; look once per process
def _flash_varlen_fn():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore
    except Exception:  # not installed, or built for another torch
        return None
    return flash_attn_varlen_func


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_varlen_fn() is not None


def _sequence_bounds(p: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts, lengths)`` of every (batch row, sequence), flattened to ``[B·NS]`` (device tensors)."""
    b, ns = p.q.shape[:2]
    dev, L = p.q.device, p.k.shape[2]
    lengths = p.lengths if p.lengths is not None else torch.full((1, ns), L, dtype=torch.int64, device=dev)
    starts = p.starts if p.starts is not None else torch.zeros((1, ns), dtype=torch.int64, device=dev)
    return starts.expand(b, ns).reshape(-1), lengths.expand(b, ns).reshape(-1)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    """``[0, l0, l0 + l1, …]`` as int32 (the varlen kernels' ``cu_seqlens``)."""
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def _query_offsets(p: LayerProblem) -> torch.Tensor:
    b, ns, tq = p.q.shape[:3]
    return torch.arange(0, (b * ns + 1) * tq, tq, dtype=torch.int32, device=p.q.device)


def _packed_keys(p: LayerProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sequence's attended keys and values packed back to back, ``[total, 1, D]``, and their
    ``cu_seqlens`` — destinations computed on the device, so no host synchronisation."""
    b, ns, _, d = p.q.shape
    L = p.k.shape[2]
    starts, lengths = _sequence_bounds(p)
    cu_k = _cumulative(lengths)
    pos = torch.arange(L, device=p.q.device)
    rel = pos.unsqueeze(0) - starts.unsqueeze(1)  # key index within its sequence's window
    valid = (rel >= 0) & (rel < lengths.unsqueeze(1))  # [B·NS, L]
    dump = b * ns * L  # padding keys go past every real sequence: ignored by cu_seqlens
    dest = torch.where(valid, cu_k[:-1].unsqueeze(1).long() + rel, dump + pos).reshape(-1)
    # no fill: the kernels read only [cu_k[0], cu_k[-1]), which the copy writes whole
    k_flat = p.k.new_empty(dump + L, 1, d).index_copy_(0, dest, p.k.reshape(-1, 1, d))
    v_flat = p.v.new_empty(dump + L, 1, d).index_copy_(0, dest, p.v.reshape(-1, 1, d))
    return k_flat, v_flat, cu_k


def flash_varlen_attention(p: LayerProblem) -> torch.Tensor:
    """Pack every sequence's valid keys back to back (positions computed on the device) and make one
    varlen call with (batch, sequence) folded into the varlen batch."""
    fn = _flash_varlen_fn()
    if fn is None:
        raise RuntimeError("flash-attn is not importable; use the 'grouped' or 'padded' backend")
    if p.lengths is None:  # a pool read in place (every key, or pages picked by a mask): SDPA's case
        return padded_attention(p)
    b, ns, tq, d = p.q.shape
    k_flat, v_flat, cu_k = _packed_keys(p)
    out = fn(p.q.reshape(-1, 1, d), k_flat, v_flat, _query_offsets(p), cu_k, tq, p.k.shape[2])
    return out.reshape(b, ns, tq, d)


# ---- PyTorch's own varlen kernel (torch.nn.attention.varlen, FlashAttention-2 inside torch) -------


@functools.lru_cache(maxsize=None)  # the signature is read once, not per layer call
def _torch_varlen_fn():
    """``(varlen_attn, takes_seqused_k)`` of this torch, or ``(None, False)`` where it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # torch older than 2.9
        return None, False
    return varlen_attn, "seqused_k" in inspect.signature(varlen_attn).parameters


@functools.lru_cache(maxsize=None)
def _torch_varlen_works(device: str) -> bool:
    """One tiny call against SDPA on ``device``, once per process: a torch built without its flash
    kernels (or a GPU they do not support) makes ``auto`` fall back instead of failing mid-run."""
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 16, 64, generator=g).to(device, torch.bfloat16) for _ in range(3))
        starts, lengths = torch.tensor([[0, 3]], device=device), torch.tensor([[16, 9]], device=device)
        p = LayerProblem(q, k, v, window_bias(starts, lengths, 16, torch.bfloat16), lengths, (Run(0, 2, 16, True),),
                         starts)
        got = torch_varlen_attention(p).float()
        want = reference_attention(p).float()
        return bool(torch.allclose(got, want, atol=3e-2, rtol=3e-2))
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        log.info("headforcing: torch's varlen attention is not usable here (%s: %s)", type(e).__name__, e)
        return False


def torch_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _torch_varlen_fn()[0] is not None
            and _torch_varlen_works(str(device)))


def torch_varlen_attention(p: LayerProblem) -> torch.Tensor:
    """One ``varlen_attn`` call per layer with (batch, sequence) folded into the varlen batch.

    Where the kernel takes ``seqused_k`` (PyTorch ≥ 2.12) the planned buffer is read in place:
    sequence ``i`` starts at ``i·L + start_i`` of the flattened ``[B·NS·L]`` keys and uses its first
    ``length_i`` — no copy, no mask, and the lengths may live on the device (episodic memory).
    Older kernels get the keys packed back to back (as ``flash_varlen``). A layer without lengths (a
    prerotated pool read in place: every key, or pages picked by a mask) goes to SDPA as in ``padded``."""
    if p.lengths is None:
        return padded_attention(p)
    fn, takes_seqused = _torch_varlen_fn()
    if fn is None:
        raise RuntimeError("this torch has no torch.nn.attention.varlen; use the 'padded' backend")
    b, ns, tq, d = p.q.shape
    L = p.k.shape[2]
    q = p.q.reshape(-1, 1, d)
    if takes_seqused:
        starts, lengths = _sequence_bounds(p)
        offsets = torch.arange(0, b * ns * L, L, device=q.device) + starts
        cu_k = torch.cat([offsets, offsets.new_full((1,), b * ns * L)]).to(torch.int32)
        out = fn(q, p.k.reshape(-1, 1, d), p.v.reshape(-1, 1, d), _query_offsets(p), cu_k, tq, L,
                 seqused_k=lengths.to(torch.int32))
    else:
        k_flat, v_flat, cu_k = _packed_keys(p)
        out = fn(q, k_flat, v_flat, _query_offsets(p), cu_k, tq, L)
    return out.reshape(b, ns, tq, d)


BACKENDS: dict[str, Backend] = {
    "reference": reference_attention,
    "padded": padded_attention,
    "grouped": grouped_attention,
    "flash_varlen": flash_varlen_attention,
    "torch_varlen": torch_varlen_attention,
}

_announced: set[str] = set()


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Backend]:
    """Resolve ``name`` (``auto`` or a key of :data:`BACKENDS`) and log the choice once."""
    if name == "auto":
        name = ("flash_varlen" if flash_varlen_available(device, dtype)
                else "torch_varlen" if torch_varlen_available(device, dtype) else "padded")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name == "flash_varlen" and not flash_varlen_available(device, dtype):
        raise ValueError("the flash_varlen backend needs flash-attn on a CUDA device with fp16/bf16 tensors")
    if name == "torch_varlen" and not torch_varlen_available(device, dtype):
        raise ValueError("the torch_varlen backend needs torch.nn.attention.varlen (PyTorch ≥ 2.9) with its flash "
                         "kernels on a CUDA device and fp16/bf16 tensors")
    if name not in _announced:
        _announced.add(name)
        log.info("headforcing: attention backend %s (%s, %s)", name, device.type, str(dtype).replace("torch.", ""))
    return name, BACKENDS[name]
