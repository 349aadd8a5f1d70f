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


# ---------------------------------------------------------------------------------------------
# LongLive: base .pt + PEFT LoRA .pt (issue 15: converter round trip; issue 12: ComfyUI model patches)

LORA_RANK, LORA_ALPHA = 4, 8.0  # scale 2, so an ignored or misread alpha shows


def restated_merge(sd: dict, peft: dict, alpha: float) -> dict:
    """W + (alpha / r) · B @ A for every PEFT pair (float64, stored float32), written out here."""
    out = dict(sd)
    for key, a in peft.items():
        if key.endswith(".lora_A.weight"):
            b = peft[key.replace(".lora_A.", ".lora_B.")]
            w_key = key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
            out[w_key] = (sd[w_key].double() + (alpha / a.shape[0]) * (b.double() @ a.double())).float()
    return out


def test_longlive_lora_merged_and_through_lora_loader_sample_like_the_merged_module(comfy, tmp_path):
    """Issue 15's converter round trip and issue 12's LoRA patch check, in the real server.

    A random tiny base saved as LongLive's ``longlive_base.pt`` and a random PEFT LoRA saved as
    its ``lora.pt`` (``generator_lora`` + ``critic_lora``) are converted (i) merged into one
    file and (ii) into the base file + a ComfyUI-format LoRA. (i) UNETLoader → sampler and
    (ii) UNETLoader → core LoraLoaderModelOnly (strength 1.0) → sampler both give the latents
    ``headforcing_core.generate`` gives for the merged module: a LoRA applied by ComfyUI's own
    model patching changes the result exactly as merging it does, within float32 rounding.
    """
    from headforcing_core import WanBackbone
    from headforcing_core.convert import convert_lora
    from tools.tiny_models import tiny_peft_lora

    base = random_backbone(TINY, seed=21)
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    peft = tiny_peft_lora(sd, rank=LORA_RANK, seed=22)
    base_pt, lora_pt = tmp_path / "longlive_base.pt", tmp_path / "lora.pt"
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, base_pt)
    torch.save({"generator_lora": peft, "critic_lora": {}, "step": 1}, lora_pt)

    models = comfy.base_dir / "models"
    merged_name, base_name, lora_name = ("hf_longlive_tiny_merged.safetensors", "hf_longlive_tiny_base.safetensors",
                                         "hf_longlive_tiny_lora.safetensors")
    convert(str(base_pt), str(models / "diffusion_models" / merged_name), lora=str(lora_pt), lora_alpha=LORA_ALPHA,
            overwrite=True)
    convert(str(base_pt), str(models / "diffusion_models" / base_name), overwrite=True)
    convert_lora(str(lora_pt), str(models / "loras" / lora_name), lora_alpha=LORA_ALPHA, base=str(base_pt),
                 overwrite=True)

    seed, text_seed = 7, 4
    sampler = {"conditioning": ["2", 0], "width": 64, "height": 64, "length": 9, "seed": seed, "policy": "full"}
    wf = {
        "2": {"class_type": "HFTestConditioning", "inputs": {"seed": text_seed, "length": 512}},
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": merged_name, "weight_dtype": "default"}},
        "3": {"class_type": "HeadForcingARSampler", "inputs": {"model": ["1", 0], **sampler}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "e2e/longlive_merged"}},
        "11": {"class_type": "UNETLoader", "inputs": {"unet_name": base_name, "weight_dtype": "default"}},
        "12": {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["11", 0], "lora_name": lora_name, "strength_model": 1.0}},
        "13": {"class_type": "HeadForcingARSampler", "inputs": {"model": ["12", 0], **sampler}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "e2e/longlive_lora"}},
        "15": {"class_type": "PreviewAny", "inputs": {"source": ["13", 1]}},
    }
    entry = comfy.run(wf, timeout=600)
    files = {p.name.split("_0")[0]: p for p in comfy.outputs(entry, ".latent")}
    assert set(files) == {"longlive_merged", "longlive_lora"}, files
    merged_out = load_file(str(files["longlive_merged"]))["latent_tensor"].float()
    lora_out = load_file(str(files["longlive_lora"]))["latent_tensor"].float()

    context = torch.randn((1, 512, 4096), generator=torch.Generator().manual_seed(text_seed)) * 0.1
    noise = initial_noise((1, 16, 3, 8, 8), seed)
    fmt = wan21_latent_format()
    merged_module = WanBackbone.from_state_dict(restated_merge(sd, peft, LORA_ALPHA))
    expected = fmt.process_out(generate(merged_module, context, noise, policy="full",
                                        generator=renoise_generator(seed)))
    for name, got in (("merged file", merged_out), ("LoraLoaderModelOnly", lora_out)):
        assert got.shape == expected.shape, name
        rel = float((got - expected).norm() / expected.norm())
        print(f"\n[longlive lora] {name}: relative error vs the merged module in the core {rel:.2e}")
        assert rel < 1e-5, (name, rel)
    # the LoRA matters: the base alone samples something else
    plain = fmt.process_out(generate(base, context, noise, policy="full", generator=renoise_generator(seed)))
    assert float((lora_out - plain).norm() / plain.norm()) > 1e-2

    report = comfy.ui_text(entry, "15")[0]
    n = TINY.num_layers * 10
    assert f"model patches: {n} patched weights (LoRA / weight adapters) applied" in report, report
    assert "NOT applied" not in report, report
    assert "lora key not loaded" not in comfy.log_text()
