"""Pre-flight memory estimates: what a run will hold, before anything is allocated.

``estimate_run`` derives the KV cache size from the policy's tier capacities
(the same numbers the cache allocates) and adds the transient activations of
one chunk's forward and the prompt's cross-attention K/V. ``check_fits``
refuses a run that cannot fit and says what to lower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backbone import BackboneSpec
from .errors import MemoryBudgetError
from .policies import CachePolicy, make_policy, resolve_labels
from .rope import pooled_grid

GiB = 1024**3


@dataclass(frozen=True)
class RunEstimate:
    """Bytes a run needs. ``kv_bytes``: K and V of all layers at steady state, the current chunk's slot included."""

    policy: str
    latent_frames: int
    kv_bytes: int
    kv_bytes_by_type: dict[str, int]
    attended_tokens: float  # mean keys a query attends to at steady state, over all heads
    stored_tokens: float  # mean keys a head stores at steady state
    tokens_per_frame: int
    activation_bytes: int
    text_bytes: int
    weights_bytes: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.activation_bytes + self.text_bytes + self.weights_bytes

    def describe(self) -> str:
        per_type = ", ".join(f"{t} {b / GiB:.2f}" for t, b in self.kv_bytes_by_type.items())
        lines = [
            f"policy {self.policy}: KV cache {self.kv_bytes / GiB:.2f} GiB ({per_type}) for "
            f"{self.latent_frames} latent frames",
            f"attended keys per query ≈ {self.attended_tokens:.0f} "
            f"({self.attended_tokens / self.tokens_per_frame:.2f} frames)",
            f"activations ≈ {self.activation_bytes / GiB:.2f} GiB, text K/V {self.text_bytes / GiB:.2f} GiB"
            + (f", weights {self.weights_bytes / GiB:.2f} GiB" if self.weights_bytes else ""),
            f"total ≈ {self.total_bytes / GiB:.2f} GiB",
        ]
        return "\n".join(list(self.notes) + lines)


def estimate_run(spec: BackboneSpec, policy: CachePolicy | str, *, latent_frames: int, latent_height: int,
                 latent_width: int, frames_per_block: int = 3, batch: int = 1,
                 dtype: torch.dtype = torch.bfloat16, weights_bytes: int = 0) -> RunEstimate:
    pol = make_policy(policy) if isinstance(policy, str) else policy
    pol = resolve_labels(pol, spec.num_layers, spec.num_heads)
    pol.validate(frames_per_block)
    types = pol.head_types(spec.num_layers, spec.num_heads)
    rules = pol.rule_map
    gh, gw = spec.token_grid(latent_height, latent_width)
    tokens = gh * gw

    def tokens_of(pool: int) -> int:
        ph, pw = pooled_grid(gh, gw, pool)
        return ph * pw

    itemsize = torch.finfo(dtype).bits // 8
    per_token = batch * spec.head_dim * 2 * itemsize  # K and V of one head
    by_type: dict[str, int] = {}
    stored_sum = attended_sum = 0
    max_group_tokens = 0
    for row in types:
        for t in set(row):
            heads = row.count(t)
            budget = rules[t].budget(frames_per_block, latent_frames, tokens_of)
            by_type[t] = by_type.get(t, 0) + heads * budget.stored * per_token
            stored_sum += heads * budget.stored
            attended_sum += heads * budget.attended
            max_group_tokens = max(max_group_tokens, heads * budget.attended)
    n_heads = spec.num_layers * spec.num_heads
    s = frames_per_block * tokens
    act = batch * itemsize * (
        s * (spec.dim * 10 + spec.head_dim * spec.num_heads * 4)  # residual, q/k/v/o, norms, FFN in/out
        + s * 2 * spec.ffn_width  # FFN hidden (and its activation)
        + max_group_tokens * spec.head_dim * 3  # gathered K, roped K and V of the largest group
    ) + batch * spec.in_dim * latent_frames * latent_height * latent_width * 4 * 3  # noise, output, chunk work
    text = spec.num_layers * 2 * batch * spec.text_len * spec.dim * itemsize
    return RunEstimate(pol.preset, latent_frames, sum(by_type.values()), by_type, attended_sum / n_heads,
                       stored_sum / n_heads, tokens, act, text, weights_bytes,
                       (pol.note,) if pol.note else ())


def check_fits(estimate: RunEstimate, free_bytes: int, headroom: float = 0.9) -> None:
    """Raise :class:`MemoryBudgetError` if the run needs more than ``headroom`` of ``free_bytes``."""
    if estimate.total_bytes <= free_bytes * headroom:
        return
    advice = []
    if estimate.kv_bytes > estimate.activation_bytes:
        if estimate.policy in ("full",):
            advice.append("choose a bounded policy (head_forcing, pyramid_forcing or self_forcing_window)")
        advice.append("shorten the video" if estimate.policy == "full" else "lower the sink/recent budgets")
    advice.append("lower the width/height")
    advice.append("use fewer frames per block" if estimate.activation_bytes > estimate.kv_bytes else "")
    advice = [a for a in advice if a]
    raise MemoryBudgetError(
        f"this run needs ≈ {estimate.total_bytes / GiB:.2f} GiB (KV cache {estimate.kv_bytes / GiB:.2f} GiB, "
        f"activations {estimate.activation_bytes / GiB:.2f} GiB, text {estimate.text_bytes / GiB:.2f} GiB"
        + (f", weights {estimate.weights_bytes / GiB:.2f} GiB" if estimate.weights_bytes else "")
        + f") but only {free_bytes / GiB:.2f} GiB is free; " + ", or ".join(advice) + "."
    )
