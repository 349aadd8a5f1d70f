"""Schema of the cache section of an AR_STATE file: one hook, :func:`validate_cache_meta`.

:func:`headforcing_core.validation.validate_state` checks every other field of a state first
(model shape, policy, batch, latent size, dtype …) and then calls this hook with the cache's
JSON bookkeeping (``meta["cache"]``), all tensors of the file and the (validated) state
metadata. The hook checks what :meth:`HeadwiseKVCache.load_state_dict` of the *current* cache
format needs, so that restoring a state that passed it never fails with a raw error:

* ``grid`` / ``head_dim`` / ``frames_per_block`` agree with the state's latent size, model
  and chunking; ``total_frames`` / ``committed_frames`` are whole numbers;
* ``layers``: one list of head groups per layer, each group the heads of one type in the
  order the policy makes them, with the middle tier its rule calls for;
* every tier's slot map is a permutation of its slots, entries name whole frames at finite
  times, and its ``cache.l{L}.g{G}.…`` tensors have the shape ``[batch, capacity, tokens,
  heads, head_dim]`` and dtype the bookkeeping implies (capacities of bounded tiers are the
  policy's);
* no other ``cache.*`` tensor is present.

The cache format is being redesigned: this module is the one place to change with it.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import HeadForcingError
from .validation import FLOAT_DTYPES, LIMITS, Fields

_TIER_OF = {"Stride": "StrideTier", "Cyclic": "CyclicTier", "Merge": "MergeTier", "Episodic": "EpisodicTier"}


def validate_cache_meta(cache: Mapping, tensors: Mapping[str, torch.Tensor], meta: Mapping, *, where: str,
                        error: type[HeadForcingError]) -> None:
    """Raise ``error`` naming the field unless the cache section fits the rest of the (validated) state."""
    from .policies import resolve_labels
    from .rope import pooled_grid
    from .state import policy_from_dict

    f = Fields(where, error)
    fp = meta["fingerprint"]
    batch, fpb = meta["batch"], meta["frames_per_block"]
    lh, lw = meta["latent_size"]
    _, ph, pw = fp["patch_size"]
    gh, gw = lh // ph, lw // pw
    head_dim = fp["dim"] // fp["num_heads"]
    dtype = FLOAT_DTYPES[meta["dtype"]]
    policy = resolve_labels(policy_from_dict(meta["policy"]), fp["num_layers"], fp["num_heads"])
    rules = policy.rule_map
    types = policy.head_types(fp["num_layers"], fp["num_heads"])

    grid = f.array(f.get(cache, "grid", "cache.grid"), "cache.grid", 2, 2)
    if grid != [gh, gw]:
        f.fail("cache.grid", f"is {f.shown(grid)}; a {lw}×{lh} latent with patch {ph}×{pw} has [{gh}, {gw}]")
    if f.get(cache, "head_dim", "cache.head_dim") != head_dim:
        f.fail("cache.head_dim", f"is {f.shown(cache['head_dim'])}; the model's heads are {head_dim} wide")
    if f.get(cache, "frames_per_block", "cache.frames_per_block") != fpb:
        f.fail("cache.frames_per_block", f"is {f.shown(cache['frames_per_block'])}; the state's is {fpb}")
    total = f.integer(f.get(cache, "total_frames", "cache.total_frames"), "cache.total_frames", 1,
                      LIMITS["latent_frames"])
    f.integer(cache.get("committed_frames", 0), "cache.committed_frames", 0, LIMITS["latent_frames"])
    layers = f.array(f.get(cache, "layers", "cache.layers"), "cache.layers", fp["num_layers"], fp["num_layers"])

    expected_keys: set[str] = set()

    def tokens(pool: int) -> int:
        a, b = pooled_grid(gh, gw, pool)
        return a * b

    def buffers(prefix: str, capacity: int, heads: int, pool: int, field: str) -> None:
        for kv in ("k", "v"):
            name = f"{prefix}.{kv}"
            expected_keys.add(name)
            f.tensor(tensors, name, dtypes=(dtype,), shape=(batch, capacity, tokens(pool), heads, head_dim),
                     what=f"{field} must be [batch, capacity, tokens, heads, head_dim] =")

    def slot_map(slots: list[int], free, capacity: int, field: str) -> None:
        free = f.array(free, f"{field}.free", 0, capacity)
        free = [f.integer(s, f"{field}.free[{i}]", 0, capacity - 1) for i, s in enumerate(free)]
        if sorted(slots + free) != list(range(capacity)):
            f.fail(field, f"has an inconsistent slot map (slots {sorted(slots)[:8]}…, free {sorted(free)[:8]}…) "
                          f"for {capacity} slots")

    def frames_of(raw, field: str) -> None:
        raw = f.array(raw, field, 1, LIMITS["latent_frames"])
        for i, fr in enumerate(raw):
            f.integer(fr, f"{field}[{i}]", 0, LIMITS["latent_frames"])

    def fifo(m, prefix: str, field: str, heads: int, pool: int, capacity: int | None) -> None:
        m = f.mapping(m, field)
        cap = f.integer(f.get(m, "capacity", f"{field}.capacity"), f"{field}.capacity", 0, LIMITS["latent_frames"])
        if capacity is not None and cap != capacity:
            f.fail(f"{field}.capacity", f"is {cap}; the state's policy keeps {capacity} here")
        items = f.array(f.get(m, "items", f"{field}.items"), f"{field}.items", 0, cap)
        slots = []
        for i, it in enumerate(items):
            it = f.array(it, f"{field}.items[{i}]", 3, 3)
            slots.append(f.integer(it[0], f"{field}.items[{i}][0] (slot)", 0, max(0, cap - 1)))
            f.number(it[1], f"{field}.items[{i}][1] (time)", 0.0, float(LIMITS["latent_frames"]))
            frames_of(it[2], f"{field}.items[{i}][2] (frames)")
        slot_map(slots, f.get(m, "free", f"{field}.free"), cap, field)
        buffers(prefix, cap, heads, pool, field)

    for li, groups in enumerate(layers):
        field_l = f"cache.layers[{li}]"
        by_type: dict[str, list[int]] = {}
        for h, t in enumerate(types[li]):
            by_type.setdefault(t, []).append(h)
        want = list(by_type.items())
        groups = f.array(groups, field_l, len(want), len(want))
        for gi, (g, (t, heads)) in enumerate(zip(groups, want)):
            field = f"{field_l}[{gi}]"
            prefix = f"cache.l{li}.g{gi}"
            g = f.mapping(g, field)
            rule = rules[t]
            middle = None if rule.middle is None else _TIER_OF[type(rule.middle).__name__]
            got = (g.get("head_type"), g.get("heads"), g.get("middle_kind"))
            if got != (t, heads, middle):
                f.fail(field, f"is {got[0]!r} heads {f.shown(got[1])} ({got[2]}); the state's policy makes "
                              f"{t!r} heads {heads} ({middle})")
            hist = rule.history_frames(fpb)
            n = len(heads)
            fifo(f.get(g, "sink", f"{field}.sink"), prefix + ".sink", f"{field}.sink", n, 1,
                 rule.sink if hist is not None else 0)
            fifo(f.get(g, "recent", f"{field}.recent"), prefix + ".recent", f"{field}.recent", n, 1,
                 hist if hist is not None else total)
            if middle is None:
                continue
            mm = f.mapping(f.get(g, "middle", f"{field}.middle"), f"{field}.middle")
            mp, mf = prefix + ".middle", f"{field}.middle"
            if middle in ("StrideTier", "CyclicTier"):
                fifo(f.get(mm, "fifo", mf + ".fifo"), mp + ".fifo", mf + ".fifo", n, 1, rule.middle.cap)
            elif middle == "MergeTier":
                pool = rule.middle.pool
                fifo(f.get(mm, "fifo", mf + ".fifo"), mp + ".fifo", mf + ".fifo", n, pool, rule.middle.cap)
                buffers(mp + ".acc", 1, n, pool, mf + ".acc")
                acc = f.array(f.get(mm, "acc_frames", mf + ".acc_frames"), mf + ".acc_frames", 0,
                              rule.middle.block)
                for i, fr in enumerate(acc):
                    f.integer(fr, f"{mf}.acc_frames[{i}]", 0, LIMITS["latent_frames"])
            else:  # EpisodicTier
                cap = rule.middle.cap + 1
                if f.get(mm, "capacity", mf + ".capacity") != cap:
                    f.fail(mf + ".capacity", f"is {f.shown(mm['capacity'])}; the state's policy keeps {cap}")
                eps = f.array(f.get(mm, "episodes", mf + ".episodes"), mf + ".episodes", 0, cap)
                slots = []
                for i, ep in enumerate(eps):
                    fe = f"{mf}.episodes[{i}]"
                    ep = f.mapping(ep, fe)
                    slots.append(f.integer(f.get(ep, "slot", fe + ".slot"), fe + ".slot", 0, cap - 1))
                    f.integer(f.get(ep, "count", fe + ".count"), fe + ".count", 1, LIMITS["latent_frames"])
                    f.number(f.get(ep, "time", fe + ".time"), fe + ".time", 0.0, float(LIMITS["latent_frames"]))
                    frames_of(f.get(ep, "frames", fe + ".frames"), fe + ".frames")
                slot_map(slots, f.get(mm, "free", mf + ".free"), cap, mf)
                switch = f.array(mm.get("switch_frames", []), mf + ".switch_frames", 0, LIMITS["history"])
                for i, s in enumerate(switch):
                    f.integer(s, f"{mf}.switch_frames[{i}]", -1, LIMITS["latent_frames"])
                buffers(mp, cap, n, rule.middle.pool, mf)
                expected_keys.add(mp + ".sig")
                f.tensor(tensors, mp + ".sig", dtypes=(torch.float32,), shape=(len(eps), n * head_dim),
                         what=f"{mf}'s episode signatures must be [episodes, heads × head_dim] =")

    unknown = sorted(k for k in tensors if k.startswith("cache.") and k not in expected_keys)
    if unknown:
        f.fail(f"tensor {unknown[0]}", "is not part of this state's cache layout")
