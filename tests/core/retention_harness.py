"""Drive a head-wise cache directly with synthetic K/V (a 2×2 token grid, tiny heads), as the sampler
would: reserve the chunk's pages, plan it, commit its clean pass. Used by the listing tests."""

from __future__ import annotations

import torch

from headforcing_core.cache import HeadwiseKVCache
from headforcing_core.plan import plan_chunk

GRID = (2, 2)
HEAD_DIM = 8
F = 3


def build(policy, head_types, total=400, fpb=F, batch=1, layers=1):
    policy.validate(fpb)
    return HeadwiseKVCache((tuple(head_types),) * layers, policy.rule_map, batch=batch, grid=GRID, head_dim=HEAD_DIM,
                           frames_per_block=fpb, total_frames=total, dtype=torch.float64,
                           device=torch.device("cpu"), prerotated=policy.keys_stay_in_place())


def frame_kv(cache, frame, key_fn=None):
    """Raw K/V of one frame for every layer and head: K = the frame index (or ``key_fn(frame)``), V = K + 0.5."""
    tokens = GRID[0] * GRID[1]
    shape = (cache.num_layers, cache.batch, tokens, cache.num_heads, HEAD_DIM)
    if key_fn is None:
        k = torch.full(shape, float(frame), dtype=torch.float64)
    else:
        k = key_fn(frame).to(torch.float64).expand(shape).clone()
    return k, k + 0.5


def plan_at(cache, policy, start, frames=F):
    cache.reserve(start, frames)
    return plan_chunk(cache, policy.rope, policy.window, policy.clamp_min, policy.clamp_max, start, frames)


def commit(cache, start, frames=F, key_fn=None):
    parts = [frame_kv(cache, start + j, key_fn) for j in range(frames)]
    k = torch.cat([p[0] for p in parts], dim=2)
    v = torch.cat([p[1] for p in parts], dim=2)
    if cache.prerotated:
        cache.commit(start, frames, None, None)
        cache.replace_frames(start, frames, k, v)
    else:
        cache.commit(start, frames, k, v)


def advance(cache, policy, start, frames=F, key_fn=None):
    plan = plan_at(cache, policy, start, frames)
    commit(cache, start, frames, key_fn)
    return plan


def run_to(cache, policy, end, frames=F, key_fn=None, start=0):
    for s in range(start, end, frames):
        advance(cache, policy, s, min(frames, end - s), key_fn)


def listing(plan, head_type, query_frame=0, pass_="noisy"):
    """(sources, rope times) of a key set: frames as ``("f", n)``, blocks ``("b", n)``, chunk ``("c", j)``."""
    rows = plan.listing(head_type, query_frame, pass_)
    tag = {"frame": "f", "block": "b", "chunk": "c", "episodes": "e"}
    return [(tag[s], i) for s, i, _, _ in rows], [t for _, _, _, t in rows]
