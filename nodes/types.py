"""Custom ComfyUI socket types of the pack (one place; see docs/nodes.md).

Every value that travels on these sockets is immutable (ComfyUI caches node outputs and may
hand the same object to several consumers): never mutate one, build a new one.

* ``KV_POLICY`` — a :class:`headforcing_core.policies.CachePolicy` (frozen dataclass): which
  history every attention head keeps and at which RoPE positions. Made by
  ``HeadForcingCachePolicy``; read by ``HeadForcingARSampler``.

Types added by the other parts of the pack go below, one line each, same style:

* ``HEAD_PROFILE`` — per-(layer, head) statistics and labels (head profiling nodes).
* ``PROMPT_SCHEDULE`` — ordered prompt segments (multi-prompt nodes).
* ``AR_STATE`` — a finished run's cache and position, for continue nodes.
"""
from __future__ import annotations

from comfy_api.latest import io

KV_POLICY = io.Custom("KV_POLICY")

HEAD_PROFILE = io.Custom("HEAD_PROFILE")  # headforcing_core.profiling.HeadProfile (frozen dataclass)
PROMPT_SCHEDULE = io.Custom("PROMPT_SCHEDULE")  # headforcing_core.prompts.PromptSchedule (frozen dataclass)
AR_STATE = io.Custom("AR_STATE")  # headforcing_core.state.ARState (frozen; CPU tensors; continuing copies it)
