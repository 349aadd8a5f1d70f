"""Pre-flight memory estimates: what a run will hold, before anything is allocated.

:func:`estimate_run` adds up everything a run holds on its device, phase by phase, and reports
the peak:

``run``      the KV cache (the policy's pool capacities, the same numbers the cache allocates),
             one chunk's forward activations, the attention workspace (the per-chunk buffers of
             gathered and rotated history every layer reads — one per query frame where key sets
             differ by query frame —, the clean pass's staged K/V, the plan's rotation
             temporaries), the prompt's cross-attention K/V, the video's initial noise and output latents (they grow with
             the length), an input AR_STATE being continued, and caller-given extras (the head
             profiler's statistics buffers);
``switch``   a prompt switch: the old and new prompts' K/V and the text encoder's temporaries;
``capture``  the captured AR_STATE (CPU copies of the cache, the last latents and the prompt)
             next to the live cache;
``finish``   after the run: the state, the latents and the caller's copies of the output (a
             node un-normalizes the latents once).

The state is CPU memory: it counts when the run's device is the CPU (``state_on_device``).

:func:`preflight` refuses a run that does not fit before anything is allocated and names the
input that drives the cost: the longest video (or schedule) that fits at this size, the
largest resolution that fits at this length, a bounded policy for ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .backbone import BackboneSpec
from .errors import MemoryBudgetError
from .policies import TRAINING_WINDOW, CachePolicy, make_policy, resolve_labels
from .plan import PLAN_SLICE_BYTES
from .retention import make_tracker
from .rope import pooled_grid

GiB = 1024**3
MiB = 1024**2
LATENT_ITEMSIZE = 4  # initial noise and output latents are float32
TAIL_FRAMES = TRAINING_WINDOW  # committed latents a sampler / AR_STATE keeps for recache (the one definition)


@dataclass(frozen=True)
class RunEstimate:
    """Bytes a run needs on its device (see the module docstring for the phases).

    ``kv_bytes``: K and V of all layers at steady state, the current chunk's slot included.
    ``total_bytes`` is the peak over the phases plus the weights (when given).
    """

    policy: str
    latent_frames: int
    kv_bytes: int
    kv_bytes_by_type: dict[str, int]
    attended_tokens: float  # mean keys a query attends to at steady state, over all heads
    stored_tokens: float  # mean keys a head stores at steady state
    tokens_per_frame: int
    activation_bytes: int  # one chunk's forward: hidden states, projections, feed-forward
    text_bytes: int  # cross-attention K/V of the prompt(s) held during sampling
    weights_bytes: int = 0
    notes: tuple[str, ...] = field(default=())
    attention_bytes: int = 0  # RoPE tables + gathered/rotated K and V of a layer's head groups
    latent_bytes: int = 0  # initial noise + output latents of the new frames (grow with the length)
    state_bytes: int = 0  # the captured AR_STATE, when it shares the device's memory
    input_state_bytes: int = 0  # an AR_STATE being continued, when it shares the device's memory
    output_copy_bytes: int = 0  # the caller's copies of the output after the run
    text_encode_bytes: int = 0  # text encoder temporaries at a prompt switch
    extra_bytes: int = 0
    extra_label: str = ""

    @property
    def phases(self) -> dict[str, int]:
        held = self.latent_bytes + self.input_state_bytes
        return {
            "run": held + self.kv_bytes + self.activation_bytes + self.attention_bytes + self.text_bytes
            + self.extra_bytes,
            "switch": held + self.kv_bytes + 2 * self.text_bytes + self.text_encode_bytes,
            "capture": held + self.kv_bytes + self.state_bytes,
            "finish": held + self.state_bytes + self.output_copy_bytes,
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

    def breakdown(self) -> str:
        parts = [("KV cache", self.kv_bytes), ("activations", self.activation_bytes),
                 ("attention/RoPE", self.attention_bytes), ("text", self.text_bytes),
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
            f"activations ≈ {self.activation_bytes / GiB:.2f} GiB, attention/RoPE {self.attention_bytes / GiB:.2f} GiB, "
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


def estimate_run(spec: BackboneSpec, policy: CachePolicy | str, *, latent_frames: int, latent_height: int,
                 latent_width: int, frames_per_block: int = 3, batch: int = 1,
                 dtype: torch.dtype = torch.bfloat16, weights_bytes: int = 0, new_frames: int | None = None,
                 capture_state: bool = True, state_on_device: bool = False, input_state_bytes: int = 0,
                 output_copies: int = 0, text_tokens: int | None = None, extra_bytes: int = 0,
                 extra_label: str = "") -> RunEstimate:
    """What a run of ``policy`` holds (see the module docstring).

    ``latent_frames``: frames the cache must cover (old + new when continuing); ``new_frames``
    (default: all) the frames whose noise and output the run holds; ``capture_state``: an
    AR_STATE is captured at the end, ``state_on_device``: the CPU copies of states count (a CPU
    device); ``input_state_bytes``: a state being continued that shares the device's memory;
    ``output_copies``: full-length latent copies the caller makes afterwards.
    """
    pol = make_policy(policy) if isinstance(policy, str) else policy
    pol = resolve_labels(pol, spec.num_layers, spec.num_heads)
    pol.validate(frames_per_block)
    types = pol.head_types(spec.num_layers, spec.num_heads)
    rules = pol.rule_map
    gh, gw = spec.token_grid(latent_height, latent_width)
    pol.check_grid((gh, gw))  # a merge patch that does not divide the grid: refused here, before any model loads
    tokens = gh * gw
    new = latent_frames if new_frames is None else new_frames

    def tokens_of(pool: int) -> int:
        ph, pw = pooled_grid(gh, gw, pool)
        return ph * pw

    itemsize = torch.finfo(dtype).bits // 8
    per_token = batch * spec.head_dim * 2 * itemsize  # K and V of one head
    by_type: dict[str, int] = {}
    stored_sum = attended_sum = 0
    budgets = {}
    for row in types:
        for t in set(row):
            heads = row.count(t)
            budget = budgets.setdefault(t, make_tracker(rules[t], frames_per_block).budget(latent_frames, tokens_of))
            by_type[t] = by_type.get(t, 0) + heads * budget.stored * per_token
            stored_sum += heads * budget.stored
            attended_sum += heads * budget.attended
    alloc = sum(by_type.values())  # what a captured state copies: every pool
    s = batch * frames_per_block * tokens  # query tokens of one chunk
    attention = 0
    if not pol.keys_stay_in_place():
        # per-chunk buffers [layers, B, sequences, keys, D] for K and V (+ an additive mask): every sequence
        # puts the chunk's keys at one offset, after the longest history that precedes them
        width = max(b.before for b in budgets.values()) + frames_per_block * tokens + \
            max(b.after for b in budgets.values())
        classes = frames_per_block if pol.key_sets_differ_by_query_frame(frames_per_block) else 1
        sequences = spec.num_heads * classes
        attention += spec.num_layers * batch * sequences * int(width) * (2 * spec.head_dim + 1) * itemsize
        attention += 2 * spec.num_layers * s * spec.dim * itemsize  # the clean pass's staged raw K/V
        # planning: one slice of a type's gathered K and V (float32) and their rotation temporaries
        heads_of = {}
        for row in types:
            for t in row:
                heads_of[t] = heads_of.get(t, 0) + 1
        gathered = max(heads_of[t] * (b.before + b.after) for t, b in budgets.items()) * batch * spec.head_dim * 4
        attention += 4 * min(PLAN_SLICE_BYTES, int(gathered))
    attention += s * spec.dim * 4 * 4  # a model call's rotated queries and keys (float32), packed queries, output
    n_heads = spec.num_layers * spec.num_heads
    act = itemsize * s * (spec.dim * 6 + spec.ffn_width * 2)  # residual, norms/modulation, q/k/v/o, FFN hidden
    text_len = spec.text_len
    text = spec.num_layers * 2 * batch * text_len * spec.dim * itemsize
    text_encode = batch * text_len * (spec.text_dim + 3 * spec.dim) * itemsize
    latents = 2 * latent_bytes(spec, new, latent_height, latent_width, batch)  # noise + output
    state = 0
    if capture_state and state_on_device:
        ctx_tokens = text_tokens if text_tokens is not None else text_len
        state = (alloc + latent_bytes(spec, min(TAIL_FRAMES, latent_frames), latent_height, latent_width, batch)
                 + batch * ctx_tokens * spec.text_dim * 4)
    # each copy the caller makes (e.g. ComfyUI's ``process_latent_out``: ``x * std + mean``) briefly holds
    # a temporary of the same size next to its result
    copies = 2 * output_copies * latent_bytes(spec, new, latent_height, latent_width, batch)
    by_type = {t: int(round(b)) for t, b in by_type.items()}  # whole bytes (budgets may be averages)
    return RunEstimate(pol.preset, latent_frames, sum(by_type.values()), by_type, attended_sum / n_heads,
                       stored_sum / n_heads, tokens, act, text, weights_bytes,
                       (pol.note,) if pol.note else (), attention_bytes=int(attention), latent_bytes=latents,
                       state_bytes=state, input_state_bytes=input_state_bytes if state_on_device else 0,
                       output_copy_bytes=copies, text_encode_bytes=text_encode, extra_bytes=extra_bytes,
                       extra_label=extra_label)


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
