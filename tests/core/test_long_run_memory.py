"""A 10-minute generation with the tiny model runs on CPU with flat memory."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("policy", ["head_forcing", "pyramid_forcing"])
def test_ten_minutes_with_flat_memory(policy):
    out = subprocess.run([sys.executable, "-m", "tests.core.long_run_rss", policy], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=900)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    r = report["readings"]
    assert report["finite"] and report["frames"] == 2400
    assert set(r) == {"1", "5", "10"}
    # peak RSS after 10 minutes of video stays within 16 MiB of the peak after 1 minute
    assert r["10"]["VmHWM"] - r["1"]["VmHWM"] < 16 * 1024, r
    assert r["5"]["VmHWM"] - r["1"]["VmHWM"] < 16 * 1024, r
