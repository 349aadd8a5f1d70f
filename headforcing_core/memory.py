"""Pre-flight memory estimates: what a run will hold, before anything is allocated.

:func:`estimate_run` adds up what a run allocates on its device, as the code allocates it, phase by
phase, and reports the peak (``python -m headforcing_core.bench --memory`` measures the same run and
puts the two side by side; the estimate stays within −5 % / +15 % of the measured peak):

``run``      a model call of a chunk: the KV cache (the arena the cache allocates, laid out by
             :func:`~headforcing_core.cache.type_layout`) and its tiers' own buffers; the prompt's
             cross-attention K/V; the latents (the video's noise and output — they grow with the
             length — and the last frames kept for a recache); the chunk's plan (its metadata and the
             one-layer scratch every layer gathers its history into, :mod:`headforcing_core.plan`); and
             the model call's own temporaries at its widest point (the attention call, or the
             feed-forward's hidden layer), with the one weight a Linear casts to the compute dtype
             when the weights are stored in another (fp8: :meth:`~headforcing_core.backbone.BackboneSpec.weight_cast_bytes`);
``commit``   after a chunk: the plan's metadata and the commit's temporaries (frames un-rotated and
             pooled into episodes or merged blocks);
``prompt``   a prompt encoded (at the start, and at a switch next to the old prompt's K/V): its K/V and
             the text embedding's temporaries (the text-encoder output padded to the model's text length);
``capture``  the captured AR_STATE (copies of the cache, the last latents and the prompt) next to the
             live cache;
``finish``   after the run: the state, the latents and the caller's copies of the output (a node
             un-normalizes the latents once).

The state is CPU memory: it counts when the run's device is the CPU (``state_on_device``).

:func:`preflight` refuses a run that does not fit before anything is allocated and names the
input that drives the cost: the longest video (or schedule) that fits at this size, the
largest resolution that fits at this length, a bounded policy for ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from .backbone import BackboneSpec
from .cache import COMMIT_SLICE_BYTES, type_layout
from .errors import MemoryBudgetError
from .policies import TRAINING_WINDOW, CachePolicy, Episodic, Merge, make_policy, resolve_labels
from .retention import make_tracker
from .rope import axis_pairs, pooled_grid

GiB = 1024**3
MiB = 1024**2
LATENT_ITEMSIZE = 4  # initial noise and output latents are float32
TAIL_FRAMES = TRAINING_WINDOW  # committed latents a sampler / AR_STATE keeps for recache (the one definition)
KEY_ALIGN = 8  # the plan's key axis, aligned for masked kernels (attention.KEY_ALIGN)


@dataclass(frozen=True)
class RunEstimate:
    """Bytes a run needs on its device (see the module docstring for the phases).

    ``kv_bytes``: K and V of all layers as the cache allocates them. ``total_bytes`` is the peak over the
    phases plus the weights (when given).
    """

    policy: str
    latent_frames: int
    kv_bytes: int
    kv_bytes_by_type: dict[str, int]
    attended_tokens: float  # mean keys a query attends to at steady state, over all heads
    stored_tokens: float  # mean keys a head stores at steady state
    tokens_per_frame: int
    activation_bytes: int  # a model call's temporaries at its widest point
    text_bytes: int  # cross-attention K/V of the prompt held during sampling
    weights_bytes: int = 0
    notes: tuple[str, ...] = field(default=())
    attention_bytes: int = 0  # the chunk's plan: metadata and the one-layer scratch
    latent_bytes: int = 0  # noise + output latents of the new frames (grow with the length) + the recache tail
    state_bytes: int = 0  # the captured AR_STATE, when it shares the device's memory
    input_state_bytes: int = 0  # an AR_STATE being continued, when it shares the device's memory
    output_copy_bytes: int = 0  # the caller's copies of the output after the run
    text_encode_bytes: int = 0  # text encoder temporaries at a prompt switch
    extra_bytes: int = 0
    extra_label: str = ""
    cache_extra_bytes: int = 0  # the cache tiers' own buffers (running sums, episode signatures, bookkeeping)
    plan_meta_bytes: int = 0  # the plan's metadata, alive until the next chunk is planned
    commit_bytes: int = 0  # a commit's temporaries
    prompts_held: int = 1  # prompts' K/V held while one is encoded (2 at a switch)
    recache_bytes: int = 0  # the largest recache model call: its plan and scratch and its temporaries

    @property
    def phases(self) -> dict[str, int]:
        held = self.latent_bytes + self.input_state_bytes + self.extra_bytes
        cache = self.kv_bytes + self.cache_extra_bytes
        return {
            "run": held + cache + self.text_bytes + self.attention_bytes + self.activation_bytes,
            "commit": held + cache + self.text_bytes + self.plan_meta_bytes + self.commit_bytes,
            "prompt": held + cache + self.plan_meta_bytes + self.prompts_held * self.text_bytes
            + self.text_encode_bytes,
            "capture": held + cache + self.text_bytes + self.plan_meta_bytes + self.state_bytes,
            "finish": held + self.state_bytes + self.output_copy_bytes,
            **({"recache": held + cache + self.text_bytes + self.recache_bytes} if self.recache_bytes else {}),
        }

    @property
    def peak_phase(self) -> str:
        p = self.phases
        return max(p, key=p.get)

    @property
    def run_bytes(self) -> int:
        """Peak over the phases, weights excluded."""
        return max(self.phases.values())

    @property
    def total_bytes(self) -> int:
        return self.run_bytes + self.weights_bytes

    @property
    def length_bytes(self) -> int:
        """The part that grows with the video's length (latents; the whole cache of an unbounded policy)."""
        return self.latent_bytes + self.output_copy_bytes

    def parts(self) -> dict[str, int]:
        """Every term in bytes (JSON-able)."""
        return {"kv": self.kv_bytes, "cache_extra": self.cache_extra_bytes, "plan": self.attention_bytes,
                "plan_metadata": self.plan_meta_bytes, "activations": self.activation_bytes,
                "text": self.text_bytes, "latents": self.latent_bytes, "commit": self.commit_bytes,
                "state": self.state_bytes, "input_state": self.input_state_bytes,
                "output_copies": self.output_copy_bytes, "text_encode": self.text_encode_bytes,
                "recache": self.recache_bytes,
                "extra": self.extra_bytes, "weights": self.weights_bytes}

    def breakdown(self) -> str:
        parts = [("KV cache", self.kv_bytes + self.cache_extra_bytes), ("activations", self.activation_bytes),
                 ("attention plan", self.attention_bytes), ("text", self.text_bytes),
                 ("latents", self.latent_bytes + self.output_copy_bytes),
                 ("AR_STATE", self.state_bytes + self.input_state_bytes),
                 (self.extra_label or "other", self.extra_bytes), ("weights", self.weights_bytes)]
        return ", ".join(f"{name} {_size(b)}" for name, b in parts if b)

    def describe(self) -> str:
        per_type = ", ".join(f"{t} {b / GiB:.2f}" for t, b in self.kv_bytes_by_type.items())
        lines = [
            f"policy {self.policy}: KV cache {self.kv_bytes / GiB:.2f} GiB ({per_type}) for "
            f"{self.latent_frames} latent frames",
            f"attended keys per query ≈ {self.attended_tokens:.0f} "
            f"({self.attended_tokens / self.tokens_per_frame:.2f} frames)",
            f"activations ≈ {self.activation_bytes / GiB:.2f} GiB, attention plan {self.attention_bytes / GiB:.2f} GiB, "
            f"text K/V {self.text_bytes / GiB:.2f} GiB, latents {self.length_bytes / GiB:.2f} GiB"
            + (f", AR_STATE {(self.state_bytes + self.input_state_bytes) / GiB:.2f} GiB"
               if self.state_bytes + self.input_state_bytes else "")
            + (f", {self.extra_label or 'other'} {self.extra_bytes / GiB:.2f} GiB" if self.extra_bytes else "")
            + (f", weights {self.weights_bytes / GiB:.2f} GiB" if self.weights_bytes else ""),
            f"total ≈ {self.total_bytes / GiB:.2f} GiB (peak: {self.peak_phase})",
        ]
        return "\n".join(list(self.notes) + lines)


