"""Plan / run split for head-wise attention.

Once per chunk, :func:`plan_chunk` decides for every layer and head group which
retained entries it attends to and at which RoPE positions (the *plan*). Every
denoising call of the chunk — four noisy steps and the clean pass — then runs
each layer with that plan through :class:`PlannedAttention`: gather the group's
history, append the chunk's own K/V, rotate, and hand all groups of the layer
to one attention backend. The clean pass also commits the chunk's raw K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention import Backend, GroupProblem
from .cache import Entry, HeadwiseKVCache
from .positions import EntryTime, map_times
from .rope import Rotary, spatial_positions


@dataclass
class GroupPlan:
    heads: list[int]
    all_heads: bool
    entries: list[Entry]
    entry_times: list[float]  # RoPE time of each entry
    query_times: list[float]  # RoPE time of each frame of the chunk
    key_rotary: Rotary  # history tokens followed by the chunk's tokens
    query_rotary: Rotary

    @property
    def attended_tokens(self) -> int:
        return sum(e.k.shape[1] for e in self.entries) + len(self.query_rotary)


@dataclass
class ChunkPlan:
    chunk_start: int
    frames: int
    layers: list[list[GroupPlan]]

    def mean_attended_tokens(self) -> float:
        """Attended keys per query token, averaged over all heads of all layers."""
        total = heads = 0
        for groups in self.layers:
            for g in groups:
                total += g.attended_tokens * len(g.heads)
                heads += len(g.heads)
        return total / max(heads, 1)


def _rotary(head_dim: int, grid: tuple[int, int], times: list[float], pools: list[int]) -> Rotary:
    gh, gw = grid
    t_parts, s_parts = [], []
    for t, p in zip(times, pools):
        sp = spatial_positions(gh, gw, p)
        s_parts.append(sp)
        t_parts.append(torch.full((sp.shape[0],), t, dtype=torch.float64))
    if not t_parts:
        return Rotary(torch.zeros(0, head_dim // 2, dtype=torch.float64))
    return Rotary.from_positions(head_dim, torch.cat(t_parts), torch.cat(s_parts))


def plan_chunk(cache: HeadwiseKVCache, rope_mode: str, window: int, chunk_start: int, frames: int) -> ChunkPlan:
    """Decide every group's attended entries and positions for one chunk."""
    key_memo: dict[tuple, Rotary] = {}
    query_memo: dict[tuple, Rotary] = {}
    layers = []
    for layer in cache.layers:
        groups = []
        for g in layer.groups:
            entries = g.entries(chunk_start)
            e_times, q_times = map_times(rope_mode, [EntryTime(e.time, e.sink) for e in entries],
                                         chunk_start, frames, window)
            pools = [e.pool for e in entries]
            # layers and groups with the same layout share their rotations
            q_key = tuple(q_times)
            if q_key not in query_memo:
                query_memo[q_key] = _rotary(cache.head_dim, cache.grid, q_times, [1] * frames)
            q_rot = query_memo[q_key]
            k_key = (tuple(e_times), tuple(pools), q_key)
            if k_key not in key_memo:
                key_memo[k_key] = Rotary.concat([_rotary(cache.head_dim, cache.grid, e_times, pools), q_rot])
            k_rot = key_memo[k_key]
            groups.append(GroupPlan(g.heads, len(g.heads) == layer.num_heads, entries, e_times, q_times,
                                    k_rot, q_rot))
        layers.append(groups)
    return ChunkPlan(chunk_start, frames, layers)


Observer = Callable[[int, "GroupPlan", torch.Tensor, torch.Tensor], None]


class PlannedAttention:
    """The runner's self-attention for one denoising call of a planned chunk.

    ``observer(layer, group_plan, q_roped, k_roped)`` — if given — sees every
    group's rotated queries ``[B, S, Hg, D]`` and keys ``[B, L, Hg, D]`` (history
    entries in ``group_plan.entries`` order, then the chunk); head profiling
    uses it to measure attention without changing it.
    """

    def __init__(self, plan: ChunkPlan, backend: Backend, commit_to: HeadwiseKVCache | None = None,
                 observer: Observer | None = None):
        self.plan = plan
        self.backend = backend
        self.commit_to = commit_to
        self.observer = observer

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = self.plan.layers[layer]
        problems = []
        roped_q: dict[int, torch.Tensor] = {}
        for g in groups:
            kg, vg = (k, v) if g.all_heads else (k[:, :, g.heads], v[:, :, g.heads])
            # groups with the same query positions share one rotation of q
            rid = id(g.query_rotary)
            if rid not in roped_q:
                roped_q[rid] = g.query_rotary.apply(q)
            q_r = roped_q[rid] if g.all_heads else roped_q[rid][:, :, g.heads]
            if g.entries:
                k_all = torch.cat([e.k for e in g.entries] + [kg], dim=1)
                v_all = torch.cat([e.v for e in g.entries] + [vg], dim=1)
            else:
                k_all, v_all = kg, vg
            k_r = g.key_rotary.apply(k_all)
            if self.observer is not None:
                self.observer(layer, g, q_r, k_r)
            problems.append(GroupProblem(q_r, k_r, v_all))
        outs = self.backend(problems)
        if len(groups) == 1 and groups[0].all_heads:
            out = outs[0]
        else:
            out = torch.empty_like(q)
            for g, o in zip(groups, outs):
                out[:, :, g.heads] = o
        if self.commit_to is not None:
            self.commit_to.commit(layer, k, v, self.plan.chunk_start, self.plan.frames)
        return out
