"""The AR sampler with Krea Realtime's loop (model_preset "Krea Realtime 14B"): docs/krea.md.

:func:`run_krea_sampler` is the sampler node's work when its preset runs Krea's loop: check every input,
resolve the run once (:func:`headforcing_core.krea.resolve_krea`), pre-flight (the rebuilt cache and Krea's
own terms, :func:`headforcing_core.krea.estimate_krea`) and load the model together with the VAE, draw
Krea's noise, run :class:`headforcing_core.krea.KreaSampler`, report.

:class:`ComfyContextVAE` gives the core the VAE side of Krea's context re-encode over a ComfyUI VAE: a
*streaming* decode (the decoder's causal cache kept from block to block, as Krea's server decodes) and the
encode of one frame alone. It drives the VAE module ComfyUI loaded (``comfy.ldm.wan.vae.WanVAE``: its
``conv2`` / ``decoder`` with a feature cache, and ``encode``) — the same calls its own ``decode`` /
``encode`` make for a whole video (ComfyUI 0.3.75), without their memory management, which could unload
the diffusion model in the middle of a run: the VAE is loaded with the model by the pre-flight instead.
``tests/e2e`` checks the streaming decode against ComfyUI's ``VAE.decode`` of the whole latent.
"""
from __future__ import annotations

import torch

from headforcing_core.backbone import WanRunner
from headforcing_core.errors import ModelFamilyError, PolicyError, ShapeError
from headforcing_core.geometry import FPS, video_frames_for
from headforcing_core.krea import FIRST_LATENT_TEXT, KreaSampler, KreaSettings, estimate_krea, resolve_krea
from headforcing_core.noise import krea_generator, krea_initial_noise
from headforcing_core.prompts import PromptSchedule

from .comfy_bridge import SamplerRequest, compute_dtype, count_noun, describe_pixels, describe_schedule_length
from .run import ModelRun, finish_report, memory_line, schedule_report

WAN21_LATENT_CHANNELS = 16