def _size(b: int) -> str:
    return f"{b / GiB:.2f} GiB" if b >= 0.1 * GiB else f"{b / MiB:.1f} MiB"


def latent_bytes(spec: BackboneSpec, frames: int, latent_height: int, latent_width: int, batch: int = 1) -> int:
    """One float32 latent ``[B, C, frames, H, W]``."""
    return batch * spec.in_dim * frames * latent_height * latent_width * LATENT_ITEMSIZE


def _rotation_temps(elements: int, itemsize: int, compute: int, allocates: bool) -> int:
    """Bytes :func:`~headforcing_core.rope._rotate` holds at once for ``elements`` values: the pair-swapped copy,
    two products in the compute precision, and the result when it allocates one."""
    return elements * (itemsize + 2 * compute + (max(itemsize, compute) if allocates else 0))


def _commit_temps(batch: int, heads: int, tokens: int, pooled: int, head_dim: int, itemsize: int, compute: int,
                  slots: int) -> int:
    """What :meth:`~headforcing_core.cache.HeadwiseKVCache.pooled_frame` and the episodic memory's fold hold at
    once: the pooled frame of every head (keys, values, signatures), and per slice of heads (within
    :data:`~headforcing_core.cache.COMMIT_SLICE_BYTES`) a frame un-rotated — its copy, the pair-swapped
    channels and two products in the compute precision — or pooled (a float32 copy of half precision), then
    a slot of the memory mixed with the new frame."""
    time_pairs = axis_pairs(head_dim)[0]
    spatial = 1 - 2 * time_pairs / head_dim  # the channels rotated last (the widest rotation step)
    frame_head = batch * tokens * head_dim  # one head's frame (elements)
    per_slice = max(1, min(heads, COMMIT_SLICE_BYTES // (frame_head * 4)))
    frame_slice = per_slice * frame_head
    half = compute if itemsize != compute else 0
    unrotate = frame_slice * (itemsize + spatial * (itemsize + 2 * compute))
    pool = frame_slice * (itemsize + half) + frame_slice // 4 * (compute + itemsize)
    outputs = 2 * heads * batch * pooled * head_dim * itemsize + (batch * heads * head_dim * 4 if slots else 0)
    fold = 0
    if slots:
        store_head = batch * slots * pooled * head_dim  # one head's episode slots (elements)
        fold_slice = max(1, min(heads, COMMIT_SLICE_BYTES // (store_head * 4))) * batch * pooled * head_dim
        fold = fold_slice * (2 * itemsize + compute + half)
    return outputs + max(unrotate, pool, fold)


def estimate_run(spec: BackboneSpec, policy: CachePolicy | str, *, latent_frames: int, latent_height: int,
                 latent_width: int, frames_per_block: int = 3, batch: int = 1,
                 dtype: torch.dtype = torch.bfloat16, weights_bytes: int = 0, new_frames: int | None = None,
                 capture_state: bool = True, state_on_device: bool = False, input_state_bytes: int = 0,
                 output_copies: int = 0, text_tokens: int | None = None, extra_bytes: int = 0,
                 extra_label: str = "", prompts: int = 1,
                 recaches: Sequence[tuple[str, int, int]] = ()) -> RunEstimate:
    """What a run of ``policy`` holds (see the module docstring).

    ``latent_frames``: frames the cache must cover (old + new when continuing); ``new_frames``
    (default: all) the frames whose noise and output the run holds; ``capture_state``: an
    AR_STATE is captured at the end, ``state_on_device``: the CPU copies of states count (a CPU
    device); ``input_state_bytes``: a state being continued that shares the device's memory;
    ``output_copies``: full-length latent copies the caller makes afterwards; ``prompts``: the
    story's prompts (more than one: a switch); ``recaches``: ``(mode, frames re-run, sink frames attended)`` of
    each recache the run makes (:func:`~headforcing_core.transitions.planned_recaches`), whose model calls re-run
    more frames at once than a chunk (LongLive's) or gather history a pool read in place does not.
    """
    pol = make_policy(policy) if isinstance(policy, str) else policy
    pol = resolve_labels(pol, spec.num_layers, spec.num_heads)
    pol.validate(frames_per_block)
    types = pol.head_types(spec.num_layers, spec.num_heads)
    rules = pol.rule_map
    f = frames_per_block
    gh, gw = spec.token_grid(latent_height, latent_width)
    pol.check_grid((gh, gw))  # a merge patch that does not divide the grid: refused here, before any model loads
    tokens = gh * gw
    new = latent_frames if new_frames is None else new_frames
    in_place = pol.keys_stay_in_place()

    def tokens_of(pool: int) -> int:
        ph, pw = pooled_grid(gh, gw, pool)
        return ph * pw

    itemsize = torch.finfo(dtype).bits // 8
    compute = 8 if dtype == torch.float64 else 4  # RoPE and pooling precision
    cast = spec.weight_cast_bytes(dtype)
    D = spec.head_dim
    order = [t for t in rules if any(t in row for row in types)]
    heads_of = {t: sum(row.count(t) for row in types) for t in order}
    layers_of = {t: sum(1 for row in types if t in row) for t in order}
    trackers = {t: make_tracker(rules[t], f) for t in order}
    budgets = {t: trackers[t].budget(latent_frames, tokens_of, in_place) for t in order}
    # ---- the cache: one arena of K and V, and each tier's own buffers ---------------------------------
    by_type, extra = {}, 0
    for t in order:
        lay = type_layout(rules[t], trackers[t], heads_of[t], (gh, gw), f, latent_frames, in_place)
        by_type[t] = 2 * batch * lay.heads * lay.head_rows(tokens) * D * itemsize
        middle = rules[t].middle
        if isinstance(middle, Merge):  # running sums of the block being filled
            extra += 2 * batch * heads_of[t] * lay.block_tokens * D * compute
        if isinstance(middle, Episodic):  # signatures; valid / first / last / count per (row, layer, slot)
            slots = lay.episode_slots
            extra += batch * heads_of[t] * slots * D * 4 + batch * layers_of[t] * slots * (1 + 8 + 8 + 8) \
                + heads_of[t] * 8
    kv = sum(by_type.values())
    n_heads = spec.num_layers * spec.num_heads
    stored_sum = sum(heads_of[t] * budgets[t].stored for t in order)
    attended_sum = sum(heads_of[t] * budgets[t].attended for t in order)
    # ---- one model call --------------------------------------------------------------------------------
    def model_call(query_frames: int, gathered: bool, history: int, classes: int, retimes: bool) -> tuple[int, int, int]:
        """(temporaries at the widest point, plan with its scratch, plan metadata) of a model call over
        ``query_frames`` frames; ``gathered``: its history is gathered into the scratch (``history`` keys
        before the queries' own, one sequence per head and query-frame class)."""
        s = query_frames * tokens
        row = batch * s * spec.dim * itemsize  # one [B, S, dim] activation (q, k, v, hidden states, ...)
        ffn = batch * s * spec.ffn_width * itemsize
        elements = batch * s * spec.dim
        rot = _rotation_temps(elements, itemsize, compute, allocates=False)
        rot_alloc = _rotation_temps(elements, itemsize, compute, allocates=True)
        # the attention call: hidden states, the modulated input, q, k, v, the rotated queries — then the
        # chunk's keys rotated (written into the cache or the scratch), the output
        attention_call = 5 * row + max(rot_alloc + (0 if gathered else row), row + rot, 2 * row)
        plan = meta = 0
        if gathered:
            sequences = spec.num_heads * classes
            width = -(-int(history + s) // KEY_ALIGN) * KEY_ALIGN
            span = width - s if retimes else 0
            episodic_layers = sum(layers_of[t] for t in order if isinstance(rules[t].middle, Episodic))
            rows = len(order) * classes + episodic_layers
            scratch = 2 * batch * sequences * width * D * itemsize
            query_buffer = batch * s * spec.dim * itemsize if classes > 1 else 0
            masks = 2 * spec.num_layers * batch * sequences * width * itemsize
            table = batch * rows * (width + span) * 8  # arena rows and factor indices
            windows = 4 * spec.num_layers * batch * sequences * 8  # starts and lengths of both passes
            commit_rows = 2 * spec.num_layers * batch * spec.num_heads * query_frames * 8
            meta = masks + table + windows + commit_rows
            plan = meta + scratch + query_buffer
            # inside the attention call, before the chunk is written: the table rows of the layer and the arena
            # rows (int64), then the time factors of the re-timed keys (complex) and, for half precision, their
            # keys in float32
            pairs = axis_pairs(D)[0]
            rows_of_layer = batch * sequences * width * 8
            factor_rows = batch * sequences * span * 8
            factors = batch * sequences * span * pairs * 2 * compute
            keys32 = batch * sequences * span * 2 * pairs * compute if itemsize != compute else 0
            attention_call += max(rows_of_layer, factor_rows + factors, factors + keys32)
            # the clean pass's commit, after the attention: its output, the kept frames' K and V picked from the
            # scratch (every head's, at most) and their source and destination rows (int64)
            attention_call = max(attention_call, 6 * row + 2 * row + 2 * batch * spec.num_heads * s * 8)
        rotation_tables = 2 * s * D * compute
        ffn_call = 2 * row + 2 * ffn  # hidden states, the modulated input, the hidden layer in and out of GELU
        # weights stored in another dtype are cast one Linear at a time, next to what that layer's stage holds
        embedding_call = 2 * row + cast["embedding"]  # the patch-embedded input and its time modulation
        return (max(attention_call + cast["attention"], ffn_call + cast["ffn"], embedding_call) + rotation_tables,
                plan, meta)

    history = max(b.history for b in budgets.values())
    classes = f if pol.key_sets_differ_by_query_frame(f) else 1
    retimes = pol.rope != "absolute" or any(r.middle is not None for r in rules.values())
    act, plan, meta = model_call(f, not in_place, history, classes, retimes)
    # a recache: its plan gathers even a pool read in place; LongLive's re-runs up to its window in one call
    # (absolute times, the 3 sink frames attended past the window with the global sink)
    recache = 0
    for mode, frames, sink_frames in recaches:
        if frames <= 0:
            continue
        if mode == "block_causal":
            call = model_call(min(f, frames), True, history, classes, retimes)
        else:
            call = model_call(frames, True, sink_frames * tokens, 1, False)
        recache = max(recache, call[0] + call[1])
    # ---- a commit: a frame un-rotated and pooled, a slice of a pooling type's heads at a time -----------
    commit = 0
    for t in order:
        middle = rules[t].middle
        if isinstance(middle, (Episodic, Merge)):
            commit = max(commit, _commit_temps(batch, heads_of[t], tokens, tokens_of(middle.pool), D, itemsize,
                                               compute, slots=middle.cap + 1 if isinstance(middle, Episodic) else 0))
    text_len = spec.text_len
    text = spec.num_layers * 2 * batch * text_len * spec.dim * itemsize
    # a cast Linear (fp8 weights): the text embedding's before any of the new prompt's K/V exists, the
    # cross-attention's k / v next to all but the last layer's
    text_encode = batch * text_len * (spec.text_dim + 3 * spec.dim) * itemsize \
        + max(cast["attention"], cast["text"] - text)
    tail = latent_bytes(spec, min(TAIL_FRAMES, new), latent_height, latent_width, batch)
    latents = 2 * latent_bytes(spec, new, latent_height, latent_width, batch) + tail
    state = 0
    if capture_state and state_on_device:
        ctx_tokens = text_tokens if text_tokens is not None else text_len
        state = (kv + extra + latent_bytes(spec, min(TAIL_FRAMES, latent_frames), latent_height, latent_width, batch)
                 + batch * ctx_tokens * spec.text_dim * 4)
    # each copy the caller makes (e.g. ComfyUI's ``process_latent_out``: ``x * std + mean``) briefly holds
    # a temporary of the same size next to its result
    copies = 2 * output_copies * latent_bytes(spec, new, latent_height, latent_width, batch)
    return RunEstimate(pol.preset, latent_frames, kv, by_type, attended_sum / n_heads,
                       stored_sum / n_heads, tokens, act, text, weights_bytes,
                       (pol.note,) if pol.note else (), attention_bytes=int(plan), latent_bytes=latents,
                       state_bytes=state, input_state_bytes=input_state_bytes if state_on_device else 0,
                       output_copy_bytes=copies, text_encode_bytes=text_encode, prompts_held=2 if prompts > 1 else 1,
                       extra_bytes=extra_bytes, extra_label=extra_label, cache_extra_bytes=int(extra),
                       plan_meta_bytes=int(meta), commit_bytes=int(commit), recache_bytes=int(recache))


def check_fits(estimate: RunEstimate, free_bytes: int, headroom: float = 0.9) -> None:
    """Raise :class:`MemoryBudgetError` if the run needs more than ``headroom`` of ``free_bytes``
    (without advice on what to change: :func:`preflight` gives it)."""
    if estimate.total_bytes > free_bytes * headroom:
        raise MemoryBudgetError(_needs(estimate, free_bytes) + "free memory or make the run smaller.")


def _needs(estimate: RunEstimate, free_bytes: int) -> str:
    return (f"this run needs ≈ {_size(estimate.total_bytes)} ({estimate.breakdown()}) but only "
            f"{_size(free_bytes)} is free; ")


def _largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """Largest n in [lo, hi] with fits(n) (fits is monotone: True up to some n), or None."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def preflight(estimate: Callable[[int, int, int], RunEstimate], *, latent_frames: int, latent_height: int,
              latent_width: int, free_bytes: int, patch: tuple[int, int] = (2, 2), headroom: float = 0.9,
              min_frames: int = 1, describe_length: Callable[[int], str] | None = None,
              describe_size: Callable[[int, int], str] | None = None, what: str = "the video",
              bounded_policy_hint: bool = False) -> RunEstimate:
    """The estimate of this run if it fits in ``headroom`` of ``free_bytes``; else :class:`MemoryBudgetError`
    naming the input that drives the cost.

    ``estimate(latent_frames, latent_height, latent_width)`` estimates the run at other sizes (the
    same settings otherwise). ``describe_length(frames)`` says a latent length in the node's own
    unit (None: the length cannot change, e.g. Profile Heads' fixed window counts as one input
    among others), ``describe_size(h, w)`` a latent size in pixels (None: the size is fixed, e.g.
    a continuation). ``min_frames``: the shortest allowed length (one chunk).
    """
    est = estimate(latent_frames, latent_height, latent_width)
    limit = free_bytes * headroom
    if est.total_bytes <= limit:
        return est

    def fits(t, h, w) -> bool:
        return estimate(t, h, w).total_bytes <= limit

    # which input drives the cost: the part of the bytes that grows with the length (beyond one
    # chunk) against the part a minimal-length run of this size already needs
    shortest = estimate(min(min_frames, latent_frames), latent_height, latent_width)
    length_share = 1.0 - shortest.total_bytes / est.total_bytes
    advice: list[tuple[float, str]] = []  # (share of the cost this input drives, text)
    if describe_length is not None and latent_frames > min_frames:
        best = _largest(min_frames, latent_frames - 1, lambda t: fits(t, latent_height, latent_width))
        if best is not None:
            advice.append((length_share, f"shorten {what} to at most {describe_length(best)}"))
    if describe_size is not None:
        ph, pw = patch
        gh, gw = latent_height // ph, latent_width // pw

        def size_at(rows: int) -> tuple[int, int]:
            return rows * ph, max(1, (gw * rows) // gh) * pw

        best = _largest(1, gh - 1, lambda r: fits(latent_frames, *size_at(r)))
        if best is not None:
            advice.append((1.0 - length_share, f"lower the resolution to at most {describe_size(*size_at(best))}"))
    advice.sort(key=lambda a: -a[0])
    texts = [a[1] for a in advice]
    if bounded_policy_hint:
        texts.insert(0 if est.kv_bytes > est.run_bytes / 2 else len(texts),
                     "choose a bounded policy (head_forcing, pyramid_forcing or self_forcing_window)")
    if not texts:
        floor = estimate(min_frames, *((patch[0], patch[1]) if describe_size is not None else
                                       (latent_height, latent_width)))
        if floor.weights_bytes > limit:
            texts.append(f"the model's weights alone need {_size(floor.weights_bytes)}: use a machine with more "
                         "memory")
        else:
            texts.append("no shorter or smaller run of these settings fits either: free memory (unload other "
                         "models, close other programs) or use a machine with more memory")
    raise MemoryBudgetError(_needs(est, free_bytes) + ", or ".join(texts) + ".")


def with_weights(estimate: RunEstimate, weights_bytes: int) -> RunEstimate:
    return replace(estimate, weights_bytes=int(weights_bytes))
