"""HeadForcingARSampler: chunk-wise autoregressive sampling of a Self Forcing / Causal Forcing model."""
from __future__ import annotations

from comfy_api.latest import io

from headforcing_core.policies import PRESETS

from . import comfy_bridge as bridge
from . import messages
from .types import AR_STATE, KV_POLICY, PROMPT_SCHEDULE

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION


class HeadForcingARSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingARSampler",
            display_name="Head Forcing AR Sampler",
            category="sampling/head_forcing",
            description=(
                "Generates a video autoregressively, chunk by chunk, with a Self Forcing / Causal Forcing "
                "(Wan2.1-T2V distilled) model and a head-aware KV cache. No CFG, no negative prompt. "
                "Outputs a LATENT for VAEDecode (T latent frames decode to 4T-3 frames at 16 fps). With an "
                "initial_latent it starts from an image or extends a video, and outputs only the new frames."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="A Self Forcing, Causal Forcing or LongLive checkpoint (Wan2.1-T2V-1.3B shape) from "
                            "'Load Diffusion Model'. Other model families are refused."),
                io.Conditioning.Input(
                    "conditioning", optional=True,
                    tooltip="The prompt: CLIPTextEncode with the umT5-XXL text encoder (CLIPLoader type 'wan'). "
                            "Positive only: these distilled models run without CFG. Not needed when a "
                            "prompt_schedule is connected."),
                io.Int.Input(
                    "width", default=832, min=16, max=MAX_RESOLUTION, step=16,
                    tooltip="Video width in pixels, a multiple of 16. The models were trained at 832x480."),
                io.Int.Input(
                    "height", default=480, min=16, max=MAX_RESOLUTION, step=16,
                    tooltip="Video height in pixels, a multiple of 16."),
                io.Int.Input(
                    "length", default=81, min=1, max=1_000_000, step=1,
                    tooltip="Video length in the unit of 'length_unit'. Frames are rounded down to 4k+1 "
                            "(81 frames = 21 latent frames = 5 s; 961 = 60 s). Seconds give 16*s+1 frames. With an "
                            "initial_latent it counts the whole video, the initial frames included."),
                io.Int.Input(
                    "seed", default=0, min=0, max=bridge.MAX_SEED, control_after_generate=True,
                    tooltip="Initial noise seed (same noise as KSampler's for an empty latent of this size); "
                            "the re-noising between steps uses seed+1."),
                # optional: an API prompt may leave these out and gets the defaults
                KV_POLICY.Input(
                    "kv_policy", optional=True,
                    tooltip="A cache policy from 'Head Forcing Cache Policy'. When connected it replaces the "
                            "'policy' dropdown."),
                io.Combo.Input(
                    "length_unit", options=list(bridge.LENGTH_UNITS), default="frames", optional=True,
                    tooltip="'frames': length counts video frames. 'seconds': length counts seconds at 16 fps "
                            "(60 -> 961 frames)."),
                io.String.Input(
                    "steps", default=bridge.DEFAULT_STEPS, optional=True,
                    tooltip="Comma-separated nominal timesteps, highest first. Self Forcing / Causal Forcing "
                            "use 1000,750,500,250; they are warped through the shifted schedule "
                            "(-> about 1000, 937.5, 833.3, 625). Each chunk also gets one clean pass. Used with "
                            "model_preset 'custom'."),
                io.Float.Input(
                    "shift", default=bridge.DEFAULT_SHIFT, min=0.01, max=100.0, step=0.01, optional=True,
                    tooltip="Flow-matching shift of the schedule. 5.0 is Self Forcing's training value; "
                            "ComfyUI's Wan default of 8.0 (ModelSamplingSD3) is wrong for these models. Used with "
                            "model_preset 'custom'."),
                io.Int.Input(
                    "frames_per_block", default=3, min=1, max=21, optional=True,
                    tooltip="Latent frames generated per chunk: 3 for chunk-wise checkpoints, 1 for frame-wise "
                            "ones. A last chunk may be shorter. Used with model_preset 'custom'."),
                io.Combo.Input(
                    "policy", options=list(PRESETS), default=bridge.DEFAULT_SAMPLER_POLICY, optional=True,
                    tooltip="KV-cache preset used when no kv_policy is connected. self_forcing_window keeps "
                            "the last 21 latent frames (identical to 'full', i.e. Self Forcing, up to 81 "
                            "frames; bounded beyond). Use the Cache Policy node to tune a policy."),
                PROMPT_SCHEDULE.Input(
                    "prompt_schedule", optional=True,
                    tooltip="Several prompts in a row (Prompt Segment / Prompt Schedule From Text). When "
                            "connected it replaces 'conditioning' and 'length': the video is the schedule's "
                            "segments with their transitions (after the initial latent, if one is connected)."),
                # added last so that workflows saved before them keep their widget values in place
                io.Latent.Input(
                    "initial_latent", optional=True,
                    tooltip="Start from existing frames: VAEEncode (Wan 2.1 VAE) of an image (image-to-video, "
                            "needs a frame-wise model: frames per block 1) or of a video's frames (extension: a "
                            "whole number of chunks, e.g. 9, 21, 33 ... 81 frames with 3-frame chunks). They are put "
                            "into the cache first, at the same size as width x height. 'length' then counts the "
                            "whole video; the LATENT output holds only the NEW frames: join them after the initial "
                            "latent with LatentConcat (dim t) and decode once."),
                io.Combo.Input(
                    "model_preset", options=list(bridge.MODEL_PRESETS), default=bridge.CUSTOM_PRESET, optional=True,
                    tooltip="The sampling settings of a public checkpoint, from its own inference config: "
                            "frames per block, steps, first-chunk steps and shift. Any preset but 'custom' REPLACES "
                            "the frames_per_block, steps, first_chunk_steps and shift widgets (the report says "
                            "which values it used and which widget values it replaced); 'custom' uses the widgets. "
                            "Self Forcing / Causal Forcing chunk-wise / LongLive: 3, 1000,750,500,250, none, 5. "
                            "Causal Forcing frame-wise 4-step: 1, 1000,750,500,250, none, 5. Causal Forcing++ "
                            "frame-wise 2-step: 1, 1000,500, first chunk 1000,750,500,250, 5; 1-step: 1, 1000, "
                            "first chunk 1000,750,500,250, 5."),
                io.String.Input(
                    "first_chunk_steps", default="", optional=True,
                    tooltip="Step list of the first GENERATED chunk (after an initial latent: the first new one), "
                            "like 'steps'; empty = the same steps as every chunk. Causal Forcing++ 1- and 2-step "
                            "models run their first chunk with 1000,750,500,250 "
                            "(denoising_step_list_first_chunk). Used with model_preset 'custom'."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent",
                                 tooltip="Clean video latent [1, 16, T, H/8, W/8] for VAEDecode. With an "
                                         "initial_latent: the new frames only (LatentConcat them after it)."),
                io.String.Output(display_name="report",
                                 tooltip="What was used (model preset, frames per block, steps, first-chunk steps, "
                                         "shift, initial latent frames), policy, memory estimate and timing."),
                AR_STATE.Output(display_name="ar_state",
                                tooltip="The finished run (cache, position, RNG state) for Head Forcing Continue "
                                        "or Save AR State. Held in CPU memory (about the KV cache's size)."),
            ],
        )

    @classmethod
    def execute(cls, model, width, height, length, seed, conditioning=None, kv_policy=None, length_unit="frames",
                steps=bridge.DEFAULT_STEPS, shift=bridge.DEFAULT_SHIFT, frames_per_block=3,
                policy=bridge.DEFAULT_SAMPLER_POLICY, prompt_schedule=None, initial_latent=None,
                model_preset=bridge.CUSTOM_PRESET, first_chunk_steps="") -> io.NodeOutput:
        with messages.live_panel():  # per-chunk progress events for the browser panel (web/headforcing.js)
            latent, report, state = bridge.run_ar_sampler(
                model, conditioning, kv_policy=kv_policy, policy_preset=policy, width=width, height=height,
                length=length, length_unit=length_unit, seed=seed, steps=steps, shift=shift,
                frames_per_block=frames_per_block, prompt_schedule=prompt_schedule, initial_latent=initial_latent,
                model_preset=model_preset, first_chunk_steps=first_chunk_steps)
        return io.NodeOutput(latent, report, state)
