"""Thin ComfyUI adapters of Head Forcing (V3 schema). No algorithm lives here.

Each node declares its schema and hands its inputs to one function of
:mod:`.comfy_bridge`, the only module that converts ComfyUI objects into core arguments.
The core is imported as the top-level package ``headforcing_core`` (the pack's entry point
puts the pack folder on ``sys.path``), so tests, the Python API and ComfyUI share one copy.

To add a node: write it in its own module here, import it below and append it to
``NODE_LIST``. Node ids start with ``HeadForcing`` (newer ComfyUI ships its own
``SamplerARVideo`` / ``EmptyARVideoLatent``).
"""
from __future__ import annotations

from .policy import HeadForcingCachePolicy
from .profiling import (HeadForcingClassifyHeads, HeadForcingLoadHeadProfile, HeadForcingProfileHeads,
                        HeadForcingSaveHeadProfile)
from .sampler import HeadForcingARSampler
from .prompts import HeadForcingPromptScheduleFromText, HeadForcingPromptSegment
from .continuation import HeadForcingContinue, HeadForcingLoadARState, HeadForcingSaveARState

NODE_LIST = [
    HeadForcingCachePolicy,
    HeadForcingARSampler,
    HeadForcingProfileHeads,
    HeadForcingClassifyHeads,
    HeadForcingSaveHeadProfile,
    HeadForcingLoadHeadProfile,
    HeadForcingPromptSegment,
    HeadForcingPromptScheduleFromText,
    HeadForcingContinue,
    HeadForcingSaveARState,
    HeadForcingLoadARState,
]

__all__ = ["NODE_LIST", "HeadForcingARSampler", "HeadForcingCachePolicy", "HeadForcingProfileHeads",
           "HeadForcingClassifyHeads", "HeadForcingSaveHeadProfile", "HeadForcingLoadHeadProfile",
           "HeadForcingPromptSegment", "HeadForcingPromptScheduleFromText", "HeadForcingContinue",
           "HeadForcingSaveARState", "HeadForcingLoadARState"]
