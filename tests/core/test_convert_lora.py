"""LongLive-style checkpoints: base .pt + PEFT LoRA .pt → merged safetensors, or a ComfyUI LoRA file.

The expected values are restated here, not taken from the converter: a PEFT LoRA changes a
Linear's weight to ``W + (alpha / r) · B @ A`` (A = ``lora_A`` ``[r, in]``, B = ``lora_B``
``[out, r]``); PEFT runs it unmerged as ``W x + b + (alpha / r) · B (A x)``; ComfyUI's
LoraLoaderModelOnly at strength s applies ``W + s · (alpha / r) · B @ A`` with r = ``lora_A``'s
rows and alpha the ``.alpha`` tensor.
"""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from headforcing_core import WanBackbone, WanConfig, generate, random_backbone
from headforcing_core.convert import convert, convert_lora, lora_module_name, main, parse_lora
from headforcing_core.errors import CheckpointError
from tools.tiny_models import LONGLIVE_LORA_MODULES, tiny_peft_lora

from .conftest import TINY, latent_noise, text_context

RANK, ALPHA = 4, 8.0  # scale 2: a converter that ignores alpha (or uses alpha = rank) fails


def base_sd(seed=1, config=TINY):
    return {k: v.detach().clone() for k, v in random_backbone(config, seed=seed).state_dict().items()}


def write_longlive(tmp_path, seed=1, lora_seed=7, rank=RANK, wrapped=True, config=TINY):
    """LongLive's two files: ``{"generator": {"model." + k}}`` and ``{"generator_lora": PEFT, ...}``."""
    sd = base_sd(seed, config)
    lora = tiny_peft_lora(sd, rank=rank, seed=lora_seed)
    base_pt, lora_pt = tmp_path / "longlive_base.pt", tmp_path / "lora.pt"
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, base_pt)
    critic = {k.replace("lora_", "critic_lora_"): torch.zeros(1) for k in list(lora)[:2]}
    torch.save({"generator_lora": lora, "critic_lora": critic, "step": 3000} if wrapped else lora, lora_pt)
    return sd, lora, base_pt, lora_pt


def expected_merge(sd, lora, alpha, strength=1.0):
    """W + strength · (alpha / r) · B @ A, in float64, for every PEFT pair (restated)."""
    out = {k: v.double() for k, v in sd.items()}
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        target = key.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
        out[target] = out[target] + strength * (alpha / a.shape[0]) * (b.double() @ a.double())
    return out


def test_merged_weights_are_w_plus_scaled_b_a(tmp_path):
    sd, lora, base_pt, lora_pt = write_longlive(tmp_path)
    out = tmp_path / "merged.safetensors"
    assert main([str(base_pt), str(out), "--lora", str(lora_pt), "--lora-alpha", str(ALPHA)]) == 0
    merged = load_file(str(out))
    expected = expected_merge(sd, lora, ALPHA)
    assert set(merged) == set(sd)
    changed = 0
    for k, v in merged.items():
        assert v.dtype == sd[k].dtype
        if torch.equal(v, sd[k]):
            assert k not in {f"blocks.{i}.{m}.weight" for i in range(TINY.num_layers) for m in LONGLIVE_LORA_MODULES}
            continue
        changed += 1
        torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=1e-6)
    assert changed == TINY.num_layers * len(LONGLIVE_LORA_MODULES)  # 10 Linears per block, nothing else
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["lora_merged"] == "lora.pt" and "alpha 8 (scale 2)" in meta["lora"]


def test_default_alpha_is_the_rank_as_longlive(tmp_path):
    # LongLive: lora_alpha = alpha or rank; its released LoRA is rank 256, alpha 256 → scale 1
    sd, lora, base_pt, lora_pt = write_longlive(tmp_path, wrapped=False)
    convert(str(base_pt), str(tmp_path / "m.safetensors"), lora=str(lora_pt))
    merged = load_file(str(tmp_path / "m.safetensors"))
    expected = expected_merge(sd, lora, alpha=RANK)
    for k in merged:
        torch.testing.assert_close(merged[k].double(), expected[k], rtol=0, atol=1e-6)


