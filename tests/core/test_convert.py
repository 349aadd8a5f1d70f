"""Self Forcing .pt → flat safetensors, read safely."""

import os

import pytest
import torch
from safetensors.torch import load_file

from headforcing_core import WanBackbone, generate, random_backbone
from headforcing_core.convert import convert, main
from headforcing_core.errors import CheckpointError

from .conftest import TINY, latent_noise, text_context


def self_forcing_pt(path, model, prefix="model.", ema_model=None):
    ckpt = {"generator": {prefix + k: v for k, v in model.state_dict().items()}, "step": 1000}
    if ema_model is not None:
        ckpt["generator_ema"] = {prefix + k: v for k, v in ema_model.state_dict().items()}
    torch.save(ckpt, path)


@pytest.mark.parametrize("prefix", ["model.", "model._fsdp_wrapped_module."])
def test_round_trip_samples_like_the_original(tmp_path, prefix):
    model = random_backbone(TINY, seed=1)
    ema = random_backbone(TINY, seed=2)
    src, dst = tmp_path / "sf.pt", tmp_path / "sf.safetensors"
    self_forcing_pt(src, model, prefix, ema)
    convert(str(src), str(dst), ema=True)
    sd = load_file(str(dst))
    assert set(sd) == set(ema.state_dict())
    loaded = WanBackbone.from_state_dict(sd)
    a = generate(ema, text_context(), latent_noise(3), generator=torch.Generator().manual_seed(0))
    b = generate(loaded, text_context(), latent_noise(3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_missing_ema_and_existing_output(tmp_path):
    src = tmp_path / "sf.pt"
    self_forcing_pt(src, random_backbone(TINY))
    with pytest.raises(CheckpointError, match="no 'generator_ema'"):
        convert(str(src), str(tmp_path / "o.safetensors"), ema=True)
    (tmp_path / "o.safetensors").write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="exists"):
        convert(str(src), str(tmp_path / "o.safetensors"))
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep me"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/headforcing_pwned",))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    src = tmp_path / "evil.pt"
    torch.save({"generator": {"x": Payload()}}, src)
    with pytest.raises(CheckpointError, match="refused for safety"):
        convert(str(src), str(tmp_path / "o.safetensors"))
    assert not os.path.exists("/tmp/headforcing_pwned")
    assert not (tmp_path / "o.safetensors").exists()


def test_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        convert(str(bad), str(tmp_path / "o.safetensors"))
    other = tmp_path / "other.pt"
    torch.save({"generator": {"model.conv.weight": torch.zeros(3)}}, other)
    with pytest.raises(CheckpointError, match="not a Wan2.1 T2V model"):
        convert(str(other), str(tmp_path / "o.safetensors"))
    assert main([str(bad), str(tmp_path / "o.safetensors")]) == 2
    assert "error:" in capsys.readouterr().err
