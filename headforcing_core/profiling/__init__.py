"""Head profiling: measure every attention head during a calibration rollout, classify it in
the Head Forcing (local / anchor / memory) and Pyramid Forcing (anchor / wave / veil)
taxonomies, and save / load / ship the result as a head profile.

    from headforcing_core.profiling import profile_heads, save_profile, load_profile
    profile = profile_heads(backbone, [ctx1, ctx2], frames=21, latent_height=60, latent_width=104, seed=0)
    policy = make_policy("head_forcing", labels=profile.labels)
    pyramid = profile.classify("pyramid_forcing", period_threshold=6.4)   # no new rollout
    save_profile(profile, profile_path(folder, "self_forcing"))

See docs/profiling.md for the statistics, the classifiers and the file format.
"""

from .classify import (CLASSIFIED_TAXONOMIES, HeadForcingThresholds, PyramidThresholds, classify_head_forcing,
                       classify_pyramid, pyramid_decisions, thresholds_for)
from .profile import HeadProfile, classify_profile, describe_shape, estimate_profile, profile_heads
from .profile_io import (PRESET_PREFIX, FOLDER_NAME, is_preset, list_profiles, load_profile, preset_names,
                         preset_profile, resolve_profile, profile_path, save_profile)
from .stats import AttentionCollector, FrameStats, HeadSummary, dominant_period, summarize

__all__ = [
    "profile_heads", "estimate_profile", "HeadProfile", "classify_profile", "describe_shape", "CLASSIFIED_TAXONOMIES",
    "HeadForcingThresholds", "PyramidThresholds", "classify_head_forcing", "classify_pyramid", "pyramid_decisions",
    "thresholds_for", "FrameStats", "HeadSummary", "AttentionCollector", "summarize", "dominant_period",
    "save_profile", "load_profile", "profile_path", "list_profiles", "preset_names", "preset_profile",
    "is_preset", "resolve_profile", "PRESET_PREFIX", "FOLDER_NAME",
]
