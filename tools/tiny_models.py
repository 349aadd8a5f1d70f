#!/usr/bin/env python3
"""Tiny random models in the REAL file formats ComfyUI loads.

* ``write_tiny_wan(path)``: a Wan2.1 text-to-video diffusion model, flat safetensors with the
  official key names, that ComfyUI's UNETLoader ("Load Diffusion Model") detects as Wan 2.1
  t2v: dim 256 (2 heads of 128), 2 layers, ffn 512, text_dim 4096, freq_dim 256, in/out 16,
  patch (1, 2, 2).  The parameters come from the pack's own reference backbone
  (``headforcing_core.wan_model``), so the core tests and ComfyUI see the same layout.
* ``write_tiny_wan_scaled_fp8(path)``: the same model as a *scaled-fp8* file, the layout of
  Comfy-Org's ``*_fp8_scaled`` diffusion models that UNETLoader loads with weight_dtype ``default``
  (see :func:`scaled_fp8_state_dict`).
* ``write_tiny_wan_vae(path)``: a Wan 2.1 video VAE with base dim 8 that ComfyUI's VAELoader
  detects as the Wan 2.1 VAE (16 latent channels, 4x time / 8x space).  Its keys and shapes
  are written from a small description of the architecture, so this needs torch and
  safetensors but not ComfyUI.

Random weights give noise videos: these models prove plumbing, not quality.

    python tools/tiny_models.py --wan OUT.safetensors --vae OUT_VAE.safetensors [--wan-scaled-fp8 OUT_FP8.safetensors]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The tiny Wan shape (one place).
TINY_WAN = dict(dim=256, num_heads=2, num_layers=2, ffn_dim=512, text_dim=4096, freq_dim=256,
                in_dim=16, out_dim=16, patch_size=(1, 2, 2))
TINY_VAE_DIM = 8
WAN_VAE_Z_DIM = 16


# --------------------------------------------------------------------------------------
# Wan 2.1 T2V diffusion model
# --------------------------------------------------------------------------------------

def tiny_wan_config(**overrides):
    """The tiny Wan shape; ``overrides`` change it (e.g. ``num_layers=4``, or ``in_dim=out_dim=48``:
    ComfyUI then detects a Wan 2.2 TI2V-5B-shaped model)."""
    from headforcing_core.wan_model import WanConfig
    return WanConfig(**{**TINY_WAN, **overrides})


def tiny_wan_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> dict[str, torch.Tensor]:
    from headforcing_core.wan_model import random_backbone
    model = random_backbone(tiny_wan_config(**overrides), seed=seed, dtype=dtype)
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}


def write_tiny_wan(path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_wan_state_dict(seed, dtype, **overrides), str(path), metadata={"format": "pt"})
    return path


def scaled_fp8_state_dict(sd: dict[str, torch.Tensor], fp8: torch.dtype = torch.float8_e4m3fn,
                          matrix_mult: bool = False) -> dict[str, torch.Tensor]:
    """``sd`` in ComfyUI's scaled-fp8 layout, as ComfyUI 0.3.75 reads it (comfy/model_detection.py
    ``model_config_from_unet``; comfy/ops.py ``scaled_fp8_ops``):

    * a ``scaled_fp8`` marker tensor of the fp8 dtype — two elements: fp8 matrix multiplication off
      (Comfy-Org's diffusion models), none: on (ComfyUI then also makes a ``scale_input`` per layer);
    * every Linear weight (the 2-D ``*.weight`` tensors) stored as ``fp8(w / s)`` with its float32
      per-tensor ``<layer>.scale_weight`` ``s = max|w| / max(fp8)`` (ComfyUI multiplies it back);
    * everything else as it is (ComfyUI casts the Linear biases to the fp8 dtype on loading, unscaled).
    """
    top = torch.finfo(fp8).max
    out: dict[str, torch.Tensor] = {}
    for key, w in sd.items():
        if key.endswith(".weight") and w.ndim == 2:
            scale = (w.float().abs().amax() / top).clamp_min(torch.finfo(torch.float32).tiny)
            out[key] = (w.float() / scale).to(fp8).contiguous()
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(()).contiguous()
        else:
            out[key] = w
    out["scaled_fp8"] = torch.empty(0 if matrix_mult else 2, dtype=fp8)
    return out


def write_tiny_wan_scaled_fp8(path, seed: int = 0, source_dtype: torch.dtype = torch.bfloat16,
                              fp8: torch.dtype = torch.float8_e4m3fn, **overrides) -> Path:
    """The tiny Wan (its ``source_dtype`` weights) as a scaled-fp8 file (:func:`scaled_fp8_state_dict`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(scaled_fp8_state_dict(tiny_wan_state_dict(seed, source_dtype, **overrides), fp8), str(path),
              metadata={"format": "pt"})
    return path


# LongLive's PEFT LoRA targets: every nn.Linear of every attention block
LONGLIVE_LORA_MODULES = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                         "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def tiny_peft_lora(base_sd: dict[str, torch.Tensor], rank: int = 8, seed: int = 0, std: float = 0.1,
                   modules=LONGLIVE_LORA_MODULES, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """Random LoRA weights for every block of ``base_sd`` with PEFT's saved names
    (``get_peft_model_state_dict``: ``<prefix>blocks.{i}.{m}.lora_A.weight`` [rank, in] and
    ``….lora_B.weight`` [out, rank]; no alpha in the file), as LongLive's ``lora.pt`` holds them.
    Unlike PEFT's init (B = 0) both factors are random, so the LoRA changes the model; ``std``
    sets the size of ``B @ A`` relative to the weight it adapts."""
    g = torch.Generator().manual_seed(seed)
    layers = 1 + max(int(k.split(".")[1]) for k in base_sd if k.startswith("blocks."))
    out = {}
    for i in range(layers):
        for m in modules:
            w = base_sd[f"blocks.{i}.{m}.weight"]
            n_out, n_in = w.shape
            a = torch.randn(rank, n_in, generator=g) / math.sqrt(n_in)
            b = torch.randn(n_out, rank, generator=g) * std / math.sqrt(rank)
            out[f"{prefix}blocks.{i}.{m}.lora_A.weight"] = a.to(w.dtype)
            out[f"{prefix}blocks.{i}.{m}.lora_B.weight"] = b.to(w.dtype)
    return out


# --------------------------------------------------------------------------------------
# Wan 2.1 VAE (causal 3-D conv autoencoder), keys and shapes from the architecture
# --------------------------------------------------------------------------------------

def _conv3d(sd, name, cin, cout, k):
    sd[f"{name}.weight"] = (cout, cin, *k)
    sd[f"{name}.bias"] = (cout,)


def _conv2d(sd, name, cin, cout, k):
    sd[f"{name}.weight"] = (cout, cin, k, k)
    sd[f"{name}.bias"] = (cout,)


def _res_block(sd, name, cin, cout):
    # residual = [RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d]
    sd[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
    _conv3d(sd, f"{name}.residual.2", cin, cout, (3, 3, 3))
    sd[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
    _conv3d(sd, f"{name}.residual.6", cout, cout, (3, 3, 3))
    if cin != cout:
        _conv3d(sd, f"{name}.shortcut", cin, cout, (1, 1, 1))


def _attn_block(sd, name, dim):
    sd[f"{name}.norm.gamma"] = (dim, 1, 1)
    _conv2d(sd, f"{name}.to_qkv", dim, dim * 3, 1)
    _conv2d(sd, f"{name}.proj", dim, dim, 1)


def _resample(sd, name, dim, mode):
    if mode in ("downsample2d", "downsample3d"):
        _conv2d(sd, f"{name}.resample.1", dim, dim, 3)  # [ZeroPad2d, Conv2d stride 2]
        if mode == "downsample3d":
            _conv3d(sd, f"{name}.time_conv", dim, dim, (3, 1, 1))
    else:
        _conv2d(sd, f"{name}.resample.1", dim, dim // 2, 3)  # [Upsample, Conv2d]
        if mode == "upsample3d":
            _conv3d(sd, f"{name}.time_conv", dim, dim * 2, (3, 1, 1))


def _levels(sd, prefix, dims, blocks, resample, temporal, halved=()):
    """The encoder's downsamples / the decoder's upsamples: ``blocks`` residual blocks per level
    (dims[level] -> dims[level + 1]), then a ``resample`` (3d where ``temporal[level]``, else 2d)
    after every level but the last, numbered on as ``prefix.<i>``. At the levels in ``halved`` the
    input has half the channels (the previous upsample halved them)."""
    i = 0
    for level, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if level in halved:
            cin = cin // 2
        for _ in range(blocks):
            _res_block(sd, f"{prefix}.{i}", cin, cout)
            cin = cout
            i += 1
        if level != len(dims) - 2:
            _resample(sd, f"{prefix}.{i}", cout, f"{resample}3d" if temporal[level] else f"{resample}2d")
            i += 1


def wan_vae_shapes(dim: int = TINY_VAE_DIM, z_dim: int = WAN_VAE_Z_DIM,
                   dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                   temporal_down=(False, True, True)) -> dict[str, tuple]:
    """Every key and shape of a Wan 2.1 VAE state dict (the official/ComfyUI layout)."""
    sd: dict[str, tuple] = {}
    # encoder: conv1, downsamples, middle, head -> 2*z_dim channels (mean, log-var)
    dims = [dim * u for u in (1, *dim_mult)]
    _conv3d(sd, "encoder.conv1", 3, dims[0], (3, 3, 3))
    _levels(sd, "encoder.downsamples", dims, num_res_blocks, "downsample", temporal_down)
    top = dims[-1]
    _res_block(sd, "encoder.middle.0", top, top)
    _attn_block(sd, "encoder.middle.1", top)
    _res_block(sd, "encoder.middle.2", top, top)
    sd["encoder.head.0.gamma"] = (top, 1, 1, 1)
    _conv3d(sd, "encoder.head.2", top, z_dim * 2, (3, 3, 3))
    _conv3d(sd, "conv1", z_dim * 2, z_dim * 2, (1, 1, 1))
    _conv3d(sd, "conv2", z_dim, z_dim, (1, 1, 1))
    # decoder: conv1, middle, upsamples, head -> RGB
    temporal_up = tuple(reversed(temporal_down))
    ddims = [dim * u for u in (dim_mult[-1], *reversed(dim_mult))]
    _conv3d(sd, "decoder.conv1", z_dim, ddims[0], (3, 3, 3))
    _res_block(sd, "decoder.middle.0", ddims[0], ddims[0])
    _attn_block(sd, "decoder.middle.1", ddims[0])
    _res_block(sd, "decoder.middle.2", ddims[0], ddims[0])
    _levels(sd, "decoder.upsamples", ddims, num_res_blocks + 1, "upsample", temporal_up, halved=(1, 2, 3))
    sd["decoder.head.0.gamma"] = (ddims[-1], 1, 1, 1)
    _conv3d(sd, "decoder.head.2", ddims[-1], 3, (3, 3, 3))
    return sd


def tiny_wan_vae_state_dict(seed: int = 0, dim: int = TINY_VAE_DIM,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights: RMS-norm gains 1, biases small, convs ~ unit gain (std 1/sqrt(fan_in)).

    The residual branches are damped so activations stay O(1) through the ~30 blocks, and
    the decoded frames are varied (not constant) but finite.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(wan_vae_shapes(dim).items()):
        if key.endswith(".gamma"):
            t = torch.ones(shape)
        elif key.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.02
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            if ".residual.6." in key:
                t = t * 0.5
        out[key] = t.to(dtype).contiguous()
    return out


def write_tiny_wan_vae(path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_wan_vae_state_dict(seed, dtype=dtype), str(path), metadata={"format": "pt"})
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wan", type=Path, help="write the tiny Wan2.1 T2V diffusion model here")
    p.add_argument("--wan-scaled-fp8", type=Path, help="write the tiny Wan2.1 T2V as a scaled-fp8 file here")
    p.add_argument("--vae", type=Path, help="write the tiny Wan 2.1 VAE here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.wan or args.wan_scaled_fp8 or args.vae):
        p.error("nothing to write: give --wan, --wan-scaled-fp8 and/or --vae")
    if args.wan:
        print(f"tiny Wan2.1 T2V -> {write_tiny_wan(args.wan, seed=args.seed)}")
    if args.wan_scaled_fp8:
        print(f"tiny Wan2.1 T2V, scaled fp8 -> {write_tiny_wan_scaled_fp8(args.wan_scaled_fp8, seed=args.seed)}")
    if args.vae:
        print(f"tiny Wan 2.1 VAE -> {write_tiny_wan_vae(args.vae, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
