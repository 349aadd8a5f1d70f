"""``tools/gpu_check.sh`` runs where it matters only on a lent GPU; its dry run (the same stages on
the CPU at tiny sizes) keeps the script itself working between those runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_passes_every_stage_and_writes_its_tables(tmp_path):
    stages = ["backends", "full_exact", "sync_free", "shapes", "bench", "memory", "backends_bench"]  # pytest: this run
    r = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--seconds", "2", "--only", *stages], cwd=REPO,
                       env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert list(checks["stages"]) == stages
    assert all(stage["ok"] for stage in checks["stages"].values()), checks
    assert checks["stages"]["backends"]["plan_sized_error_vs_padded"]["grouped"] < 1e-4
    sync = checks["stages"]["sync_free"]["presets"]
    assert all(row["cuda_syncs_in_model_calls"] == 0 for row in sync.values())
    table = (tmp_path / "table.md").read_text()
    assert "Profiled chunk" in table and "| head_forcing |" in table.split("Profiled chunk")[1]
    assert all(f"| {p} |" in table for p in ("self_forcing_window", "pyramid_forcing", "head_forcing"))
    peaks = (tmp_path / "memory.md").read_text()
    assert all(f"| {p} |" in peaks for p in ("self_forcing_window", "pyramid_forcing", "head_forcing")), peaks
    assert all(0.85 <= x <= 1.15 for x in checks["stages"]["memory"]["estimate_over_measured"])
    compared = (tmp_path / "backends.md").read_text()
    assert "| head_forcing | padded |" in compared and "| head_forcing | grouped |" in compared
    assert set(json.loads((tmp_path / "bench_backends.json").read_text())) == {"padded", "grouped"}
