"""GPU checks and the benchmark table, without pytest (run by tools/gpu_check.sh; see its header).

Stages, each recorded in ``$OUT/checks.json`` (pass / fail / skipped, with numbers):

1. ``backends``    every attention backend against the reference on random ragged layouts, bf16;
2. ``full_exact``  the ``full`` policy against the dense block-causal reference (tiny model, fp32, CUDA);
3. ``sync_free``   a steady-state chunk of every preset under ``torch.cuda.set_sync_debug_mode``:
                   no synchronising CUDA call inside the model calls (and the dispatch counters);
4. ``shapes``      the 1.3B shape, a few chunks under every preset, bf16 (finite, right shape);
5. ``pytest``      ``pytest -m gpu tests/core`` when pytest is installed (skipped otherwise);
6. ``bench``       ``python -m headforcing_core.bench`` for every bounded preset at 30 s and 60 s, one
                   process, written to ``$OUT/bench.json`` and summarised in ``$OUT/table.md``;
7. ``memory``      ``python -m headforcing_core.bench --memory``: each preset's measured peak without the
                   weights (1.3B, every bounded preset; 14B, the window and ``head_forcing``) next to the
                   estimate, with the largest allocations at the peak: ``$OUT/memory.json``, ``$OUT/memory.md``;
8. ``backends_bench`` the same bench at the longest length for ``self_forcing_window``, ``pyramid_forcing``
                   and ``head_forcing`` once per attention backend that runs here (one process each),
                   written to ``$OUT/bench_backends.json`` and ``$OUT/backends.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from headforcing_core import WanConfig, generate, random_backbone  # noqa: E402
from headforcing_core.attention import (BACKENDS, LayerProblem, Run, flash_varlen_available,  # noqa: E402
                                        reference_attention, torch_varlen_available, window_bias)
from headforcing_core.policies import PRESETS  # noqa: E402

BOUNDED = [p for p in PRESETS if p != "full"]


def backends(dev) -> dict:
    g = torch.Generator().manual_seed(0)
    worst = {}
    names = runnable_backends(dev)
    for trial in range(40):
        b, ns, tq, d, width = 1 + trial % 2, 2 + trial % 5, 3 + trial % 7, (64, 128)[trial % 2], 20 + trial
        q = torch.randn(b, ns, tq, d, generator=g)
        k = torch.randn(b, ns, width, d, generator=g)
        v = torch.randn(b, ns, width, d, generator=g)
        starts = torch.randint(0, 4, (1, ns), generator=g)
        lengths = torch.randint(1, width - 4, (b, ns), generator=g)
        mask = window_bias(starts, lengths, width, torch.float32)
        dt = torch.float32 if DRY["on"] else torch.bfloat16
        p = LayerProblem(*(t.to(dev, dt) for t in (q, k, v, mask)), lengths.to(dev),
                         (Run(0, ns, width, True),), starts.to(dev))
        ref = reference_attention(p).float()
        for name in names:
            err = float((BACKENDS[name](p).float() - ref).abs().max())
            worst[name] = max(worst.get(name, 0.0), err)
    at_size = plan_sized(dev, names)
    ok = all(e < 3e-2 for e in worst.values()) and all(e < 3e-2 for e in at_size.values())
    return {"ok": ok, "max_abs_error_bf16": worst, "plan_sized_error_vs_padded": at_size,
            "flash_attn": "flash_varlen" in names, "torch_varlen": "torch_varlen" in names}


def plan_sized(dev, names) -> dict:
    """Every backend against ``padded`` on one layer as ``head_forcing`` lays it out at 832×480 (12 heads of
    three types: leads, lengths of 5, 8 and 14 frames, the memory heads' lengths on the device)."""
    frame, tq, d = (8, 24, 16) if DRY["on"] else (1560, 3 * 1560, 128)
    dt = torch.float32 if DRY["on"] else torch.bfloat16
    lengths = torch.tensor([[5, 8, 14] * 4]) * frame
    lengths[0, 2::3] -= torch.arange(4) * (frame // 4)  # episodes held differ by layer row: device-side lengths
    starts = torch.tensor([[2 * frame, frame, 0] * 4])  # every chunk at one offset: history before it differs
    width = -(-int((starts + lengths).max()) // 8) * 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 12, n, d, generator=g).to(dev, dt) for n in (tq, width, width))
    mask = window_bias(starts, lengths, width, dt).to(dev)
    p = LayerProblem(q, k, v, mask, lengths.to(dev), (Run(0, 12, width, True),), starts.to(dev))
    want = BACKENDS["padded"](p).float()
    return {name: float((BACKENDS[name](p).float() - want).abs().max()) for name in names if name != "padded"}


def runnable_backends(dev) -> list[str]:
    """The attention backends that run on ``dev`` in bf16 (the varlen ones need their kernels)."""
    return ["padded", "grouped"] + [name for name, ok in (("torch_varlen", torch_varlen_available),
                                                          ("flash_varlen", flash_varlen_available))
                                    if dev.type == "cuda" and ok(dev, torch.bfloat16)]


def full_exact(dev) -> dict:
    from tests.core.dense_reference import dense_generate
    cfg = WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512)
    model = random_backbone(cfg, seed=0)
    ctx = torch.randn(1, 24, 4096, generator=torch.Generator().manual_seed(1)) * 0.5
    noise = torch.randn(1, 16, 9, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = dense_generate(model, ctx, noise, (1000, 750, 500, 250), 5.0, 3, torch.Generator().manual_seed(5))
        ours = generate(model.to(dev), ctx.to(dev), noise.to(dev), policy="full",
                        generator=torch.Generator().manual_seed(5)).cpu()
    err = float((ours - ref).norm() / ref.norm())
    return {"ok": err < 1e-4, "relative_error_fp32_cuda_vs_dense_cpu": err}


DRY = {"on": False}  # --dry-run: the same stages on the CPU at tiny sizes (to test this script without a GPU)


def sync_free(dev) -> dict:
    from headforcing_core import WanRunner
    from headforcing_core.counters import OpCounter
    from headforcing_core.policies import make_policy
    from headforcing_core.sampler import ARSampler
    from headforcing_core.schedule import FlowMatchSchedule
    dtype = torch.float32 if DRY["on"] else torch.bfloat16
    width, side, layers = (16, 4, 6) if DRY["on"] else (64, 16, 30)  # dry: the script's own check, in seconds
    model = random_backbone(WanConfig(dim=12 * width, num_heads=12, num_layers=layers, ffn_dim=1024), seed=0,
                            dtype=dtype).to(dev)
    runner = WanRunner(model)
    out = {}
    for preset in BOUNDED:
        s = ARSampler(runner, make_policy(preset), FlowMatchSchedule(), 3)
        s.start(1, side, side, 60)
        s.set_prompt(torch.randn(1, 32, 4096, device=dev, dtype=dtype) * 0.1)
        noise = torch.randn(1, 16, 51, side, side, device=dev)
        gen = torch.Generator(device=dev).manual_seed(1)
        with torch.no_grad():
            s.sample(noise[:, :, :48], gen)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            inner = OpCounter()
            forward = runner.forward
            syncs = []

            def checked(*a, **k):
                caught = []
                if dev.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    with warnings.catch_warnings(record=True) as caught, inner:
                        warnings.simplefilter("always")
                        return forward(*a, **k)
                finally:
                    if dev.type == "cuda":
                        torch.cuda.set_sync_debug_mode(0)
                    syncs.extend(str(w.message)[:160] for w in caught if "synchroniz" in str(w.message))

            runner.forward = checked
            try:
                with OpCounter() as outer:
                    s.sample(noise[:, :, 48:], gen)
            finally:
                runner.forward = forward
        out[preset] = {"cuda_syncs_in_model_calls": len(syncs), "examples": syncs[:3],
                       "aten_ops_per_chunk": outer.total, "sync_prone_ops_per_chunk": outer.sync,
                       "aten_ops_in_model_calls": inner.total}
    window = out["self_forcing_window"]["aten_ops_per_chunk"]
    for row in out.values():
        row["ops_ratio_vs_self_forcing_window"] = row["aten_ops_per_chunk"] / window
    ok = all(r["cuda_syncs_in_model_calls"] == 0 for r in out.values())
    return {"ok": ok, "presets": out}


def shapes(dev) -> dict:
    cfg, dtype, (lh, lw) = ((WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512), torch.float32, (8, 8))
                            if DRY["on"] else (WanConfig(), torch.bfloat16, (60, 104)))
    model = random_backbone(cfg, seed=0, dtype=dtype).to(dev)
    out = {}
    for preset in PRESETS:
        g = torch.Generator(device=dev).manual_seed(0)
        noise = torch.randn(1, 16, 9, lh, lw, device=dev, generator=g)
        ctx = torch.randn(1, 64, 4096, device=dev, generator=g) * 0.1
        t = time.perf_counter()
        with torch.no_grad():
            res = generate(model, ctx, noise, policy=preset, generator=g)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[preset] = {"ok": bool(res.shape == noise.shape and torch.isfinite(res).all()),
                       "seconds_9_frames": round(time.perf_counter() - t, 2)}
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"ok": all(r["ok"] for r in out.values()), "presets": out}


def run_pytest(out_dir: Path) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"ok": None, "skipped": "pytest is not installed on this machine"}
    log = out_dir / "pytest_gpu.log"
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/core", "-q", "-p", "no:cacheprovider"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    log.write_text(r.stdout + r.stderr)
    return {"ok": r.returncode == 0, "tail": (r.stdout + r.stderr).strip().splitlines()[-3:]}


