"""Converter round trip in the real server.

A random backbone saved as a Self Forcing-style ``.pt`` (EMA weights under
``generator_ema``, FSDP prefix), converted by ``headforcing_core.convert``, loaded by
ComfyUI's UNETLoader and sampled by our node, gives the latents the original module
gives in the core — i.e. ComfyUI's own ops run the model, with nothing lost in between.
"""

from __future__ import annotations

import importlib.util

import torch
from safetensors.torch import load_file

from headforcing_core import WanConfig, generate, random_backbone
from headforcing_core.convert import convert

from .conftest import REPO

TINY = WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512)


def wan21_latent_format():
    path = REPO / ".host" / "ComfyUI" / "comfy" / "latent_formats.py"
    spec = importlib.util.spec_from_file_location("hf_comfy_latent_formats", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Wan21()


def initial_noise(shape, seed):
    """The sampler node's documented initial noise: KSampler's noise for an empty latent."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def renoise_generator(seed):
    """The node's documented re-noising generator: seeded with seed + 1."""
    return torch.Generator().manual_seed(seed + 1)


def test_converted_checkpoint_samples_like_the_original(comfy, tmp_path):
    original = random_backbone(TINY, seed=11)
    ema = random_backbone(TINY, seed=12)
    pt = tmp_path / "self_forcing_tiny.pt"
    prefix = "model._fsdp_wrapped_module."
    torch.save({"generator": {prefix + k: v for k, v in original.state_dict().items()},
                "generator_ema": {prefix + k: v for k, v in ema.state_dict().items()}}, pt)
    name = "hf_converted_tiny.safetensors"
    convert(str(pt), str(comfy.base_dir / "models" / "diffusion_models" / name), ema=True, overwrite=True)

    seed, text_seed = 5, 3
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
        "2": {"class_type": "HFTestConditioning", "inputs": {"seed": text_seed, "length": 512}},
        "3": {"class_type": "HeadForcingARSampler",
              "inputs": {"model": ["1", 0], "conditioning": ["2", 0], "width": 64, "height": 64,
                         "length": 9, "seed": seed, "policy": "full"}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "e2e/converted"}},
    }
    entry = comfy.run(wf, timeout=600)
    files = comfy.outputs(entry, ".latent")
    assert len(files) == 1, entry.get("outputs")
    saved = load_file(str(files[0]))["latent_tensor"]

    context = torch.randn((1, 512, 4096), generator=torch.Generator().manual_seed(text_seed)) * 0.1
    noise = initial_noise((1, 16, 3, 8, 8), seed)
    expected = generate(ema, context, noise, policy="full", generator=renoise_generator(seed))
    expected = wan21_latent_format().process_out(expected)
    assert saved.shape == expected.shape
    rel = float((saved.float() - expected).norm() / expected.norm())
    assert rel < 1e-5, rel
    # and it is the EMA branch that was converted, not the other one
    other = wan21_latent_format().process_out(
        generate(original, context, noise, policy="full", generator=renoise_generator(seed)))
    assert float((saved.float() - other).norm() / other.norm()) > 1e-2
