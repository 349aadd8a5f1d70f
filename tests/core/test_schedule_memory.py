"""A 120-segment prompt schedule peaks within 20 % of its pre-flight estimate (issue 13, defect 7).

Before: every segment drew the noise of the whole video up to its end, and the pieces kept those
draws alive, so the peak grew with the square of the segment count (≈ +880 MiB for this story
against a 76 MiB estimate). Now each segment draws its own frames (same values) and the estimate
covers everything the run holds.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args: str) -> dict:
    # freed buffers go back to the OS at once, so the peak RSS follows the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", "tests.core.schedule_memory", *args], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=1200)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_120_segments_peak_within_20_percent_of_the_estimate():
    r = run("120", "256", "160", "self_forcing_window")
    peak, est = r["peak_bytes"], r["estimate_bytes"]
    print(f"\n[memory] 120 segments at 256x160 ({r['latent_frames']} latent frames): peak {peak / 2**20:.1f} MiB, "
          f"estimate {est / 2**20:.1f} MiB ({r['estimate_phase']}: {r['breakdown']}); ratio {peak / est:.2f}")
    assert r["finite"] and r["latent_frames"] == 360
    assert abs(peak - est) <= 0.2 * est, r
