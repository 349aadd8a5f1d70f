"""Generate 10 minutes of video with the tiny model; print peak/current RSS at 1, 5 and 10 minutes (JSON).

Run as a script (a fresh process, so RSS is not polluted by other tests):
    python -m tests.core.long_run_rss [policy] [latent_h] [latent_w]
"""

import json
import sys

import torch

from headforcing_core import WanConfig, generate, random_backbone


def rss_kib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def main():
    policy = sys.argv[1] if len(sys.argv) > 1 else "head_forcing"
    lh = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    lw = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    torch.set_num_threads(1)
    model = random_backbone(WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512))
    ctx = torch.randn(1, 16, 4096, generator=torch.Generator().manual_seed(0)) * 0.1
    marks = {1: (16 * 60 - 1) // 4 + 1, 5: (16 * 300 - 1) // 4 + 1, 10: (16 * 600 - 1) // 4 + 1}
    total = marks[10]
    noise = torch.randn(1, 16, total, lh, lw, generator=torch.Generator().manual_seed(1))
    readings = {}

    def on_chunk(i, x0):
        done = (i + 1) * 3
        for minute, frames in marks.items():
            if minute not in readings and done >= frames:
                readings[minute] = dict(rss_kib(), latent_frames=done)

    out = generate(model, ctx, noise, policy=policy, generator=torch.Generator().manual_seed(2), on_chunk=on_chunk)
    readings[10] = dict(rss_kib(), latent_frames=total)
    print(json.dumps({"policy": policy, "finite": bool(torch.isfinite(out).all()), "frames": total,
                      "readings": {str(k): v for k, v in sorted(readings.items())}}))


if __name__ == "__main__":
    main()
