"""Memory of Krea's context re-encode with ComfyUI's Wan 2.1 VAE (JSON on stdout): the streaming decode's
causal cache (kept from block to block), the peak of decoding one more block, and of encoding one frame.

Run with the host's python, in a fresh process, with freed buffers handed back to the OS at once (so the
peak RSS follows the live tensors), as ``tests/core/schedule_memory.py``:

    MALLOC_MMAP_THRESHOLD_=65536 .host/venv/bin/python -m tests.core.vae_stream_memory [width] [height] [fp32|bf16]

The VAE is ComfyUI's own module (``comfy.ldm.wan.vae.WanVAE``, the Wan 2.1 VAE's shape: base dim 96) with
random weights — memory depends on shapes, not values — driven the way ``nodes/krea.py``
``ComfyContextVAE`` drives it. docs/krea.md quotes the result; ``estimate_krea`` counts it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .schedule_memory import reset_peak
from .schedule_memory import status as rss

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    width = int(sys.argv[1]) if len(sys.argv) > 1 else 832
    height = int(sys.argv[2]) if len(sys.argv) > 2 else 480
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3] if len(sys.argv) > 3 else "fp32"]
    torch.set_grad_enabled(False)
    sys.path.insert(0, str(REPO / ".host" / "ComfyUI"))
    sys.argv = sys.argv[:1] + ["--cpu"]  # ComfyUI reads its command line when comfy is imported
    import comfy.options
    comfy.options.enable_args_parsing()
    from comfy.ldm.wan.vae import WanVAE, count_conv3d

    vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True]).to(dtype)
    for p in vae.parameters():
        p.normal_(0, 0.02)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    lh, lw = height // 8, width // 8
    feat = [None] * count_conv3d(vae.decoder)

    def decode(latents):
        x = vae.conv2(latents)
        return torch.cat([vae.decoder(x[:, :, i:i + 1], feat_cache=feat, feat_idx=[0]) for i in range(x.shape[2])], 2)

    block = torch.randn(1, 16, 3, lh, lw, dtype=dtype)
    started = time.time()
    decode(block)  # the first block (1 + 4 + 4 frames); fills the causal cache
    cache_bytes = sum(t.numel() * t.element_size() for t in feat if torch.is_tensor(t))
    base = rss()
    reset_peak()
    out = decode(torch.randn(1, 16, 3, lh, lw, dtype=dtype))  # a steady block: 12 frames
    decode_peak = rss()["VmHWM"] - base["VmRSS"]
    del out
    frame = torch.rand(1, 3, 1, height, width, dtype=dtype) * 2 - 1
    base = rss()
    reset_peak()
    mu = vae.encode(frame)
    encode_peak = rss()["VmHWM"] - base["VmRSS"]
    print(json.dumps({
        "width": width, "height": height, "dtype": str(dtype).replace("torch.", ""), "weights_bytes": weights,
        "decoder_cache_bytes": cache_bytes, "decode_block_peak_bytes": decode_peak,
        "encode_frame_peak_bytes": encode_peak, "latent": list(mu.shape), "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
