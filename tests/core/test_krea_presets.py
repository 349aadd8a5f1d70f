"""The sampler's Krea presets and their checks (nodes/comfy_bridge.py, loaded without ComfyUI), and a Krea-format
checkpoint file (``model.`` + Wan 2.1 key names) read by the pack's loader."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from headforcing_core.backbone import BackboneSpec, inspect_backbone
from headforcing_core.convert import convert, extract_generator, load_weights
from headforcing_core.errors import ModelFamilyError
from headforcing_core.krea import KreaError, KreaSettings, generate_krea
from headforcing_core.noise import krea_generator, krea_initial_noise
from headforcing_core.wan_model import WAN21_1_3B, WAN21_14B, WanBackbone, random_backbone

from .conftest import LAYOUT_14B, TINY, text_context
from .test_comfy_bridge import bridge

SPEC_14B = BackboneSpec.from_config(WAN21_14B)
SPEC_1_3B = BackboneSpec.from_config(WAN21_1_3B)
NARROW_14B = BackboneSpec.from_config(LAYOUT_14B)
TINY_SPEC = BackboneSpec.from_config(TINY)


def sampling(preset):
    return bridge.apply_model_preset(preset, frames_per_block=3, steps=bridge.DEFAULT_STEPS, first_chunk_steps="",
                                     shift=5.0)


def test_krea_presets_are_kreas_settings():
    krea = bridge.MODEL_PRESETS[bridge.KREA_PRESET]
    assert krea.loop == "krea" and krea.layout == "Wan 2.1 14B"
    assert krea.widget_values() == {"frames_per_block": 3, "steps": "1000,750,500,250,0", "first_chunk_steps": "",
                                    "shift": 5.0}
    sf = bridge.MODEL_PRESETS[bridge.KREA_SF_PRESET]
    assert sf.loop == "self_forcing" and sf.widget_values() == krea.widget_values()
    assert {p.loop for p in bridge.MODEL_PRESETS.values() if p} == {"self_forcing", "krea"}
    assert set(bridge.LOOPS) == {"self_forcing", "krea"}


@pytest.mark.parametrize("spec", [SPEC_14B, NARROW_14B], ids=["14B", "narrow-40x40"])
@pytest.mark.parametrize("preset", ["Self Forcing chunk-wise", "Causal Forcing frame-wise 4-step", "LongLive"])
def test_a_krea_checkpoint_with_a_1_3b_preset_is_refused(spec, preset):
    with pytest.raises(ModelFamilyError, match=r"Wan 2\.1 14B layout \(40 layers × 40 heads.*'Self Forcing "
                                               r"chunk-wise' is for Wan 2\.1 1\.3B|is for Wan 2\.1 1\.3B"):
        bridge.check_model_layout(sampling(preset), spec)


def test_a_1_3b_checkpoint_with_krea_is_refused_and_tiny_models_take_any_preset():
    with pytest.raises(ModelFamilyError, match="Wan 2.1 1.3B layout.*is for Wan 2.1 14B checkpoints.*Self Forcing "
                                               "chunk-wise"):
        bridge.check_model_layout(sampling(bridge.KREA_PRESET), SPEC_1_3B)
    for name in bridge.MODEL_PRESETS:
        bridge.check_model_layout(sampling(name), TINY_SPEC)  # no public layout: any preset
    bridge.check_model_layout(sampling("custom"), SPEC_14B)
    bridge.check_model_layout(sampling(bridge.KREA_SF_PRESET), SPEC_14B)


def test_krea_settings_from_the_widgets():
    s = bridge.krea_settings(sampling(bridge.KREA_PRESET), has_vae=True)
    assert s == KreaSettings()  # Krea's defaults, its re-encode with a VAE
    assert bridge.krea_settings(sampling(bridge.KREA_PRESET)).first_latent == "latent"  # auto without one
    with pytest.raises(KreaError, match="connect the Wan 2.1 VAE"):
        bridge.krea_settings(sampling(bridge.KREA_PRESET), first_latent="reencode", has_vae=False)
    with pytest.raises(KreaError, match="trained on 21"):
        bridge.krea_settings(sampling(bridge.KREA_PRESET), context_frames=19, has_vae=True)
    keep = bridge.krea_settings(sampling(bridge.KREA_PRESET), first_latent="keep_first", interpolation_blocks=2)
    assert keep.first_latent == "keep_first" and keep.interpolation_blocks == 2


def test_no_ar_state_after_kreas_loop_is_a_clear_error():
    with pytest.raises(Exception, match="Krea's loop"):
        bridge.check_state(None)


def test_policy_node_estimate_for_the_14b_shape():
    from headforcing_core.policies import make_policy
    text = bridge.policy_summary(make_policy("head_forcing"), width=832, height=480, frames=961,
                                 model_shape="Wan 2.1 14B")
    assert "Wan2.1-T2V-14B, 832x480" in text and "40×40" in text  # the uniform default, said
    assert bridge.shape_spec("Wan 2.1 14B").num_heads == 40


# ---------------------------------------------------------------------------------------------
# Krea's checkpoint format: release_server.py load_transformer reads a safetensors file whose keys are
# "model." + the original Wan 2.1 names (WanDiffusionWrapper.model.load_state_dict)


def write_krea_file(path, config=TINY, seed=0):
    sd = random_backbone(config, seed=seed).state_dict()
    save_file({f"model.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    return sd


def test_a_krea_format_file_loads_and_samples(tmp_path):
    path = tmp_path / "krea-realtime-video-tiny.safetensors"
    sd = write_krea_file(path)
    flat = extract_generator(load_weights(str(path)))
    assert set(flat) == set(sd)
    model = WanBackbone.from_state_dict(flat)
    assert inspect_backbone(model).dim == TINY.dim
    g = krea_generator(0)
    noise = krea_initial_noise((1, 16, 9, 4, 4), g)
    out = generate_krea(model, text_context(), noise, g, KreaSettings(first_latent="latent"))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    # the converter writes ComfyUI's flat names (not needed by UNETLoader, which strips "model." itself)
    cfg = convert(str(path), str(tmp_path / "flat.safetensors"))
    assert cfg.num_layers == TINY.num_layers
