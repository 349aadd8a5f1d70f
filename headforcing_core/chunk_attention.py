"""Run the layers of one model call with a chunk's plan (the *run* half of :mod:`headforcing_core.plan`).

:class:`ChunkAttention` runs one model call. At each layer it **gathers** the layer's
history — keys and values, one index op over the cache's arena — into one scratch buffer
``[2, B, sequences, L, D]`` shared by every layer and every call of the chunk; **re-times**
the keys whose RoPE time is not their own (a complex multiply of their time channels: stored
keys are rotated at their own time); writes the chunk's rotated keys and values last; runs
the backend once; and on the clean pass writes the kept frames' K/V into the arena. Nothing
in the layer loop waits for the host, and no more than one layer's keys are ever copied.
"""

from __future__ import annotations

from typing import Callable

import torch

from .attention import Backend, LayerProblem
from .cache import HeadwiseKVCache
from .plan import ChunkPlan
from .rope import axis_pairs

Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class ChunkAttention:
    """The runner's self-attention for one model call of a planned chunk.

    ``pass_``: ``"noisy"`` or ``"clean"`` (which key windows apply; the clean pass also writes the
    chunk's kept frames into the cache). ``observer(layer, q, k, key_frames)`` — full-cache runs only —
    sees the rotated queries ``[B, S, H, D]``, the keys ``[B, H, L, D]`` and the frame of every key (head
    profiling).
    """

    def __init__(self, plan: ChunkPlan, cache: HeadwiseKVCache, backend: Backend, pass_: str = "noisy",
                 observer: Observer | None = None):
        self.plan, self.cache, self.backend, self.pass_ = plan, cache, backend, pass_
        self.observer = observer
        if not plan.prerotated:
            plan.bind()
            self._prepare_views()

    def _prepare_views(self) -> None:
        """Views of the scratch every layer call writes through (made once per model call, not per layer)."""
        plan, cache = self.plan, self.cache
        B, D, W, S = cache.batch, cache.head_dim, plan.width, plan.frames * plan.tokens
        H, J = cache.num_heads, plan.classes
        scratch = plan.scratch
        self.flat = scratch.view(2, -1, D)
        self.chunk_kv = scratch[:, :, :, W - S:]  # [2, B, NS, S, D]
        if J > 1:  # [2, B, H, J, S, D]: class 0 gets the rotation, the others a copy
            by_class = scratch.view(2, B, H, J, W, D)[:, :, :, :, W - S:]
            self.chunk_k0 = by_class[0, :, :, 0].transpose(1, 2)  # [B, S, H, D]
            self.chunk_k_rest = by_class[0, :, :, 1:]
            self.chunk_k0_to_rest = self.chunk_k0.transpose(1, 2).unsqueeze(2).expand_as(self.chunk_k_rest)
            self.chunk_v = by_class[1].permute(0, 3, 1, 2, 4)  # [B, S, H, J, D]
            self.queries_out = plan.query_buffer.transpose(1, 2)  # [B, S, H, D]
            self.queries = plan.query_buffer.view(B, H * J, S // J, D)  # one sequence per (head, query frame)
        else:
            self.chunk_k0 = self.chunk_kv[0].transpose(1, 2)  # [B, S, NS=H, D]
            self.chunk_v = self.chunk_kv[1].transpose(1, 2)
        self.timed = None
        if plan.span:
            pt = axis_pairs(D)[0]
            self.timed = scratch[0, :, :, :plan.span, :2 * pt]  # [B, NS, span, 2·pt]: the time channels
            self.compute = torch.float64 if cache.dtype == torch.float64 else torch.float32
            if self.timed.dtype == self.compute:  # re-timed in place: one complex multiply
                self.timed_complex = torch.view_as_complex(self.timed.unflatten(-1, (-1, 2)))
        self.token = torch.arange(plan.tokens, device=scratch.device)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan.prerotated:
            return self._in_place(layer, q, k, v)
        lv, p, rot = plan.layers[layer], self.pass_, plan.rotation
        b, s, h, d = q.shape
        J = plan.classes
        seq_row = plan.seq_row[layer]
        # ---- this layer's history: keys and values in one gather from the arena, re-timed ------------
        rows = plan.rows_table.index_select(1, seq_row).add_(plan.head_base[layer])  # [B, NS, W]
        torch.index_select(self.cache.kv_flat, 1, rows.view(-1), out=self.flat)
        del rows  # temporaries go as soon as they are used: they add to the call's peak
        if self.timed is not None:
            f = plan.factors[plan.factor_table.index_select(1, seq_row)]  # [B, NS, span, pt]
            if self.timed.dtype == self.compute:
                self.timed_complex.mul_(f)
            else:  # half precision: rotated in float32, rounded once
                x = self.timed.to(self.compute)
                torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(f)
                self.timed.copy_(x)
                del x
            del f
        # ---- the chunk's own keys and values, last in every sequence --------------------------------
        if plan.natural_chunk:
            rot.apply(k, out=self.chunk_k0)
            if J > 1:
                self.chunk_k_rest.copy_(self.chunk_k0_to_rest)
                self.chunk_v.copy_(v.unsqueeze(3))
            else:
                self.chunk_v.copy_(v)
        else:  # rotation variants or the grouped order: pick each sequence's rotation of the chunk
            k_all = rot.apply_all(k).permute(0, 1, 3, 2, 4).reshape(b, -1, s, d)  # [B, V·H, S, D]
            self.chunk_kv[0].copy_(k_all.index_select(1, plan.chunk_src[layer]))
            vt = v.transpose(1, 2)
            self.chunk_kv[1].copy_(vt.index_select(1, plan.v_src[layer]) if plan.v_src[layer] is not None
                                   else vt.unsqueeze(2).expand(-1, -1, J, -1, -1).reshape(b, -1, s, d))
        # ---- attention ------------------------------------------------------------------------------
        if J == 1:
            qs = rot.apply(q).transpose(1, 2)
        else:
            rot.apply(q, out=self.queries_out)
            qs = self.queries
        if plan.q_src[layer] is not None:
            qs = qs.index_select(1, plan.q_src[layer])
        out = self.backend(LayerProblem(qs, lv.k, lv.v, lv.mask[p], lv.lengths[p], lv.runs[p], lv.starts[p]))
        if plan.out_src[layer] is not None:
            out = out.index_select(1, plan.out_src[layer])
        if p == "clean":
            self._commit(layer, k, v)
        if J == 1:
            return out.transpose(1, 2)
        return out.view(b, h, s, d).transpose(1, 2)

    def _commit(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this layer's kept chunk frames into the pages the plan decided (after its attention read
        whatever those pages held before)."""
        plan = self.plan
        at = plan.commit_ranges[layer]
        if at is None:
            return
        dest, src = plan.commit_dest[:, at[0]:at[1]], plan.commit_src[:, at[0]:at[1]]
        tok = self.token
        if plan.commit_from_scratch:
            source = self.flat
        else:  # the chunk's K (rotated at its own frames) and V, [2, B·H·S, D]
            k0 = plan.rotation.apply(k).transpose(1, 2)
            source = torch.stack([k0, v.transpose(1, 2).to(k0.dtype)]).view(2, -1, k.shape[-1])
        src = (src.unsqueeze(-1) + tok).view(-1)
        self.cache.kv_flat.index_copy_(1, (dest.unsqueeze(-1) + tok).view(-1), source.index_select(1, src))

    def _in_place(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A pool read in place: write the chunk's pages (rotated keys), then attend the pool."""
        plan, lv, p = self.plan, self.plan.layers[layer], self.pass_
        rot = plan.rotation
        b, s, h, d = q.shape
        q_r = rot.apply(q)
        f = plan.frames
        lv.k_pages.index_copy_(2, plan.chunk_pages, rot.apply(k).view(b, f, s // f, h, d).permute(0, 3, 1, 2, 4))
        lv.v_pages.index_copy_(2, plan.chunk_pages, v.view(b, f, s // f, h, d).permute(0, 3, 1, 2, 4))
        if self.observer is not None:
            self.observer(layer, q_r, lv.k, plan.key_frames)
        out = self.backend(LayerProblem(q_r.transpose(1, 2), lv.k, lv.v, lv.mask[p], None, lv.runs[p]))
        return out.transpose(1, 2)
