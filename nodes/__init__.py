"""Thin ComfyUI adapters of Head Forcing (V3 schema). No algorithm lives here.

Imports point one way only (``tests/core/test_architecture.py`` fails on a cycle):

    __init__.py of the pack (the entry point: registers the nodes, the HTTP routes, the web folder)
      → node modules, one per concern: sampler, continuation (→ prompts, whose segment widgets it
        shares), states, prompts, policy, routes (the policy node's HTTP twin → policy), profiling
        → run            the run sequence of every node that runs the model: pre-flight and load,
                         progress, interrupt, previews, the live panel, the report
        → comfy_bridge   ComfyUI values → checked core arguments (loads without ComfyUI)
        → files          the pack's folders and user-named files
        → heat_map       the heat-map PNG (PIL)
        → types          the custom socket types
          → messages       what the browser gets: panel events, the head map and its palette
          → model_patches  what a MODEL's patches ask for, for the report
            → headforcing_core

No module here imports this package's ``__init__`` (write ``from .module import name``: the test reads
``from . import module`` as an import of the package). The core is imported as the top-level
package ``headforcing_core`` (the pack's entry point puts the pack folder on ``sys.path``), so
tests, the Python API and ComfyUI share one copy.

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
from .continuation import HeadForcingContinue
from .states import HeadForcingLoadARState, HeadForcingSaveARState

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
