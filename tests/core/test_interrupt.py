"""A stop request lands between transformer blocks: within one block's time at any size."""

import threading
import time

import pytest
import torch

from headforcing_core import Interrupted, WanConfig, generate, random_backbone
from headforcing_core.prompts import PromptSchedule, PromptSegment
from headforcing_core.sampler import Hooks
from headforcing_core.story import generate_schedule

from .conftest import latent_noise, text_context

LAYERS = 4


@pytest.fixture(scope="module")
def deep_model():
    return random_backbone(WanConfig(dim=256, num_heads=2, num_layers=LAYERS, ffn_dim=512), seed=0)


class Stopper:
    """``should_stop`` that logs when it is asked; a thread raises the flag half-way into block ``at_check``."""

    def __init__(self, at_check: int):
        self.at_check = at_check
        self.checks: list[float] = []
        self.flag = False
        self.flag_at = None
        self._seen = threading.Event()

    def __call__(self) -> bool:
        self.checks.append(time.perf_counter())
        if len(self.checks) == self.at_check:
            self._seen.set()
        return self.flag

    def arm(self):
        def later():
            self._seen.wait()
            # the block after check `at_check - 1` took this long; the one now running should take about as long
            block = self.checks[self.at_check - 1] - self.checks[self.at_check - 2]
            time.sleep(0.5 * block)
            self.flag_at = time.perf_counter()
            self.flag = True

        t = threading.Thread(target=later, daemon=True)
        t.start()
        return t


def measure(model, latent: int, frames_per_block: int, at_check: int):
    stopper = Stopper(at_check)
    thread = stopper.arm()
    noise = latent_noise(frames_per_block * 2, h=latent, w=latent)
    with pytest.raises(Interrupted, match="before transformer block"):
        generate(model, text_context(), noise, frames_per_block=frames_per_block, policy="self_forcing_window",
                 generator=torch.Generator().manual_seed(0), should_stop=stopper)
    stopped = time.perf_counter()
    thread.join()
    # block times of the interrupted call (checks LAYERS+1.. are that call's, the first call warms up)
    c = stopper.checks[LAYERS:]
    blocks = [b - a for a, b in zip(c, c[1:])] + [stopped - c[-1]]
    return stopped - stopper.flag_at, sorted(blocks)[len(blocks) // 2], max(blocks), len(stopper.checks)


@pytest.mark.parametrize("latent,fpb,side", [(32, 3, 256), (256, 1, 2048)])
def test_stop_lands_within_one_block(deep_model, latent, fpb, side):
    # checks 1..LAYERS belong to the first model call (one before it, one between each two blocks);
    # the flag rises half-way into block 3 of the second call (after check LAYERS + 3)
    at = LAYERS + 3
    latency, median, longest, checks = measure(deep_model, latent, fpb, at_check=at)
    print(f"\n[timing] {side}x{side} ({latent}x{latent} latent, {fpb} frame(s) per chunk, {LAYERS} blocks): stop "
          f"landed {latency * 1000:.1f} ms after the request; blocks take {median * 1000:.1f} ms (median), "
          f"{longest * 1000:.1f} ms (longest) -> {latency / median:.2f} block times")
    assert checks == at + 1, "the stop must land at the next block boundary, inside the same model call"
    assert latency <= longest + 0.05, (latency, longest)


def test_recache_and_schedule_calls_pass_the_stop_hook(deep_model):
    """Model calls of a recache transition are interruptible between blocks too."""
    a, b = text_context(seed=1), text_context(seed=2)
    calls = []

    def stop():
        calls.append(1)
        # the schedule's first segment takes (4 steps + clean pass) model calls of LAYERS checks each;
        # stop at the second block of the recache call that follows
        return len(calls) == 5 * LAYERS + 2

    schedule = PromptSchedule((PromptSegment(a, frames=3), PromptSegment(b, frames=3, transition="recache",
                                                                          transition_frames=3)))
    with pytest.raises(Interrupted, match="before transformer block 2"):
        generate_schedule(deep_model, schedule, latent_noise(6), generator=torch.Generator().manual_seed(0),
                          hooks=Hooks(should_stop=stop))
