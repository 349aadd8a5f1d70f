"""The varlen kernels' documented contract, restated in float64 for CPU tests.

``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` and
``torch.nn.attention.varlen.varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
seqused_k=None)`` take ``[total, heads, D]`` tensors: sequence ``i`` is queries
``cu_q[i]:cu_q[i+1]`` against keys ``cu_k[i]:cu_k[i+1]`` — or, with ``seqused_k``, only the first
``seqused_k[i]`` of them. Both kernels run on CUDA only, so the CPU tests hand this function to
the backends in their place; the GPU tests compare the real kernels with the reference backend.
It checks what the kernels require of their arguments (int32 offsets that never decrease, the
maxima bounding every sequence's queries and used keys, used keys within their slot) so a layout the real kernel would
reject or misread fails here too.
"""

from __future__ import annotations

import torch

import headforcing_core.attention as attention


def varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, seqused_k=None, **unused):
    assert not unused, f"unexpected options {unused}"
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert query.dim() == key.dim() == value.dim() == 3 and key.shape == value.shape
    n = cu_q.numel() - 1
    assert cu_k.numel() == n + 1 and int(cu_q[0]) == 0 and int(cu_q[-1]) == query.shape[0]
    assert bool((cu_q[1:] >= cu_q[:-1]).all()) and bool((cu_k[1:] >= cu_k[:-1]).all())
    assert int(cu_k[-1]) <= key.shape[0]
    out = torch.zeros_like(query)
    scale = query.shape[-1] ** -0.5
    for i in range(n):
        q0, q1 = int(cu_q[i]), int(cu_q[i + 1])
        k0, k1 = int(cu_k[i]), int(cu_k[i + 1])
        if seqused_k is not None:  # the used keys, within the slot, are the sequence
            assert seqused_k.dtype == torch.int32 and 0 < int(seqused_k[i]) <= k1 - k0
            k1 = k0 + int(seqused_k[i])
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        q = query[q0:q1].double().transpose(0, 1)  # [heads, tq, D]
        k, v = key[k0:k1].double().transpose(0, 1), value[k0:k1].double().transpose(0, 1)
        w = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1)
        out[q0:q1] = (w @ v).transpose(0, 1).to(query.dtype)
    return out


def varlen_without_seqused(query, key, value, cu_q, cu_k, max_q, max_k):
    """The kernel of a torch whose ``varlen_attn`` does not take ``seqused_k`` (PyTorch 2.9–2.11)."""
    return varlen(query, key, value, cu_q, cu_k, max_q, max_k)


def install(monkeypatch, *, seqused: bool = True) -> None:
    """Make ``torch_varlen`` and ``flash_varlen`` run on the CPU with :func:`varlen` as their kernel."""
    monkeypatch.setattr(attention, "_torch_varlen_fn",
                        lambda: (varlen, True) if seqused else (varlen_without_seqused, False))
    monkeypatch.setattr(attention, "_flash_varlen_fn", lambda: varlen_without_seqused)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda device, dtype: True)
    monkeypatch.setattr(attention, "flash_varlen_available", lambda device, dtype: True)
