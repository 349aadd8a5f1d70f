"""The core's own run next to the server's: a script run with the host's python that rebuilds what a sampler node
got (the tiny Wan of seed 0, HFTestConditioning's prompt) and compares the core's latents with the node's LATENT.

:func:`run_core` writes :data:`PROLOGUE` + a test's ``body`` and runs it: the body finds ``model`` (the tiny Wan),
``context`` (``[1, tokens, 4096]``), ``comfy_latent`` (the node's saved LATENT), the integers ``width``, ``height``,
``length``, ``seed``, ``text_seed``, ``tokens``, ComfyUI's latent formats as ``lf`` (loaded from their file) and
``torch``, and writes its JSON result to the path ``out``.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .conftest import REPO, host

PROLOGUE = r'''
import importlib.util, json, sys
sys.path.insert(0, {repo!r})
import torch
from safetensors.torch import load_file
from headforcing_core.wan_model import WanBackbone
from tools.tiny_models import tiny_wan_config, tiny_wan_state_dict
lf_spec = importlib.util.spec_from_file_location("lf", {comfy!r} + "/comfy/latent_formats.py")
lf = importlib.util.module_from_spec(lf_spec); lf_spec.loader.exec_module(lf)

path, out, width, height, length, seed, text_seed, tokens = sys.argv[1:]
width, height, length, seed, text_seed, tokens = map(int, (width, height, length, seed, text_seed, tokens))
comfy_latent = load_file(path)["latent_tensor"].float()
model = WanBackbone(tiny_wan_config())
model.load_state_dict(tiny_wan_state_dict(seed=0))
model.eval()
# HFTestConditioning: randn((1, L, 4096), generator=cpu seeded) * 0.1
g = torch.Generator(device="cpu").manual_seed(text_seed % (2**63))
context = torch.randn((1, tokens, 4096), generator=g) * 0.1
'''


def run_core(tmp_path: Path, body: str, latent: Path, width: int, height: int, length: int, seed: int,
             text_seed: int, tokens: int) -> dict:
    """Run :data:`PROLOGUE` + ``body`` on the node's saved ``latent``; returns the JSON the body wrote."""
    script = tmp_path / "core_run.py"
    script.write_text(PROLOGUE.format(repo=str(REPO), comfy=str(host.COMFY)) + body)
    out = tmp_path / "core.json"
    proc = subprocess.run([str(host.VENV_PY), str(script), str(latent), str(out), *map(str, (
        width, height, length, seed, text_seed, tokens))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())
