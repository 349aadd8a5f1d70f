"""Measure head profiling: ``python3 -m headforcing_core.profiling [options]`` prints JSON.

Profiles a random Wan of the given shape (default: the tiny test model, dim 256, 2 heads,
2 layers) on ``--prompts`` random text contexts and reports wall seconds, the same rollout
without the observer (the profiling overhead), peak RSS (and peak CUDA memory on a GPU), and
the label counts. ``--save PATH`` writes the profile. Random weights: this measures cost,
not labels of a real model.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import torch

from ..geometry import SPACE_COMPRESSION


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m headforcing_core.profiling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--frames", type=int, default=21, help="latent frames (≤ 21)")
    ap.add_argument("--width", type=int, default=64, help="video width in pixels (latent = /8)")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--query-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-baseline", action="store_true", help="skip the rollout without the observer")
    ap.add_argument("--save", default=None, help="write the profile to this .safetensors path")
    args = ap.parse_args(argv)

    from .. import WanConfig, random_backbone
    from ..policies import make_policy
    from ..sampler import ARSampler
    from .profile import profile_heads
    from .profile_io import save_profile

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    rss_start = _rss_mib()
    model = random_backbone(WanConfig(dim=args.dim, num_heads=args.heads, num_layers=args.layers,
                                      ffn_dim=args.ffn), seed=0, dtype=dtype).to(device)
    g = torch.Generator().manual_seed(1)
    contexts = [(torch.randn(1, 64, 4096, generator=g) * 0.1).to(device, dtype) for _ in range(args.prompts)]
    lh, lw = args.height // SPACE_COMPRESSION, args.width // SPACE_COMPRESSION
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_model = _rss_mib()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    baseline = None
    if not args.no_baseline:  # the same rollout (all prompts) without the observer
        from ..backbone import WanRunner
        from ..schedule import FlowMatchSchedule
        runner = WanRunner(model)
        t0 = time.perf_counter()
        for i, ctx in enumerate(contexts):
            s = ARSampler(runner, make_policy("full"), FlowMatchSchedule(), 3)
            s.start(1, lh, lw, args.frames)
            s.set_prompt(ctx)
            noise = torch.randn(1, 16, args.frames, lh, lw, generator=torch.Generator().manual_seed(i)).to(device)
            s.sample(noise, torch.Generator().manual_seed(i + 1))
        sync()
        baseline = time.perf_counter() - t0
    peak_before = _peak_rss_mib()
    t0 = time.perf_counter()
    profile = profile_heads(model, contexts, frames=args.frames, latent_height=lh, latent_width=lw, seed=args.seed,
                            query_samples=args.query_samples)
    sync()
    seconds = time.perf_counter() - t0
    out = {
        "what": "head profiling (profile_heads) of a random Wan",
        "model": profile.model, "device": str(device), "dtype": args.dtype,
        "prompts": args.prompts, "latent_frames": args.frames, "video_size": f"{args.width}x{args.height}",
        "tokens_per_frame": profile.calibration["tokens_per_frame"],
        "query_samples_per_chunk": args.query_samples,
        "queries_per_frame": profile.calibration["queries_per_frame"],
        "model_calls": profile.calibration["model_calls"],
        "seconds": round(seconds, 3),
        "seconds_without_observer": None if baseline is None else round(baseline, 3),
        "observer_overhead": None if baseline is None else round(seconds / baseline - 1.0, 3),
        "rss_start_mib": round(rss_start, 1), "rss_after_model_mib": round(rss_model, 1),
        "peak_rss_mib": round(_peak_rss_mib(), 1), "peak_rss_before_profiling_mib": round(peak_before, 1),
        "stats_bytes": sum(t.numel() * t.element_size() for t in profile.stats.tensors().values()),
        "labels": {t: lab.counts() for t, lab in profile.labels_by_taxonomy.items()},
        "torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    if args.save:
        save_profile(profile, args.save)
        out["saved"] = args.save
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
