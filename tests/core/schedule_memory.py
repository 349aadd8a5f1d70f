"""Peak memory of a many-segment prompt schedule against its pre-flight estimate (JSON on stdout).

Run in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed buffers go back to the OS at
once, so the peak RSS follows the live tensors):

    MALLOC_MMAP_THRESHOLD_=65536 python -m tests.core.schedule_memory [segments] [width] [height] [policy]

It does what the AR Sampler node does with a PROMPT_SCHEDULE: draw the story's noise segment by
segment, run the schedule, capture the AR_STATE, un-normalize the latents once.
"""

import json
import sys

import torch

from headforcing_core import WanConfig, random_backbone
from headforcing_core.backbone import inspect_backbone
from headforcing_core.memory import estimate_run
from headforcing_core.noise import noise_frames, segment_noise
from headforcing_core.prompts import PromptSchedule, PromptSegment
from headforcing_core.story import generate_schedule


def status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main():
    segments = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    width = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    height = int(sys.argv[3]) if len(sys.argv) > 3 else 160
    policy = sys.argv[4] if len(sys.argv) > 4 else "self_forcing_window"
    torch.set_num_threads(2)
    model = random_backbone(WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512), seed=0)
    spec = inspect_backbone(model)
    lh, lw, fpb, tokens = height // 8, width // 8, 3, 32
    prompts = [torch.randn(1, tokens, 4096, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(4)]
    schedule = PromptSchedule(tuple(PromptSegment(prompts[i % 4], frames=fpb, label=f"p{i}")
                                    for i in range(segments)))
    frames = schedule.total_frames

    def shape_of(n):
        return (1, spec.in_dim, n, lh, lw)

    def run(sched, n):
        noise = segment_noise(lambda s, e: noise_frames(shape_of, 0, s, e), 0, [seg.frames for seg in sched])
        latents, state = generate_schedule(model, sched, noise, policy=policy, frames_per_block=fpb,
                                           generator=torch.Generator().manual_seed(1))
        out = latents * 0.5 + 0.1  # the node's process_latent_out: one more full-length latent
        return out, state

    # warm-up: the same code on a short story (lazy initialisations, allocator pools)
    run(PromptSchedule(schedule.segments[:3]), 9)
    before = status()
    reset_peak()
    out, state = run(schedule, frames)
    after = status()
    peak = after["VmHWM"] - before["VmRSS"]
    est = estimate_run(spec, policy, latent_frames=frames, latent_height=lh, latent_width=lw, frames_per_block=fpb,
                       dtype=torch.float32, state_on_device=True, output_copies=1, text_tokens=tokens)
    print(json.dumps({"segments": segments, "width": width, "height": height, "policy": policy,
                      "latent_frames": frames, "peak_bytes": peak, "estimate_bytes": est.total_bytes,
                      "estimate_phase": est.peak_phase, "phases": est.phases, "breakdown": est.breakdown(),
                      "state_bytes_actual": state.nbytes, "output_bytes": out.numel() * 4,
                      "finite": bool(torch.isfinite(out).all())}))


if __name__ == "__main__":
    main()
