"""HeadForcingCachePolicy: choose and tune a head-aware KV-cache policy (KV_POLICY).

:func:`policy_output` is what the node outputs for its widget values; the browser's memory figure
(``GET /headforcing/estimate``, ``nodes/routes.py``) calls the same function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from comfy_api.latest import io

from headforcing_core.backbone import BackboneSpec
from headforcing_core.policies import PRESETS, CachePolicy, make_policy

from .comfy_bridge import (MODEL_SHAPES, PYRAMID_DEFAULTS, ROPE_CHOICES, TYPED_PRESETS, WAN_1_3B_LAYOUT, build_policy,
                           check_profile, policy_summary, profile_labels, profile_spec, shape_spec)
from .types import HEAD_PROFILE, KV_POLICY

_HEAD_FORCING = make_policy("head_forcing").rule_map["memory"].middle  # episodic defaults


_PYRAMID_TOOLTIPS = {  # Pyramid Forcing's names (configs/pyramid-forcing.yaml) and meanings
    "anchor_sink_frames": "pyramid_forcing: sink frames of Anchor heads (label 1), captured from the first chunk "
                          "(pyramidkv_label_sink_frames_map).",
    "wave_sink_frames": "pyramid_forcing: sink frames of Wave heads (label -1).",
    "veil_sink_frames": "pyramid_forcing: sink frames of Veil heads (label 2).",
    "pyramid_recent_frames": "pyramid_forcing: recent frames of every head, COUNTING the current chunk (4 = one "
                             "history frame + a 3-frame chunk; pyramidkv_label_recent_frames_map). Must be above "
                             "frames per block.",
    "stride_interval": "pyramid_forcing, Anchor heads: keep committed frames whose index is a multiple of this "
                       "(the strided middle).",
    "stride_capacity": "pyramid_forcing, Anchor heads: how many strided frames (newest first; frame 0 counts).",
    "cyclic_period": "pyramid_forcing, Wave heads: period of the phase buckets (frame index mod period); a query "
                     "frame reads its own phase's bucket.",
    "cyclic_bucket_capacity": "pyramid_forcing, Wave heads: frames kept per phase bucket.",
    "merge_patch": "pyramid_forcing, Veil heads: merged blocks are patch×patch frames (aligned to frame indices) "
                   "averaged over patch×patch spatial windows. Must divide the latent patch grid.",
    "merge_capacity": "pyramid_forcing, Veil heads: how many completed merged blocks are kept.",
    "sink_time_clamp_min": "window_clamp RoPE: sinks and strided/cyclic frames of query frame t sit at "
                           "max(0, t - clamp(t, min, max)) (sink_time_clamp_min).",
    "sink_time_clamp_max": "window_clamp RoPE: the upper clamp (21: those frames stay 21 frames behind the query).",
}


def pyramid_inputs() -> list:
    # optional: prompts and workflows made before these widgets existed still run with the defaults
    return [io.Int.Input(name, default=PYRAMID_DEFAULTS[name], min=0 if name.endswith("sink_frames") else 1,
                         max=1024, optional=True,
                         tooltip=tip + f" Pyramid Forcing's default: {PYRAMID_DEFAULTS[name]}.")
            for name, tip in _PYRAMID_TOOLTIPS.items()]


class HeadForcingCachePolicy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingCachePolicy",
            display_name="Head Forcing Cache Policy",
            category="sampling/head_forcing",
            description=(
                "Which history every attention head keeps while the AR sampler generates, and at which "
                "RoPE positions. Bounded presets keep memory constant however long the video is. Feed "
                "the KV_POLICY output to Head Forcing AR Sampler."
            ),
            inputs=[
                io.Combo.Input(
                    "preset", options=list(PRESETS), default="head_forcing",
                    tooltip="full: keep everything (Self Forcing; only up to 21 latent frames = 81 frames). "
                            "self_forcing_window: last 21 frames. sink_window: 3 first + 9 last frames for every "
                            "head (ours, positions renumbered into the last 21). longlive: LongLive's interactive window, "
                            "12 frames: 3 sink + the 6 before the chunk + the chunk, absolute positions (its recache "
                            "defaults to LongLive's). pyramid_forcing: Anchor/Wave/Veil heads exactly as Pyramid "
                            "Forcing's code runs them (its parameters below). head_forcing: Local/Anchor/Memory "
                            "heads with episodic memory (long videos)."),
                io.Combo.Input(
                    "rope", options=list(ROPE_CHOICES), default="preset default",
                    tooltip="How kept frames are positioned. absolute: true frame index (Self Forcing, "
                            "LongLive). window_clamp: Pyramid Forcing's dynamic RoPE - sinks and strided / "
                            "cyclic frames sit 21 frames behind the query frame (clamp below), recent frames at "
                            "their own time. window_shift: the visible window renumbered into the last 21 "
                            "frames, sinks at its start. compact: each head's kept frames renumbered right "
                            "before the chunk (Head Forcing). 'preset default' uses the preset's own mode."),
                io.Int.Input(
                    "sink_frames", default=-1, min=-1, max=64,
                    tooltip="First latent frames kept as attention sinks (sink_window, longlive; anchor and "
                            "memory heads of head_forcing). -1: the preset's value (3). Ignored by full, "
                            "self_forcing_window and pyramid_forcing (its own sink widgets below)."),
                io.Int.Input(
                    "recent_frames", default=-1, min=-1, max=1024,
                    tooltip="Most recent latent frames kept (memory heads for head_forcing; every head for "
                            "sink_window and longlive; the window size incl. the current chunk for "
                            "self_forcing_window). -1: the preset's value (head_forcing: 6, or 2 on a model "
                            "without a profile or published labels, where every head is a memory head). Ignored "
                            "by full and pyramid_forcing (pyramid_recent_frames below)."),
                io.Int.Input(
                    "memory_episodes", default=_HEAD_FORCING.cap, min=1, max=256,
                    tooltip="head_forcing only: most episodes (pooled summaries of older frames) a memory "
                            "head keeps; past it the two most similar neighbours merge."),
                io.Float.Input(
                    "memory_similarity", default=_HEAD_FORCING.similarity, min=-1.0, max=1.0, step=0.01,
                    tooltip="head_forcing only: cosine similarity of keys at or above which an evicted "
                            "frame joins the open episode; below it a new episode starts (a scene change)."),
                io.Int.Input(
                    "width", default=832, min=16, max=16384, step=16,
                    tooltip="For the memory figure only: video width the estimate is computed for."),
                io.Int.Input(
                    "height", default=480, min=16, max=16384, step=16,
                    tooltip="For the memory figure only: video height the estimate is computed for."),
                io.Int.Input(
                    "length", default=961, min=1, max=1_000_000, step=4,
                    tooltip="For the memory figure only: video frames (961 = 60 s at 16 fps)."),
                *pyramid_inputs(),
                HEAD_PROFILE.Input(
                    "head_profile", optional=True,
                    tooltip="Head labels from Profile Heads / Load Head Profile: they type every head for the "
                            "pyramid_forcing and head_forcing presets (the profile's labels of that taxonomy). "
                            "Other presets ignore them. Without a profile those presets use default labels."),
                # added last so that workflows saved before it keep their widget values in place
                io.Combo.Input(
                    "model_shape", options=list(MODEL_SHAPES), default=WAN_1_3B_LAYOUT, optional=True,
                    tooltip="For the memory figure only, when no head_profile is connected: the model it is "
                            "computed for. Wan 2.1 1.3B: Self Forcing, Causal Forcing, LongLive (30 layers x 12 "
                            "heads). Wan 2.1 14B: Krea Realtime 14B (40 x 40). With a profile, the profile's "
                            "model. The policy itself fits any model."),
            ],
            outputs=[
                KV_POLICY.Output(display_name="kv_policy",
                                 tooltip="The cache policy, for Head Forcing AR Sampler's kv_policy input."),
                io.String.Output(display_name="summary",
                                 tooltip="What each head type keeps and the KV memory it needs at the given "
                                         "size (the model_shape's or the profile's model, bf16, 3 frames per "
                                         "block)."),
            ],
        )

    @classmethod
    def execute(cls, preset, rope, sink_frames, recent_frames, memory_episodes, memory_similarity, width,
                height, length, head_profile=None, model_shape=WAN_1_3B_LAYOUT, **pyramid) -> io.NodeOutput:
        out = policy_output(dict(preset=preset, rope=rope, sink_frames=sink_frames, recent_frames=recent_frames,
                                 memory_episodes=memory_episodes, memory_similarity=memory_similarity, width=width,
                                 height=height, length=length, model_shape=model_shape, **pyramid), head_profile)
        return io.NodeOutput(out.policy, out.summary)


@dataclass(frozen=True)
class PolicyOutput:
    policy: CachePolicy
    summary: str
    spec: BackboneSpec  # the model shape of the summary's memory figure (the profile's, else model_shape's)


def policy_output(values: Mapping, head_profile=None) -> PolicyOutput:
    """The Cache Policy node's outputs for its widget ``values`` (by input name; Pyramid Forcing's may be
    left out) and an optional HEAD_PROFILE, whose labels type the heads of the typed presets."""
    preset = values["preset"]
    labels = profile_labels(head_profile, preset)
    pyramid = {k: values[k] for k in PYRAMID_DEFAULTS if k in values}
    policy = build_policy(preset, rope=values["rope"], sink_frames=values["sink_frames"],
                                 recent_frames=values["recent_frames"], memory_episodes=values["memory_episodes"],
                                 memory_similarity=values["memory_similarity"], labels=labels, pyramid=pyramid)
    spec = profile_spec(head_profile) if labels is not None else None
    model_shape = values.get("model_shape") or WAN_1_3B_LAYOUT
    summary = policy_summary(policy, width=values["width"], height=values["height"], frames=values["length"],
                             spec=spec, model_shape=model_shape)
    return PolicyOutput(policy, summary + profile_note(head_profile, preset), spec or shape_spec(model_shape))


def profile_note(head_profile, preset: str) -> str:
    """The summary's line on the connected profile: whose labels the preset uses, or that it ignores them."""
    if head_profile is None:
        return ""
    head_profile = check_profile(head_profile)
    if preset not in TYPED_PRESETS:
        return f"\nhead profile {head_profile.display_name}: ignored by the {preset} preset (it treats all heads alike)"
    lab = head_profile.labels_for(preset)
    counts = ", ".join(f"{t} {n}" for t, n in lab.counts().items())
    return f"\nhead labels from profile {head_profile.display_name} ({lab.source}): {counts}"
