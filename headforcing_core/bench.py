"""Benchmark the AR sampler per cache policy; prints one JSON object.

Examples::

    python -m headforcing_core.bench --estimate --model-shape 1.3b --seconds 60      # cache plan only
    python -m headforcing_core.bench --estimate --model-shape 14b --weights-dtype fp8 --seconds 60
    python -m headforcing_core.bench --model-shape tiny --width 256 --height 128 --seconds 30 --chunks 3
    python -m headforcing_core.bench --model-shape 1.3b --device cuda --dtype bf16 --seconds 30 60
    python -m headforcing_core.bench --memory --model-shape 1.3b --device cuda --seconds 10           # peak memory
    python -m headforcing_core.bench --estimate --model-shape 14b --seconds 60 --loop krea     # + Krea's loop

Timed runs use random weights of the named shape. To measure a long video's
steady state without generating all of it, the cache is first filled with
random K/V for every frame before the timed window (``--chunks`` chunks at the
end of the video); attention cost depends on sizes, not values. All policies
are measured in one process so their ratios are comparable.

Two throughputs: ``seconds_per_chunk`` / ``video_fps`` synchronise after every chunk (as a
ComfyUI run that previews each chunk does, so the host's planning and committing show), and
``pipelined_seconds_per_chunk`` / ``pipelined_video_fps`` time as many chunks again with one
synchronisation at the end (the host plans the next chunk while the device still works: the
DiT-only throughput of a run nothing waits on).

Every timed policy also reports the *counters* of one steady-state chunk, taken with
:class:`~headforcing_core.counters.OpCounter` (a ``TorchDispatchMode``): ATen ops per chunk and
inside its model calls, and sync-prone ops (``.item()``, ``nonzero``, tensors made from host
data, host→device copies, …) per chunk and inside its model calls; plus the bytes of history
gathered and rotated once per chunk and the bytes each model call writes. They are the same on
a CPU as on a GPU (the same ops are dispatched), so ``--device cpu`` shows what a GPU run does.

``--profile`` runs one more steady-state chunk per policy under ``torch.profiler`` and reports its
time (device time on CUDA) per op kind — attention, matmul, elementwise, copy/index — and its
heaviest ATen ops: where a chunk goes, in the same run as the throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time

import torch

from .backbone import BackboneSpec, WanRunner
from .bench_memory import measure_run
from .geometry import SPACE_COMPRESSION, TIME_COMPRESSION, latent_frames_for_seconds
from .memory import estimate_run
from .policies import PRESETS, make_policy
from .sampler import ARSampler, Hooks
from .schedule import FlowMatchSchedule
from .wan_model import WanConfig, random_backbone

MODEL_SHAPES = {
    "tiny": WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512),
    "1.3b": WanConfig(),
    "14b": WanConfig(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824),
    # the head layouts made narrow, for CPU measurements (16-wide heads, Wan's feed-forward ratio, a
    # 32-token text): the KV cache dominates and the rest keeps the proportions it has at full size
    "1.3b-narrow": WanConfig(dim=12 * 16, num_heads=12, num_layers=30, ffn_dim=1120, text_len=32),
    "14b-narrow": WanConfig(dim=40 * 16, num_heads=40, num_layers=40, ffn_dim=1728, text_len=32),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the weights term of the estimates: the model as ComfyUI holds it loaded (fp8: UNETLoader's fp8_e4m3fn / e5m2)
WEIGHTS_DTYPES = {**DTYPES, "fp8": torch.float8_e4m3fn}
MEMORY_PROMPT_TOKENS = 64  # text-encoder tokens of the two prompts of a --memory run
DEFAULT_POLICIES = ("self_forcing_window", "sink_window", "longlive", "pyramid_forcing", "head_forcing")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(sampler: ARSampler, frames: int, generator: torch.Generator) -> None:
    """Commit random K/V for frames [0, frames) chunk by chunk, as the clean passes would."""
    spec, cache = sampler.runner.spec, sampler.cache
    f = sampler.frames_per_block
    for start in range(0, frames, f):
        n = min(f, frames - start)
        shape = (spec.num_layers, sampler.batch, n * cache.tokens, spec.num_heads, spec.head_dim)
        dev = generator.device  # draw where the generator lives (the device in timed runs: no host copies)
        k = torch.randn(shape, generator=generator, device=dev).to(sampler.runner.device, sampler.runner.dtype)
        v = torch.randn(shape, generator=generator, device=dev).to(sampler.runner.device, sampler.runner.dtype)
        cache.commit(start, n, k, v)
    sampler.next_frame = frames


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, iters: int = 10) -> float:
    """Achieved FLOP/s of a large square matrix multiply (the device's practical peak)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t)


def time_attention(sampler: ARSampler, plan, iters: int = 3) -> dict:
    """Time one layer's planned attention (chunk write + backend) in isolation."""
    from .chunk_attention import ChunkAttention

    spec, dev, dtype = sampler.runner.spec, sampler.runner.device, sampler.runner.dtype
    s = plan.frames * plan.tokens
    q, k, v = (torch.randn(sampler.batch, s, spec.num_heads, spec.head_dim, device=dev, dtype=dtype)
               for _ in range(3))
    attn = ChunkAttention(plan, sampler.cache, sampler.backend)  # binds a scratch again (the chunk released it)
    attn(0, q, k, v)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        attn(0, q, k, v)
    _sync(dev)
    seconds = (time.perf_counter() - t) / iters
    flops = 4 * s * plan.attended_tokens() * spec.dim * sampler.batch
    return {"seconds_per_layer_call": seconds, "flops_per_layer_call": flops, "tflops": flops / seconds / 1e12}


def count_chunk(sampler: ARSampler, noise: torch.Tensor, generator: torch.Generator) -> dict:
    """Dispatch counts of one chunk (its planning, five model calls and commit) and of its model calls."""
    from .counters import OpCounter

    inner = OpCounter()
    runner = sampler.runner
    forward = runner.forward

    def counted(*args, **kwargs):
        with inner:
            return forward(*args, **kwargs)

    runner.forward = counted
    try:
        with OpCounter() as outer:
            sampler.sample(noise, generator)
    finally:
        runner.forward = forward
    return {"aten_ops_per_chunk": outer.total, "sync_ops_per_chunk": outer.sync,
            "aten_ops_in_model_calls": inner.total, "sync_ops_in_model_calls": inner.sync,
            "sync_ops_by_name": dict(outer.sync_ops)}


def phase_times(sampler: ARSampler, noise: torch.Tensor, generator: torch.Generator) -> dict:
    """Seconds one chunk spends planning, in its model calls and committing (synchronised around each, so
    the total exceeds an overlapped chunk's; for where the time goes, not for throughput)."""
    from . import sampler as sampler_module

    dev = sampler.runner.device
    times = {"plan": 0.0, "model_calls": 0.0, "commit": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            _sync(dev)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(dev)
                times[key] += time.perf_counter() - t
        return wrapper

    plan, forward, commit = sampler_module.plan_chunk, sampler.runner.forward, sampler.cache.commit
    sampler_module.plan_chunk = timed("plan", plan)
    sampler.runner.forward = timed("model_calls", forward)
    sampler.cache.commit = timed("commit", commit)
    try:
        sampler.sample(noise, generator)
    finally:
        sampler_module.plan_chunk, sampler.runner.forward, sampler.cache.commit = plan, forward, commit
    return {k: round(v, 4) for k, v in times.items()}


# What an ATen op's kernels are, by the op's name (torch.profiler attributes kernel time to the op
# that launched it). The first matching kind wins; anything else is "elementwise" (norms, RoPE,
# modulation, activations, reductions).
OP_KINDS = (
    ("attention", ("attention", "flash", "varlen", "sdpa")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                "aten::convolution", "aten::_convolution", "aten::cudnn_convolution")),
    ("copy_index", ("copy", "index", "gather", "scatter", "aten::cat", "aten::clone", "aten::fill_", "aten::zero_",
                    "aten::flip", "aten::contiguous", "aten::where", "aten::stack")),
)
PROFILE_TOP = 20


def op_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in OP_KINDS:
        if any(n in lowered if not n.startswith("aten::") else lowered == n for n in needles):
            return kind
    return "elementwise"


def profile_chunk(sampler: ARSampler, noise: torch.Tensor, generator: torch.Generator) -> dict:
    """Where one steady-state chunk's device time goes (CPU time on a CPU), with torch.profiler: the
    seconds per op kind (:data:`OP_KINDS`) and the :data:`PROFILE_TOP` ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = sampler.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(sampler.runner.device)
    with profile(activities=activities) as prof:
        sampler.sample(noise, generator)
        _sync(sampler.runner.device)
    rows = []
    for e in prof.key_averages():
        if cuda:  # named self_device_time_total from torch 2.4, self_cuda_time_total before
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        else:
            us = e.self_cpu_time_total
        # operators only (aten::, flash_attn::, …; not runtime calls): each kernel counted once, under
        # the innermost operator that launched it
        if us > 0 and "::" in e.key:
            rows.append((e.key, us / 1e6, e.count))
    rows.sort(key=lambda r: -r[1])
    by_kind: dict[str, float] = {}
    for name, sec, _ in rows:
        by_kind[op_kind(name)] = by_kind.get(op_kind(name), 0.0) + sec
    return {"clock": "device" if cuda else "cpu", "seconds_by_kind": {k: round(v, 5) for k, v in by_kind.items()},
            "top_ops": [{"op": n, "seconds": round(sec, 5), "calls": c, "kind": op_kind(n)}
                        for n, sec, c in rows[:PROFILE_TOP]]}


def run_policy(model, policy_name: str, args, latent_frames: int, device: torch.device) -> dict:
    dtype = DTYPES[args.dtype]
    runner = WanRunner(model, dtype=dtype, device=device)
    sampler = ARSampler(runner, make_policy(policy_name), FlowMatchSchedule(), args.frames_per_block,
                        args.attention_backend)
    lh, lw = args.height // SPACE_COMPRESSION, args.width // SPACE_COMPRESSION
    f = args.frames_per_block
    # time whole chunks at the end of the video; everything before is prefilled
    timed_frames = min(args.chunks, max(latent_frames // f, 1)) * f
    extra = 3 if args.profile else 2  # untimed chunks before the timed ones: counted, phases, profiled
    start_frame = max(0, (latent_frames - 2 * timed_frames - extra * f) // f * f)
    sampler.start(1, lh, lw, latent_frames)
    gen = torch.Generator().manual_seed(0)
    renoise = torch.Generator(device=device).manual_seed(1)  # noise drawn where the model runs
    sampler.set_prompt(torch.randn(1, 64, runner.spec.text_dim, generator=gen) * 0.1)
    prefill(sampler, start_frame, torch.Generator(device=device).manual_seed(2))
    noise = torch.randn(1, runner.spec.in_dim, 2 * timed_frames + extra * f, lh, lw, generator=gen).to(device)
    counters = count_chunk(sampler, noise[:, :, :f], renoise)  # one steady-state chunk, counted (not timed)
    phases = phase_times(sampler, noise[:, :, f:2 * f], renoise)  # one more, its phases timed apart
    profiled = profile_chunk(sampler, noise[:, :, 2 * f:3 * f], renoise) if args.profile else None
    plan = sampler.last_plan
    counters.update(gathered_bytes_per_model_call=plan.gathered_bytes,
                    chunk_bytes_written_per_model_call=plan.chunk_write_bytes(),
                    bytes_moved_per_layer_call=plan.bytes_per_layer_call(), query_frame_classes=plan.classes)
    attended = plan.attended_tokens()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    chunk_times: list[float] = []
    last = [time.perf_counter()]

    def on_chunk(_i, _x):
        _sync(device)
        now = time.perf_counter()
        chunk_times.append(now - last[0])
        last[0] = now

    _sync(device)
    last[0] = time.perf_counter()
    synced = slice(extra * f, extra * f + timed_frames)
    sampler.sample(noise[:, :, synced], renoise, Hooks(on_chunk=on_chunk))
    measured = chunk_times[args.warmup:] or chunk_times
    spc = sum(measured) / len(measured)
    # the same number of chunks again with no synchronisation between them: the host plans and
    # commits while the device still runs the previous work, as in a run nothing waits on
    _sync(device)
    t = time.perf_counter()
    sampler.sample(noise[:, :, synced.stop:], renoise)
    _sync(device)
    pipelined = (time.perf_counter() - t) / (timed_frames // f)
    tokens = plan.tokens
    out = {
        "kv_bytes_allocated": sampler.cache.nbytes,
        "attended_tokens_measured": attended,
        "attended_frames_measured": attended / tokens,
        "seconds_per_chunk": spc,
        "chunk_seconds": chunk_times,
        "video_fps": TIME_COMPRESSION * f / spc,
        "timed_chunks": len(chunk_times),
        "pipelined_seconds_per_chunk": pipelined,
        "pipelined_video_fps": TIME_COMPRESSION * f / pipelined,
        "start_frame": start_frame,
        "backend": sampler.backend_name,
        "counters": counters,
        "phase_seconds": phases,
    }
    if profiled is not None:
        out["profile"] = profiled
    flops = runner.spec.forward_flops(f * tokens, attended)
    calls = len(sampler.noise_schedule.timesteps) + 1
    out["flops_per_chunk"] = {k: v * calls for k, v in flops.items()}
    out["achieved_tflops"] = flops["total"] * calls / spc / 1e12
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    out["attention"] = time_attention(sampler, sampler.last_plan)
    return out


def _krea_row(spec: BackboneSpec, frames: int, args) -> dict:
    """The estimate row of Krea Realtime's loop (headforcing_core.krea): its default settings, the context
    re-encode's VAE state in the KV dtype."""
    from .krea import KreaSettings, estimate_krea

    dtype = DTYPES[args.dtype] if args.dtype != "fp32" else torch.bfloat16
    est = estimate_krea(spec, KreaSettings(), latent_frames=frames, latent_height=args.height // SPACE_COMPRESSION,
                        latent_width=args.width // SPACE_COMPRESSION, dtype=dtype, vae_dtype=dtype,
                        weights_bytes=spec.weights_bytes(WEIGHTS_DTYPES[args.weights_dtype]))
    return {"kv_bytes": est.kv_bytes, "kv_bytes_by_type": est.kv_bytes_by_type, "attended_tokens": est.attended_tokens,
            "attended_frames": est.attended_tokens / est.tokens_per_frame, "workspace_bytes": est.attention_bytes,
            "run_bytes": est.run_bytes, "weights_bytes": est.weights_bytes, "total_bytes": est.total_bytes,
            "krea_context_bytes": est.extra_bytes, "kv_dtype": str(dtype)[6:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m headforcing_core.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="1.3b")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--seconds", type=float, nargs="+", default=[30.0], help="video lengths to measure")
    ap.add_argument("--policy", nargs="+", default=list(DEFAULT_POLICIES), choices=list(PRESETS),
                    help="policies to compare (all in this run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--frames-per-block", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=3, help="chunks timed at the end of each video")
    ap.add_argument("--warmup", type=int, default=1, help="timed chunks to drop as warm-up")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--estimate", action="store_true", help="no model run: only the cache plan")
    ap.add_argument("--weights-dtype", choices=sorted(WEIGHTS_DTYPES), default="bf16",
                    help="the weights in each row's total_bytes, as ComfyUI holds them loaded in this dtype (fp8: "
                         "UNETLoader's fp8_e4m3fn / fp8_e5m2 weight_dtype, 1 byte a parameter but the float32 patch "
                         "embedding); the timed model still runs in --dtype")
    ap.add_argument("--profile", action="store_true",
                    help="one more steady-state chunk per policy under torch.profiler: time per op kind, top ops")
    ap.add_argument("--memory", action="store_true",
                    help="measure each policy's peak memory instead of timing it: a whole run (two prompts, the "
                         "AR_STATE captured) under the allocation tracker on a CPU, from the CUDA allocator on a "
                         "GPU (with the largest allocations at the peak), next to the estimate "
                         "(headforcing_core.bench_memory)")
    ap.add_argument("--loop", choices=("self_forcing", "krea"), default="self_forcing",
                    help="krea: with --estimate, also a row for Krea Realtime's loop (its defaults, the Wan 2.1 VAE's "
                         "re-encode state in the KV dtype)")
    args = ap.parse_args(argv)
    if args.loop == "krea" and not args.estimate:
        ap.error("--loop krea is an estimate row: add --estimate")
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cfg = MODEL_SHAPES[args.model_shape]
    if args.width % 16 or args.height % 16:
        ap.error("width and height must be multiples of 16")

    # the estimate rows' weights as --weights-dtype stores them (fp8: cast layer by layer, weights_bytes)
    spec = dataclasses.replace(BackboneSpec.from_config(cfg), weights_dtype=WEIGHTS_DTYPES[args.weights_dtype])
    report: dict = {
        "command": "python -m headforcing_core.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model_shape": args.model_shape, "width": args.width, "height": args.height,
        "frames_per_block": args.frames_per_block, "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "estimate_only": args.estimate, "results": {},
        "weights_dtype": args.weights_dtype, "weights_bytes": spec.weights_bytes(WEIGHTS_DTYPES[args.weights_dtype]),
    }
    model = None
    if not args.estimate:
        model = random_backbone(cfg, seed=0, dtype=DTYPES[args.dtype]).to(device)
        if not args.memory:
            report["matmul_peak_tflops"] = measure_matmul_peak(device, DTYPES[args.dtype]) / 1e12
    gen = torch.Generator().manual_seed(7)
    tokens = min(MEMORY_PROMPT_TOKENS, spec.text_len)
    prompts = [torch.randn(1, tokens, spec.text_dim, generator=gen) * 0.1 for _ in range(2)]
    for seconds in args.seconds:
        frames = latent_frames_for_seconds(seconds)
        per_policy = {}
        for name in args.policy:
            est = estimate_run(spec, name, latent_frames=frames, latent_height=args.height // SPACE_COMPRESSION,
                               latent_width=args.width // SPACE_COMPRESSION, frames_per_block=args.frames_per_block,
                               dtype=DTYPES[args.dtype] if args.dtype != "fp32" else torch.bfloat16,
                               weights_bytes=report["weights_bytes"])
            row = {"kv_bytes": est.kv_bytes, "kv_bytes_by_type": est.kv_bytes_by_type,
                   "attended_tokens": est.attended_tokens, "attended_frames": est.attended_tokens / est.tokens_per_frame,
                   "workspace_bytes": est.attention_bytes, "run_bytes": est.run_bytes,
                   "weights_bytes": est.weights_bytes, "total_bytes": est.total_bytes,
                   "kv_dtype": "bf16" if args.dtype == "fp32" else args.dtype}
            if model is not None and args.memory:
                row["memory"] = measure_run(model, name, prompts, latent_frames=frames,
                                            latent_height=args.height // SPACE_COMPRESSION,
                                            latent_width=args.width // SPACE_COMPRESSION,
                                            frames_per_block=args.frames_per_block, dtype=DTYPES[args.dtype],
                                            device=device, attention_backend=args.attention_backend)
            elif model is not None:
                row.update(run_policy(model, name, args, frames, device))
            per_policy[name] = row
        ref = per_policy.get("self_forcing_window")
        if ref:
            for row in per_policy.values():
                row["kv_ratio_vs_self_forcing_window"] = row["kv_bytes"] / ref["kv_bytes"]
                row["attended_ratio_vs_self_forcing_window"] = row["attended_tokens"] / ref["attended_tokens"]
                if "video_fps" in row and "video_fps" in ref:
                    row["speedup_vs_self_forcing_window"] = row["video_fps"] / ref["video_fps"]
                    row["pipelined_speedup_vs_self_forcing_window"] = (row["pipelined_video_fps"]
                                                                       / ref["pipelined_video_fps"])
                if "memory" in row and "memory" in ref:
                    row["memory"]["device_peak_ratio_vs_self_forcing_window"] = (
                        row["memory"]["device_peak_bytes"] / ref["memory"]["device_peak_bytes"])
                if "counters" in row and "counters" in ref:
                    row["counters"]["ops_ratio_vs_self_forcing_window"] = (
                        row["counters"]["aten_ops_per_chunk"] / ref["counters"]["aten_ops_per_chunk"])
        if args.loop == "krea":
            per_policy["krea"] = _krea_row(spec, frames, args)
        report["results"][f"{seconds:g}s"] = {"latent_frames": frames, "policies": per_policy}
    if model is not None and not args.memory:
        for length in report["results"].values():
            for row in length["policies"].values():
                row["forward_fraction_of_peak"] = row["achieved_tflops"] / report["matmul_peak_tflops"]
                row["attention"]["fraction_of_peak"] = row["attention"]["tflops"] / report["matmul_peak_tflops"]
    report["vae_decode"] = "not measured: the core has no VAE; decode speed is ComfyUI's VAEDecode"
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
