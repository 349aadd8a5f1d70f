"""Head Forcing core: head-aware KV caches for autoregressive video diffusion (pure PyTorch).

Never imports ComfyUI. The main entry point is :func:`generate`::

    from headforcing_core import generate
    latents = generate(backbone, context, noise, steps=(1000, 750, 500, 250), shift=5.0,
                       frames_per_block=3, policy="full", generator=None)
"""

from .backbone import BackboneSpec, WanRunner, inspect_backbone
from .errors import (CheckpointError, HeadForcingError, Interrupted, MemoryBudgetError, ModelFamilyError,
                     PolicyError, ProfileError, ShapeError, StateError)
from .policies import CachePolicy, HeadLabels, RetentionRule, make_policy
from .prompts import PromptSchedule, PromptSegment
from .sampler import ARSampler, Hooks, generate
from .schedule import FlowMatchSchedule
from .schedule_text import parse_schedule_text
from .state import ARState
from .state_file import load_state, save_state
from .story import continue_generation, generate_schedule
from .wan_model import WanBackbone, WanConfig, random_backbone

__version__ = "0.1.0"

__all__ = [
    "generate", "generate_schedule", "continue_generation", "PromptSchedule", "PromptSegment",
    "parse_schedule_text", "ARState", "save_state", "load_state", "ARSampler", "Hooks", "FlowMatchSchedule", "WanRunner", "BackboneSpec", "inspect_backbone",
    "WanBackbone", "WanConfig", "random_backbone", "CachePolicy", "HeadLabels", "RetentionRule", "make_policy",
    "HeadForcingError", "ModelFamilyError", "ShapeError", "PolicyError", "ProfileError", "CheckpointError",
    "MemoryBudgetError", "StateError", "Interrupted",
]
