"""Attention backends for head groups with different retained key sets.

A layer's heads are split into *groups*: heads whose policy keeps the same
entries at the same positions. Each group is one dense problem (queries of the
group's heads against that group's keys). Backends take the list of groups of a
layer and return each group's output:

* ``reference``   — per head, explicit softmax in float32/float64. For tests.
* ``grouped``     — one ``scaled_dot_product_attention`` call per group (the
                    common case: a few groups per layer, exact, no special kernel).
* ``padded``      — every head of every group in one SDPA call, keys padded to
                    the longest group and masked (a portable ragged path).
* ``flash_varlen``— flash-attn's ``flash_attn_varlen_func`` with (batch, head)
                    folded into the sequence axis, so every head has its own key
                    length. Only on CUDA with fp16/bf16 and flash-attn installed.

``select_backend("auto", …)`` picks ``flash_varlen`` when it can run, else
``grouped``, and logs its choice once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("headforcing")


@dataclass
class GroupProblem:
    """One dense attention problem: ``q [B, S, Hg, D]`` against ``k, v [B, L, Hg, D]`` (RoPE applied)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


Backend = Callable[[list[GroupProblem]], list[torch.Tensor]]


def reference_attention(groups: list[GroupProblem]) -> list[torch.Tensor]:
    outs = []
    for g in groups:
        compute = torch.float64 if g.q.dtype == torch.float64 else torch.float32
        scale = 1.0 / math.sqrt(g.q.shape[-1])
        heads = []
        for h in range(g.q.shape[2]):
            q = g.q[:, :, h].to(compute)
            k = g.k[:, :, h].to(compute)
            v = g.v[:, :, h].to(compute)
            w = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1)
            heads.append(w @ v)
        outs.append(torch.stack(heads, dim=2).to(g.q.dtype))
    return outs


def grouped_attention(groups: list[GroupProblem]) -> list[torch.Tensor]:
    outs = []
    for g in groups:
        o = F.scaled_dot_product_attention(g.q.transpose(1, 2), g.k.transpose(1, 2), g.v.transpose(1, 2))
        outs.append(o.transpose(1, 2))
    return outs


def padded_attention(groups: list[GroupProblem]) -> list[torch.Tensor]:
    if len(groups) == 1:
        return grouped_attention(groups)
    b, s, _, d = groups[0].q.shape
    lmax = max(g.k.shape[1] for g in groups)
    qs, ks, vs, masks = [], [], [], []
    for g in groups:
        hg, length = g.q.shape[2], g.k.shape[1]
        qs.append(g.q.transpose(1, 2))
        pad = (0, 0, 0, lmax - length)
        ks.append(F.pad(g.k.transpose(1, 2), pad))
        vs.append(F.pad(g.v.transpose(1, 2), pad))
        m = torch.zeros(hg, 1, lmax, dtype=torch.bool, device=g.q.device)
        m[..., :length] = True
        masks.append(m)
    out = F.scaled_dot_product_attention(torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1),
                                         attn_mask=torch.cat(masks, 0).unsqueeze(0))
    return [o.transpose(1, 2) for o in out.split([g.q.shape[2] for g in groups], dim=1)]


def _flash_varlen_fn():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore
    except Exception:  # not installed, or built for another torch
        return None
    return flash_attn_varlen_func


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_varlen_fn() is not None


def flash_varlen_attention(groups: list[GroupProblem]) -> list[torch.Tensor]:
    fn = _flash_varlen_fn()
    if fn is None:
        raise RuntimeError("flash-attn is not importable; use the 'grouped' or 'padded' backend")
    b, s, _, d = groups[0].q.shape
    dev = groups[0].q.device
    q_parts, k_parts, v_parts, k_lens = [], [], [], []
    for g in groups:
        hg, length = g.q.shape[2], g.k.shape[1]
        # fold (batch, head) into independent sequences with one head each
        q_parts.append(g.q.permute(0, 2, 1, 3).reshape(b * hg * s, 1, d))
        k_parts.append(g.k.permute(0, 2, 1, 3).reshape(b * hg * length, 1, d))
        v_parts.append(g.v.permute(0, 2, 1, 3).reshape(b * hg * length, 1, d))
        k_lens += [length] * (b * hg)
    n_seq = len(k_lens)
    cu_q = torch.arange(0, (n_seq + 1) * s, s, dtype=torch.int32, device=dev)
    cu_k = torch.zeros(n_seq + 1, dtype=torch.int32, device=dev)
    cu_k[1:] = torch.tensor(k_lens, dtype=torch.int32, device=dev).cumsum(0)
    out = fn(torch.cat(q_parts), torch.cat(k_parts), torch.cat(v_parts), cu_q, cu_k, s, max(k_lens))
    outs, offset = [], 0
    for g in groups:
        hg = g.q.shape[2]
        n = b * hg * s
        outs.append(out[offset:offset + n].reshape(b, hg, s, d).permute(0, 2, 1, 3))
        offset += n
    return outs


BACKENDS: dict[str, Backend] = {
    "reference": reference_attention,
    "grouped": grouped_attention,
    "padded": padded_attention,
    "flash_varlen": flash_varlen_attention,
}

_announced: set[str] = set()


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Backend]:
    """Resolve ``name`` (``auto`` or a key of :data:`BACKENDS`) and log the choice once."""
    if name == "auto":
        name = "flash_varlen" if flash_varlen_available(device, dtype) else "grouped"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name == "flash_varlen" and not flash_varlen_available(device, dtype):
        raise ValueError("the flash_varlen backend needs flash-attn on a CUDA device with fp16/bf16 tensors")
    if name not in _announced:
        _announced.add(name)
        log.info("headforcing: attention backend %s (%s, %s)", name, device.type, str(dtype).replace("torch.", ""))
    return name, BACKENDS[name]
