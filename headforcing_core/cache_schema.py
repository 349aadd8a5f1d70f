"""Schema of the cache section of an AR_STATE file: one hook, :func:`validate_cache_meta`.

:func:`headforcing_core.validation.validate_state` checks every other field of a state first
(model shape, policy, batch, latent size, dtype …) and then calls this hook with the cache's
JSON bookkeeping (``meta["cache"]``), all tensors of the file and the (validated) state
metadata. It checks what :meth:`HeadwiseKVCache.load_state_dict` needs, so that restoring a
state that passed it never fails with a raw error:

* ``grid`` / ``head_dim`` / ``frames_per_block`` agree with the state's latent size, model and
  chunking; ``total_frames`` covers the frames made; ``prerotated`` is whether attention reads this
  policy's pool in place, ``keys`` how keys are stored (rotated at their own time);
* ``types``: one record per head type, in the order the policy makes them, each naming its
  ``(layer, head)`` pairs as the policy's labels do;
* each type's tracker state replays: it is the bookkeeping of the type's rule (whole numbers
  where frames are meant, no frame at or past ``next_frame``), and the frames its rule holds
  are exactly the frames of its page table (pages distinct and inside the pool); merged blocks
  likewise;
* every ``cache.{type}.…`` tensor has the shape and dtype the layout implies; no other
  ``cache.*`` tensor is present.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import HeadForcingError
from .validation import FLOAT_DTYPES, LIMITS, Fields


def validate_cache_meta(cache: Mapping, tensors: Mapping[str, torch.Tensor], meta: Mapping, *, where: str,
                        error: type[HeadForcingError]) -> None:
    """Raise ``error`` naming the field unless the cache section fits the rest of the (validated) state."""
    from .cache import KEY_FORMAT
    from .policies import policy_from_dict, resolve_labels
    from .retention import make_tracker
    from .rope import pooled_grid

    f = Fields(where, error)
    fp = meta["fingerprint"]
    batch, fpb, next_frame = meta["batch"], meta["frames_per_block"], meta["next_frame"]
    lh, lw = meta["latent_size"]
    _, ph, pw = fp["patch_size"]
    gh, gw = lh // ph, lw // pw
    tokens = gh * gw
    head_dim = fp["dim"] // fp["num_heads"]
    dtype = FLOAT_DTYPES[meta["dtype"]]
    policy = resolve_labels(policy_from_dict(meta["policy"]), fp["num_layers"], fp["num_heads"])
    rules = policy.rule_map
    labels = policy.head_types(fp["num_layers"], fp["num_heads"])

    grid = f.array(f.get(cache, "grid", "cache.grid"), "cache.grid", 2, 2)
    if grid != [gh, gw]:
        f.fail("cache.grid", f"is {f.shown(grid)}; a {lw}×{lh} latent with patch {ph}×{pw} has [{gh}, {gw}]")
    if f.get(cache, "head_dim", "cache.head_dim") != head_dim:
        f.fail("cache.head_dim", f"is {f.shown(cache['head_dim'])}; the model's heads are {head_dim} wide")
    if f.get(cache, "frames_per_block", "cache.frames_per_block") != fpb:
        f.fail("cache.frames_per_block", f"is {f.shown(cache['frames_per_block'])}; the state's is {fpb}")
    total = f.integer(f.get(cache, "total_frames", "cache.total_frames"), "cache.total_frames", 1,
                      LIMITS["latent_frames"])
    if total < next_frame:
        f.fail("cache.total_frames", f"is {total}, below the {next_frame} frames the state has made")
    in_place = policy.keys_stay_in_place()
    if f.boolean(cache.get("prerotated", False), "cache.prerotated") != in_place:
        f.fail("cache.prerotated", "does not match how the state's policy stores keys")
    if cache.get("keys") != KEY_FORMAT:
        f.fail("cache.keys", f"is {f.shown(cache.get('keys'))}; this pack stores keys {KEY_FORMAT!r}")
    order = [t for t in rules if any(t in row for row in labels)]
    types = f.array(f.get(cache, "types", "cache.types"), "cache.types", len(order), len(order))
    expected: set[str] = set()

    def buffer(name, shape, dtypes, what):
        expected.add(name)
        f.tensor(tensors, name, dtypes=dtypes, shape=shape, what=what)

    def frame_list(value, field):
        value = f.array(value, field, 0, LIMITS["latent_frames"])
        return [f.integer(x, f"{field}[{i}]", -1, next_frame - 1) for i, x in enumerate(value)]

    def table(value, field, capacity):
        value = f.mapping(value, field)
        out = {}
        for key, page in value.items():
            try:
                frame = int(key)
            except (TypeError, ValueError):
                f.fail(field, f"has a key {f.shown(key)} that is not a frame number")
            out[frame] = f.integer(page, f"{field}[{key}]", 0, max(capacity - 1, 0))
        if len(set(out.values())) != len(out):
            f.fail(field, "uses a page twice (corrupt page table)")
        return out

    # the buffers of a middle's own device tier (cache.MIDDLE_TIERS), by the middle's kind
    def merged_blocks(middle, rec, field, p, n, heads, tracker):
        a, b = pooled_grid(gh, gw, middle.patch)
        blocks = table(f.get(rec, "block_pages", f"{field}.block_pages"), f"{field}.block_pages", middle.capacity)
        if sorted(blocks) != sorted(tracker.stores.blocks):
            f.fail(f"{field}.block_pages", "do not hold the blocks the rule keeps")
        f.integer(f.get(rec, "acc_frames", f"{field}.acc_frames"), f"{field}.acc_frames", 0, middle.block_frames - 1)
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name in ("k", "v"):
            buffer(f"{p}.blocks.{name}", (batch, n, middle.capacity, a * b, head_dim), (dtype,),
                   f"{field}'s merged blocks must be")
            buffer(f"{p}.blocks.acc_{name}", (batch, n, a * b, head_dim), (acc_dtype,), f"{field}'s running sum must be")

    def episodes(middle, rec, field, p, n, heads, tracker):
        a, b = pooled_grid(gh, gw, middle.pool)
        slots = middle.cap + 1
        layers = len({li for li, _ in heads})
        for name, shape, dt in (("k", (batch, n, slots, a * b, head_dim), dtype),
                                ("v", (batch, n, slots, a * b, head_dim), dtype),
                                ("sig", (batch, n, slots, head_dim), torch.float32),
                                ("valid", (batch, layers, slots), torch.bool),
                                ("first", (batch, layers, slots), torch.int64),
                                ("last", (batch, layers, slots), torch.int64),
                                ("count", (batch, layers, slots), torch.float64)):
            buffer(f"{p}.episodes.{name}", shape, (dt,), f"{field}'s episodic memory ({name}) must be")
        first, last = tensors[f"{p}.episodes.first"], tensors[f"{p}.episodes.last"]
        valid = tensors[f"{p}.episodes.valid"]
        if bool(((first > last) & valid).any()) or bool(((last >= next_frame) & valid).any()) \
                or bool(((first < 0) & valid).any()):
            f.fail(f"tensor {p}.episodes.first", "names frames outside the video made so far")

    middle_tiers = {"Merge": merged_blocks, "Episodic": episodes}

    for ti, (t, rec) in enumerate(zip(order, types)):
        field = f"cache.types[{ti}]"
        rec = f.mapping(rec, field)
        if rec.get("head_type") != t:
            f.fail(f"{field}.head_type", f"is {f.shown(rec.get('head_type'))}; the state's policy makes {t!r} here")
        heads = [[li, hi] for li, row in enumerate(labels) for hi, x in enumerate(row) if x == t]
        if rec.get("heads") != heads:
            f.fail(f"{field}.heads", f"do not match the state's head labels for {t!r}")
        rule, n = rules[t], len(heads)
        p = f"cache.{t}"
        # the tracker's bookkeeping must be the rule's and replay on a fresh tracker
        tracker = make_tracker(rule, fpb)
        state = f.mapping(f.get(rec, "tracker", f"{field}.tracker"), f"{field}.tracker")
        fresh = tracker.state()
        if set(state) != set(fresh):
            f.fail(f"{field}.tracker", f"has fields {sorted(state)}; a {type(rule).__name__} keeps {sorted(fresh)}")
        for key, value in state.items():
            sub = f"{field}.tracker.{key}"
            if key == "cyclic":
                for phase, frames in f.mapping(value, sub).items():
                    frame_list(frames, f"{sub}[{phase}]")
            elif key == "partial":
                if value is not None:
                    f.array(value, sub, 2, 2)
                    f.integer(value[0], f"{sub}[0]", 0, LIMITS["latent_frames"])
                    f.integer(value[1], f"{sub}[1]", 0, LIMITS["latent_frames"])
            elif key == "blocks":
                f.array(value, sub, 0, LIMITS["latent_frames"])
                for i, b in enumerate(value):
                    f.integer(b, f"{sub}[{i}]", 0, LIMITS["latent_frames"])
            elif isinstance(fresh[key], list):
                frame_list(value, sub)
            elif key == "history":
                if value is not None:
                    f.integer(value, sub, 1, LIMITS["latent_frames"])
            elif value is not None:
                f.integer(value, sub, 0, LIMITS["latent_frames"])
        try:
            tracker.load_state(state)
            held = tracker.stored_frames()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            f.fail(f"{field}.tracker", f"does not replay ({type(e).__name__}: {e})")
        if getattr(tracker, "committed", next_frame) != next_frame:
            f.fail(f"{field}.tracker.committed", f"is {tracker.committed}; the state has made {next_frame} frames")
        capacity = tracker.frame_capacity(fpb, total, in_place)
        pages = table(f.get(rec, "frame_pages", f"{field}.frame_pages"), f"{field}.frame_pages",
                      capacity)
        if set(pages) != held:
            f.fail(f"{field}.frame_pages", f"hold frames {sorted(pages)[:8]}…, but the rule holds {sorted(held)[:8]}…")
        pool_pages = capacity if rule.bounded else None
        buffer(p + ".frames.k", (batch, n, pool_pages, tokens, head_dim), (dtype,),
               f"{field}'s whole frames must be [batch, heads, pages, tokens, head_dim] =")
        buffer(p + ".frames.v", (batch, n, pool_pages, tokens, head_dim), (dtype,), "")
        if pool_pages is None and tensors[p + ".frames.k"].shape[2] < max(pages.values(), default=-1) + 1:
            f.fail(f"tensor {p}.frames.k", "has fewer pages than its page table uses")
        tier = middle_tiers.get(rule.middle.kind) if rule.middle is not None else None
        if tier is not None:
            tier(rule.middle, rec, field, p, n, heads, tracker)

    unknown = sorted(k for k in tensors if k.startswith("cache.") and k not in expected)
    if unknown:
        f.fail(f"tensor {unknown[0]}", "is not part of this state's cache layout")