class PeftLinear(nn.Linear):
    """A Linear with an unmerged LoRA, as PEFT (and LongLive at inference) runs it."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.lora_a, self.lora_b, self.scale = a, b, scale

    def forward(self, x):
        return super().forward(x) + self.scale * ((x @ self.lora_a.T) @ self.lora_b.T)


def test_merged_file_samples_like_the_unmerged_peft_model(tmp_path):
    sd, lora, base_pt, lora_pt = write_longlive(tmp_path)
    convert(str(base_pt), str(tmp_path / "m.safetensors"), lora=str(lora_pt), lora_alpha=ALPHA)
    merged = WanBackbone.from_state_dict(load_file(str(tmp_path / "m.safetensors")))

    peft = WanBackbone.from_state_dict(sd)
    for i, block in enumerate(peft.blocks):
        for m in LONGLIVE_LORA_MODULES:
            parent_name, child = m.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            key = f"base_model.model.blocks.{i}.{m}"
            setattr(parent, child, PeftLinear(getattr(parent, child), lora[key + ".lora_A.weight"],
                                              lora[key + ".lora_B.weight"], ALPHA / RANK))
    ctx, noise = text_context(), latent_noise(6)
    a = generate(peft, ctx, noise, policy="full", generator=torch.Generator().manual_seed(0))
    b = generate(merged, ctx, noise, policy="full", generator=torch.Generator().manual_seed(0))
    base = generate(WanBackbone.from_state_dict(sd), ctx, noise, policy="full",
                    generator=torch.Generator().manual_seed(0))
    assert float((a - b).norm() / a.norm()) < 1e-5
    assert float((a - base).norm() / a.norm()) > 1e-2  # the LoRA matters


def test_comfy_lora_file_keys_and_scale(tmp_path):
    sd, lora, base_pt, lora_pt = write_longlive(tmp_path)
    out = tmp_path / "longlive_lora.safetensors"
    assert main(["--lora-only", str(lora_pt), str(out), "--lora-alpha", str(ALPHA), "--base", str(base_pt)]) == 0
    comfy = load_file(str(out))
    modules = [f"blocks.{i}.{m}" for i in range(TINY.num_layers) for m in LONGLIVE_LORA_MODULES]
    assert set(comfy) == {f"diffusion_model.{m}.{s}" for m in modules for s in ("lora_A.weight", "lora_B.weight",
                                                                               "alpha")}
    for m in modules:
        a, b = comfy[f"diffusion_model.{m}.lora_A.weight"], comfy[f"diffusion_model.{m}.lora_B.weight"]
        w = sd[m + ".weight"]
        assert a.shape == (RANK, w.shape[1]) and b.shape == (w.shape[0], RANK)
        assert torch.equal(a, lora[f"base_model.model.{m}.lora_A.weight"])
        assert torch.equal(b, lora[f"base_model.model.{m}.lora_B.weight"])
        alpha = comfy[f"diffusion_model.{m}.alpha"]
        assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == ALPHA
    # ComfyUI's rule at strength 1 (alpha / lora_A rows) gives the merged file's weights
    convert(str(base_pt), str(tmp_path / "m.safetensors"), lora=str(lora_pt), lora_alpha=ALPHA)
    merged = load_file(str(tmp_path / "m.safetensors"))
    for m in modules:
        a, b = comfy[f"diffusion_model.{m}.lora_A.weight"], comfy[f"diffusion_model.{m}.lora_B.weight"]
        scale = comfy[f"diffusion_model.{m}.alpha"].item() / a.shape[0]
        torch.testing.assert_close(sd[m + ".weight"] + scale * (b @ a), merged[m + ".weight"])


def test_lora_only_without_base_and_from_a_safetensors_base(tmp_path):
    sd, lora, base_pt, lora_pt = write_longlive(tmp_path)
    pairs = convert_lora(str(lora_pt), str(tmp_path / "a.safetensors"))  # shape read off the LoRA itself
    assert len(pairs) == 20 and {p.alpha for p in pairs.values()} == {float(RANK)}
    flat = tmp_path / "base.safetensors"
    convert(str(base_pt), str(flat))
    convert_lora(str(lora_pt), str(tmp_path / "b.safetensors"), base=str(flat))
    assert load_file(str(tmp_path / "a.safetensors")).keys() == load_file(str(tmp_path / "b.safetensors")).keys()
    # a LoRA merged into the already converted base gives the same file as merging into the .pt
    convert(str(flat), str(tmp_path / "m1.safetensors"), lora=str(lora_pt))
    convert(str(base_pt), str(tmp_path / "m2.safetensors"), lora=str(lora_pt))
    m1, m2 = load_file(str(tmp_path / "m1.safetensors")), load_file(str(tmp_path / "m2.safetensors"))
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)


@pytest.mark.parametrize("key, module", [
    ("base_model.model.blocks.0.self_attn.q", "blocks.0.self_attn.q"),
    ("base_model.model.model.blocks.12.ffn.2", "blocks.12.ffn.2"),
    ("model._fsdp_wrapped_module.blocks.3.cross_attn.o", "blocks.3.cross_attn.o"),
    ("base_model.model.blocks.1._checkpoint_wrapped_module.ffn.0", "blocks.1.ffn.0"),
    ("diffusion_model.blocks.29.self_attn.v", "blocks.29.self_attn.v"),
    ("blocks.4.self_attn.k", "blocks.4.self_attn.k"),
    ("base_model.model.head.head", "head.head"),
    ("diffusion_model.text_embedding.0", "text_embedding.0"),
])
def test_peft_key_names(key, module):
    assert lora_module_name(key) == module


def test_parse_adapter_names_prefixes_and_alpha_tensors():
    a, b = torch.randn(2, 5), torch.randn(7, 2)
    pairs = parse_lora({"base_model.model.blocks.0.ffn.0.lora_A.default.weight": a,
                        "base_model.model.blocks.0.ffn.0.lora_B.default.weight": b, "step": 12})
    (pair,) = pairs.values()
    assert pair.module == "blocks.0.ffn.0" and pair.rank == 2 and pair.alpha == 2.0 and pair.scale == 1.0
    assert torch.equal(pair.down, a) and torch.equal(pair.up, b)
    comfy_format = {"diffusion_model.blocks.0.ffn.0.lora_A.weight": a, "diffusion_model.blocks.0.ffn.0.lora_B.weight": b,
                    "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(6.0)}
    assert parse_lora(comfy_format)["blocks.0.ffn.0"].scale == 3.0
    assert parse_lora(comfy_format, alpha=1.0)["blocks.0.ffn.0"].scale == 0.5  # explicit alpha wins


# ---------------------------------------------------------------------------------------------
# bad input: a clear CheckpointError, and no output file


def _lora_error(tmp_path, lora_obj, match, base_config=TINY, **kw):
    sd = base_sd(1, base_config)
    base_pt = tmp_path / "base.pt"
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, base_pt)
    lora_pt = tmp_path / "bad_lora.pt"
    torch.save(lora_obj, lora_pt)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=match):
        convert(str(base_pt), str(out), lora=str(lora_pt), **kw)
    assert not out.exists()
    return base_pt, lora_pt


def test_incomplete_pairs(tmp_path):
    lora = tiny_peft_lora(base_sd(), rank=RANK)
    del lora["base_model.model.blocks.1.ffn.2.lora_B.weight"]
    _lora_error(tmp_path, {"generator_lora": lora}, r"incomplete.*blocks\.1\.ffn\.2 has only lora_A")


def test_rank_disagreement(tmp_path):
    lora = tiny_peft_lora(base_sd(), rank=RANK)
    lora["base_model.model.blocks.0.self_attn.q.lora_B.weight"] = torch.randn(256, RANK + 1)
    _lora_error(tmp_path, lora, "ranks must agree")


def test_lora_for_another_model_shape(tmp_path):
    wide = WanConfig(dim=384, num_heads=3, num_layers=2, ffn_dim=512)
    lora = tiny_peft_lora(base_sd(1, wide), rank=RANK)
    base_pt, lora_pt = _lora_error(tmp_path, {"generator_lora": lora}, "another model shape")
    with pytest.raises(CheckpointError, match="another model shape"):
        convert_lora(str(lora_pt), str(tmp_path / "l.safetensors"), base=str(base_pt))
    assert not (tmp_path / "l.safetensors").exists()


def test_lora_for_more_blocks_than_the_base(tmp_path):
    deep = WanConfig(dim=256, num_heads=2, num_layers=4, ffn_dim=512)
    lora = tiny_peft_lora(base_sd(1, deep), rank=RANK)
    _lora_error(tmp_path, lora, r"does not have .*has 2 blocks.*another model")


def test_unknown_and_dora_keys(tmp_path):
    lora = tiny_peft_lora(base_sd(), rank=RANK)
    lora["base_model.model.blocks.0.self_attn.q.lora_magnitude_vector.default.weight"] = torch.ones(256)
    _lora_error(tmp_path, lora, "not PEFT LoRA weights.*lora_magnitude_vector")


def test_wrong_files_in_wrong_places(tmp_path):
    sd, lora, base_pt, lora_pt = write_longlive(tmp_path)
    out = tmp_path / "o.safetensors"
    with pytest.raises(CheckpointError, match="LoRA file"):  # the LoRA given as the base
        convert(str(lora_pt), str(out))
    with pytest.raises(CheckpointError, match="model checkpoint"):  # the base given as the LoRA
        convert(str(base_pt), str(out), lora=str(base_pt))
    with pytest.raises(CheckpointError, match="'critic_lora' but no 'generator_lora'"):
        convert(str(base_pt), str(out), lora=str(_save(tmp_path / "critic.pt", {"critic_lora": lora})))
    with pytest.raises(CheckpointError, match="no LoRA weights"):
        convert(str(base_pt), str(out), lora=str(_save(tmp_path / "empty.pt", {"generator_lora": {}})))
    with pytest.raises(CheckpointError, match="alpha must be a positive"):
        convert(str(base_pt), str(out), lora=str(lora_pt), lora_alpha=0.0)
    assert not out.exists()


def _save(path, obj):
    torch.save(obj, path)
    return path


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/headforcing_lora_pwned",))


def test_pickle_payload_in_a_lora_is_refused(tmp_path):
    sd, lora, base_pt, _ = write_longlive(tmp_path)
    evil = _save(tmp_path / "evil_lora.pt", {"generator_lora": {"x": Payload()}})
    with pytest.raises(CheckpointError, match="refused for safety"):
        convert(str(base_pt), str(tmp_path / "o.safetensors"), lora=str(evil))
    with pytest.raises(CheckpointError, match="refused for safety"):
        convert_lora(str(evil), str(tmp_path / "o.safetensors"))
    assert not os.path.exists("/tmp/headforcing_lora_pwned")


def test_lora_only_checks_its_own_consistency(tmp_path):
    lora = tiny_peft_lora(base_sd(), rank=RANK)
    lora["base_model.model.blocks.1.ffn.2.lora_A.weight"] = torch.randn(RANK, 640)  # ffn 640 here, 512 in ffn.0
    path = _save(tmp_path / "l.pt", lora)
    with pytest.raises(CheckpointError, match="does not fit a Wan2.1 model.*blocks.1.ffn.2"):
        convert_lora(str(path), str(tmp_path / "l.safetensors"))
    odd = _save(tmp_path / "odd.pt", {"base_model.model.blocks.0.norm3.lora_A.weight": torch.randn(2, 256),
                                      "base_model.model.blocks.0.norm3.lora_B.weight": torch.randn(256, 2)})
    with pytest.raises(CheckpointError, match="cannot tell the model shape"):
        convert_lora(str(odd), str(tmp_path / "l.safetensors"))
    assert not (tmp_path / "l.safetensors").exists()


def test_existing_output_is_kept_and_cli_errors(tmp_path, capsys):
    sd, lora, base_pt, lora_pt = write_longlive(tmp_path)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert main([str(base_pt), str(out), "--lora", str(lora_pt)]) == 2
    assert main(["--lora-only", str(lora_pt), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["--lora-only", str(lora_pt), str(out), "--force"]) == 0
    assert "diffusion_model.blocks.0.ffn.0.alpha" in load_file(str(out))
    with pytest.raises(CheckpointError, match="one of the input files"):
        convert_lora(str(lora_pt), str(lora_pt), overwrite=True)
    for argv in (["--lora-only", str(lora_pt), str(out), "--lora", str(lora_pt)],
                 [str(base_pt), str(out), "--base", str(base_pt)],
                 [str(base_pt), str(out), "--lora-alpha", "8"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_safetensors_peft_adapter_file(tmp_path):
    # PEFT's save_pretrained writes adapter_model.safetensors with the same names
    sd, lora, base_pt, _ = write_longlive(tmp_path)
    st = tmp_path / "adapter_model.safetensors"
    save_file(lora, str(st))
    convert(str(base_pt), str(tmp_path / "m.safetensors"), lora=str(st), lora_alpha=ALPHA)
    merged = load_file(str(tmp_path / "m.safetensors"))
    expected = expected_merge(sd, lora, ALPHA)
    torch.testing.assert_close(merged["blocks.1.ffn.2.weight"].double(), expected["blocks.1.ffn.2.weight"],
                               rtol=0, atol=1e-6)


def test_readme_conversion_commands_run_as_written(tmp_path, monkeypatch):
    """Every ``python -m headforcing_core.convert`` line of the README's "Model files" section
    converts tiny stand-ins of the files it names."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("### Model files"):text.index("## Using it in ComfyUI")]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("python -m headforcing_core.convert")]
    assert len(commands) == 8, commands
    variables = dict(re.findall(r"^([A-Z])=(\S+)$", block, re.M))
    assert variables == {"D": "ComfyUI/models/diffusion_models", "L": "longlive_models/models"}, variables

    monkeypatch.chdir(tmp_path)
    sd = base_sd()
    ckpt = {"generator": {"model." + k: v for k, v in sd.items()},
            "generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in sd.items()}}
    for name in ("checkpoints/self_forcing_dmd.pt", "chunkwise/causal_forcing.pt", "framewise/causal_forcing.pt",
                 "causal-forcing++/framewise-2step.pt", "causal-forcing++/framewise-1step.pt",
                 "longlive_models/models/longlive_base.pt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, tmp_path / name)
    torch.save({"generator_lora": tiny_peft_lora(sd, rank=RANK), "critic_lora": {}, "step": 1},
               tmp_path / "longlive_models/models/lora.pt")
    for cmd in commands:
        argv = shlex.split(cmd.replace("$D", variables["D"]).replace("$L", variables["L"]))[3:]
        assert main(argv) == 0, cmd
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "ComfyUI").rglob("*.safetensors"))
    assert len(written) == 8, written