def _bench_command(seconds, policies, backend: str | None = None, profile: bool = False) -> list[str]:
    size = ["--model-shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--width", "64", "--height", "64"] \
        if DRY["on"] else ["--model-shape", "1.3b", "--device", "cuda", "--dtype", "bf16", "--width", "832",
                           "--height", "480"]
    extra = (["--attention-backend", backend] if backend else []) + (["--profile"] if profile else [])
    return [sys.executable, "-m", "headforcing_core.bench", *size, "--seconds", *map(str, seconds), "--chunks", "3",
            "--policy", *policies, *extra]


def _run_bench(cmd: list[str], log: Path, timeout: float) -> dict:
    """One bench process: its JSON report, or ``{"error": …}``."""
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write_text(e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
        return {"error": [f"timed out after {timeout:.0f} s"], "command": " ".join(cmd[1:])}
    log.write_text(r.stderr)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-5:], "command": " ".join(cmd[1:])}
    return json.loads(r.stdout)


TABLE_HEAD = ["| length | policy | backend | s/chunk | video fps | × window | pipelined fps (× window) | attended frames | "
              "KV GiB | peak GPU GiB | attention ms/layer call | attention TFLOP/s (% peak) | "
              "ATen ops/chunk (× window) | sync-prone in model calls |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def _table_rows(report: dict) -> list[str]:
    lines = []
    for length, res in report["results"].items():
        for name, row in res["policies"].items():
            c = row.get("counters", {})
            att = row.get("attention", {})
            lines.append(
                f"| {length} | {name} | {row.get('backend', '?')} | {row['seconds_per_chunk']:.3f} | "
                f"{row['video_fps']:.1f} | {row.get('speedup_vs_self_forcing_window', float('nan')):.2f} | "
                f"{row['pipelined_video_fps']:.1f} ({row.get('pipelined_speedup_vs_self_forcing_window', float('nan')):.2f}) | "
                f"{row['attended_frames']:.2f} | {row['kv_bytes'] / 2**30:.2f} | "
                f"{row.get('peak_gpu_bytes', 0) / 2**30:.1f} | {1e3 * att.get('seconds_per_layer_call', float('nan')):.2f} | "
                f"{att.get('tflops', float('nan')):.0f} ({100 * att.get('fraction_of_peak', float('nan')):.0f} %) | "
                f"{c.get('aten_ops_per_chunk', 0)} ({c.get('ops_ratio_vs_self_forcing_window', float('nan')):.2f}) | "
                f"{c.get('sync_ops_in_model_calls', 'n/a')} |")
    return lines


def _header(report: dict) -> str:
    return (f"Device: {report['device_name']}, torch {report['torch']}; matmul peak "
            f"{report.get('matmul_peak_tflops', 0):.0f} TFLOP/s (bf16). Command: `{report['command']}`")


def bench(out_dir: Path, seconds) -> dict:
    cmd = _bench_command(seconds, BOUNDED, profile=True)
    report = _run_bench(cmd, out_dir / "bench.stderr.log", 400)
    if "error" in report:
        return {"ok": False, **report}
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (out_dir / "table.md").write_text("\n".join([_header(report), "", *TABLE_HEAD, *_table_rows(report), "",
                                                 *_profile_rows(report)]) + "\n")
    return {"ok": True, "table": str(out_dir / "table.md")}


def _profile_rows(report: dict) -> list[str]:
    """Where one profiled steady-state chunk's time goes, per op kind, and its five heaviest ops."""
    kinds = ("attention", "matmul", "elementwise", "copy_index")
    lines = ["Profiled chunk (torch.profiler, self time per ATen op; kinds: headforcing_core.bench.OP_KINDS):", "",
             "| length | policy | " + " | ".join(f"{k} ms (%)" for k in kinds) + " | heaviest ops (ms) |",
             "|---|---|" + "---|" * len(kinds) + "---|"]
    for length, res in report["results"].items():
        for name, row in res["policies"].items():
            prof = row.get("profile")
            if not prof:
                continue
            by = prof["seconds_by_kind"]
            total = sum(by.values()) or 1.0
            cells = " | ".join(f"{1e3 * by.get(k, 0):.1f} ({100 * by.get(k, 0) / total:.0f} %)" for k in kinds)
            top = ", ".join(f"{o['op'].removeprefix('aten::')} {1e3 * o['seconds']:.1f}" for o in prof["top_ops"][:5])
            lines.append(f"| {length} | {name} | {cells} | {top} |")
    return lines


MEMORY_RUNS = (("1.3b", 5.0, BOUNDED), ("14b", 2.0, ["self_forcing_window", "head_forcing"]))
MEMORY_HEAD = ["| model | length | policy | measured peak GiB | estimate GiB | estimate / measured | × window | "
               "whole run (state on host) | largest live at the peak |", "|---|---|---|---|---|---|---|---|---|"]


def memory(out_dir: Path) -> dict:
    """``bench --memory``: each preset's peak as the allocator measured it (weights excluded) next to the
    pre-flight estimate, and the largest allocations live at the peak with their call sites (1.3B at 832×480,
    bf16, every bounded preset; 14B, the window and head_forcing)."""
    reports, lines, errors = {}, [], {}
    for shape, seconds, policies in MEMORY_RUNS:
        if DRY["on"]:
            size = ["--model-shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--width", "64", "--height", "64"]
        else:
            size = ["--model-shape", shape, "--device", "cuda", "--dtype", "bf16", "--width", "832", "--height", "480"]
        cmd = [sys.executable, "-m", "headforcing_core.bench", "--memory", *size, "--seconds", str(seconds),
               "--policy", *policies]
        report = _run_bench(cmd, out_dir / f"memory_{shape}.stderr.log", 240)
        if "error" in report:
            errors[shape] = report
            continue
        reports[shape] = report
        for length, res in report["results"].items():
            for name, row in res["policies"].items():
                m = row["memory"]
                top = ", ".join(f"{a['bytes'] / 2**30:.2f} {a.get('where') or a.get('op')}" for a in m["largest_at_peak"][:3])
                lines.append(f"| {shape} | {length} | {name} | {m['device_peak_bytes'] / 2**30:.2f} | "
                             f"{m['device_estimate']['run_bytes'] / 2**30:.2f} | "
                             f"{m['device_estimate_over_measured']:.3f} | "
                             f"{m.get('device_peak_ratio_vs_self_forcing_window', float('nan')):.3f} | "
                             f"{m['peak_bytes'] / 2**30:.2f} | {top} |")
    (out_dir / "memory.json").write_text(json.dumps(reports, indent=2))
    (out_dir / "memory.md").write_text("\n".join(["Peak memory without the weights (bench --memory):", "",
                                                   *MEMORY_HEAD, *lines]) + "\n")
    ratios = [r["memory"]["device_estimate_over_measured"] for rep in reports.values()
              for res in rep["results"].values() for r in res["policies"].values()]
    return {"ok": not errors and all(0.85 <= x <= 1.15 for x in ratios), "table": str(out_dir / "memory.md"),
            "errors": errors, "estimate_over_measured": ratios}


COMPARED = ["self_forcing_window", "pyramid_forcing", "head_forcing"]


BUDGET_S = 450.0  # the whole script, on one H100: the last stage starts no bench it cannot finish
STARTED = time.monotonic()


def compare_backends(out_dir: Path, dev, seconds) -> dict:
    """The typed presets and the window under every backend that runs here, one process each: the
    ratios between backends come from the same machine, minutes apart. The varlen backends go first
    (the ones to learn about); a backend whose run would overrun :data:`BUDGET_S` is skipped."""
    reports, lines, errors, skipped = {}, [], {}, []
    for name in sorted(runnable_backends(dev), key=lambda n: ("varlen" not in n, n)):
        left = BUDGET_S - (time.monotonic() - STARTED)
        if left < 60:
            skipped.append(name)
            continue
        report = _run_bench(_bench_command([max(seconds)], COMPARED, name), out_dir / f"bench_{name}.stderr.log",
                            min(180.0, left))
        if "error" in report:
            errors[name] = report
            continue
        reports[name] = report
        if not lines:
            lines = [_header(report).split(" Command:")[0], "", *TABLE_HEAD]
        lines += _table_rows(report)
    (out_dir / "bench_backends.json").write_text(json.dumps(reports, indent=2))
    (out_dir / "backends.md").write_text("\n".join(lines) + "\n")
    return {"ok": not errors, "backends": list(reports), "errors": errors, "skipped_for_time": skipped,
            "table": str(out_dir / "backends.md")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    ap.add_argument("--seconds", type=float, nargs="+", default=[30.0, 60.0])
    ap.add_argument("--only", nargs="*", default=None, help="run only these stages")
    ap.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at tiny sizes")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    DRY["on"] = args.dry_run
    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device: nothing to check (--dry-run runs the stages on the CPU at tiny sizes)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.dry_run else "cuda")
    results = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(dev),
               "torch": torch.__version__, "stages": {}}
    stages = [("backends", lambda: backends(dev)), ("full_exact", lambda: full_exact(dev)),
              ("sync_free", lambda: sync_free(dev)), ("shapes", lambda: shapes(dev)),
              ("pytest", lambda: run_pytest(out_dir)), ("bench", lambda: bench(out_dir, args.seconds)),
              ("memory", lambda: memory(out_dir)),
              ("backends_bench", lambda: compare_backends(out_dir, dev, args.seconds))]
    failed = False
    for name, fn in stages:
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - record and go on: one stage must not hide the others
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        res["seconds"] = round(time.perf_counter() - t, 1)
        results["stages"][name] = res
        failed |= res.get("ok") is False
        print(f"[gpu_check] {name}: {'skipped' if res.get('ok') is None else 'ok' if res['ok'] else 'FAILED'} "
              f"({res['seconds']} s)", flush=True)
        (out_dir / "checks.json").write_text(json.dumps(results, indent=2, default=str))
    for table in ("table.md", "memory.md", "backends.md"):
        if (out_dir / table).exists():
            print((out_dir / table).read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