class ComfyContextVAE:
    """Krea's :class:`~headforcing_core.krea.ContextVAE` over a ComfyUI VAE (``comfy.sd.VAE``) and the MODEL
    whose latent space the sampler works in (``process_latent_out`` / ``process_latent_in``: Wan 2.1's
    per-channel mean and std, Krea's ``VAEEncoderWrapper`` / ``VAEDecoderWrapper`` scaling)."""

    def __init__(self, vae, model):
        check_context_vae(vae)
        from comfy.ldm.wan.vae import count_conv3d

        self.vae, self.model = vae, model
        self.module = vae.first_stage_model
        self.feat_cache = [None] * count_conv3d(self.module.decoder)  # the stream's causal state

    @property
    def device(self):
        return self.vae.device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next latent frames (model space ``[B, 16, f, h, w]``) → their frames ``[B, F, 3, H, W]`` in
        [0, 1] (``VAE.process_output``; Krea clamps the same frames to [-1, 1])."""
        vae, m = self.vae, self.module
        raw = self.model.model.process_latent_out(latents.float()).to(vae.device, vae.vae_dtype)
        x = m.conv2(raw)
        frames = [m.decoder(x[:, :, i:i + 1], feat_cache=self.feat_cache, feat_idx=[0]) for i in range(x.shape[2])]
        return vae.process_output(torch.cat(frames, dim=2).float()).movedim(2, 1)

    @torch.no_grad()
    def encode(self, frame: torch.Tensor) -> torch.Tensor:
        """One frame ``[B, 3, H, W]`` in [0, 1] → its latent ``[B, 16, 1, h, w]`` in the model's space, encoded
        alone (the causal encoder's first-frame path, as Krea's ``encode_video_latent`` of one frame)."""
        vae = self.vae
        pixels = vae.process_input(frame)[:, :, None].to(vae.device, vae.vae_dtype)
        mu = self.module.encode(pixels).float()
        return self.model.model.process_latent_in(mu)


def check_context_vae(vae) -> None:
    """The VAE must be Wan 2.1's (16 latent channels, ComfyUI's ``comfy.ldm.wan.vae.WanVAE``)."""
    module = getattr(vae, "first_stage_model", None)
    if module is None or not all(hasattr(module, n) for n in ("decoder", "conv2", "encode")):
        raise ModelFamilyError(f"vae must come from 'Load VAE', got {type(vae).__name__}")
    if getattr(vae, "latent_channels", None) != WAN21_LATENT_CHANNELS or type(module).__module__ != "comfy.ldm.wan.vae":
        raise ModelFamilyError(
            f"the vae is not the Wan 2.1 VAE ({type(module).__module__}.{type(module).__name__}, "
            f"{getattr(vae, 'latent_channels', '?')} latent channels): load wan_2.1_vae.safetensors")


def vae_dtype_on(vae, model):
    """The VAE's compute dtype when it runs on the model's device (its streaming state counts there), else None."""
    return vae.vae_dtype if torch.device(vae.device) == torch.device(model.load_device) else None


def run_krea_sampler(model, module, spec, schedule: PromptSchedule, req: SamplerRequest, settings: KreaSettings, *,
                     vae=None, kv_policy=None, policy_preset: str = "", initial_latent=None,
                     prompt_schedule_given: bool = False, report_head=()) -> tuple[dict, str, None]:
    """The sampler's work with Krea's loop: ``({"samples": latents}, report, None)`` (no AR_STATE: the cache is
    rebuilt every block). Refuses, before loading anything: a connected kv_policy or initial_latent (they do not
    apply), a VAE that is not Wan 2.1's, a context past the trained positions."""
    if kv_policy is not None:
        raise PolicyError("Krea's loop rebuilds its cache every block from a few context frames, so a cache policy "
                          f"does not apply: disconnect kv_policy, or choose model_preset 'Krea Realtime 14B, Self "
                          f"Forcing loop' to run the model with a head-aware cache")
    if initial_latent is not None:
        raise ShapeError("initial_latent is not supported by Krea's loop (its server starts from noise here): "
                         "disconnect it, or use a Self Forcing loop preset")
    if vae is not None:
        check_context_vae(vae)
    request = resolve_krea(spec, schedule, settings, batch=1)
    dtype = compute_dtype(model)
    lh, lw = req.height // 8, req.width // 8

    use_vae = vae is not None and request.needs_pixels

    def estimate_at(t: int, h: int, w: int):
        return estimate_krea(spec, settings, latent_frames=t, latent_height=h, latent_width=w, dtype=dtype,
                             vae_dtype=vae_dtype_on(vae, model) if use_vae else None, switches=request.switches > 0,
                             output_copies=1)

    run = ModelRun.load(
        model, spec, estimate_at, dtype=dtype, latent_frames=request.latent_frames, latent_height=lh, latent_width=lw,
        min_frames=settings.frames_per_block, describe_length=describe_schedule_length, describe_size=describe_pixels,
        what="the video", extra_models=[vae.patcher] if use_vae else [])
    device = run.device
    generator = krea_generator(req.seed, device)
    noise = krea_initial_noise((1, spec.in_dim, request.latent_frames, lh, lw), generator, dtype)
    context_vae = ComfyContextVAE(vae, model) if use_vae else None
    sampler = KreaSampler(WanRunner(module, dtype=dtype), settings)
    latents = run.call(lambda hooks: sampler.run(request, noise, generator, context_vae, hooks),
                       model_calls=request.model_calls,
                       panel=dict(total_latent_frames=request.latent_frames, start_frame=0,
                                  frames_per_block=settings.frames_per_block, policy="krea",
                                  latent_format=model.model.latent_format,
                                  segments=[(seg.label, seg.frames) for seg in schedule],
                                  kv_bytes_at=lambda n: run.estimate.kv_bytes, width=req.width, height=req.height))
    frames = video_frames_for(request.latent_frames)
    report = finish_report(model, [
        *report_head,
        f"loop: Krea's (release_server.py GenerationSession): {len(request.blocks)} blocks of "
        f"{settings.frames_per_block} latent frames; before each, the cache is rebuilt from "
        f"{settings.context_frames} context frame(s) at RoPE positions 0.."
        f"{settings.context_frames - 1}, the block at {settings.context_frames}.."
        f"{settings.context_frames + settings.frames_per_block - 1}; {len(settings.steps)} steps "
        f"({','.join(f'{t:g}' for t in settings.schedule().timesteps)}), no clean pass; {request.model_calls} model "
        f"calls",
        f"context's first latent: {settings.first_latent} — {FIRST_LATENT_TEXT[settings.first_latent]}"
        + (" (connect the Wan 2.1 VAE to the sampler's vae input for Krea's own rule)"
           if settings.first_latent == "latent" else ""),
        (f"prompt changes: {count_noun(request.switches, 'change')}, each interpolated over "
         f"{count_noun(settings.interpolation_blocks, 'block')} (Krea's interp_steps)" if request.switches else ""),
        "noise: Krea's draw — all initial noise first ([1, T, 16, h, w] in the model's dtype on the model's device, "
        f"seed {req.seed}), then one draw per step from the same generator",
        f"cache policy: not used (policy '{policy_preset}' ignored: Krea's loop rebuilds its cache every block)"
        if policy_preset else "",
        schedule_report(schedule, 0) if prompt_schedule_given else "",
        *[f"  {n}" for n in run.estimate.notes],
        memory_line(run),
        f"time: {run.seconds:.2f} s, {run.seconds / max(1, len(request.blocks)):.3f} s/block, "
        f"{frames / run.seconds if run.seconds > 0 else 0:.2f} video frames/s ({frames / FPS:.2f} s of video) on "
        f"{run.computed_on()}",
        "AR_STATE: none (Krea's loop keeps no cache to continue from)",
    ])
    return run.latent_output(latents), report, None

