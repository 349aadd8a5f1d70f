import pytest
import torch

from headforcing_core.errors import ShapeError
from headforcing_core.schedule import FlowMatchSchedule


def test_warped_self_forcing_steps():
    s = FlowMatchSchedule((1000, 750, 500, 250), shift=5.0)
    assert s.timesteps == pytest.approx([1000.0, 937.5, 833.3333333, 625.0])


def test_unwarped_and_shift_one_is_linear():
    s = FlowMatchSchedule((1000, 750, 500, 250), shift=1.0)
    assert s.timesteps == pytest.approx([1000, 750, 500, 250])
    assert FlowMatchSchedule((1000, 500), shift=5.0, warp=False).timesteps == (1000.0, 500.0)


def test_sigma_lookup_is_nearest_table_entry():
    s = FlowMatchSchedule(shift=5.0)
    assert s.sigma(1000.0) == 1.0
    assert s.sigma(937.5) == pytest.approx(0.9375)
    assert s.sigma(937.6) == pytest.approx(0.9375)  # nearest entry, not interpolated
    assert s.sigma(0.0) == pytest.approx(5 * 0.001 / (1 + 4 * 0.001))  # the table ends at s = 1/1000


def test_x0_and_renoise_invert_each_other():
    s = FlowMatchSchedule()
    x0 = torch.randn(2, 16, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x_t = s.renoise(x0, eps, 1)  # to denoising step 1's sigma
    flow = eps - x0  # the exact flow for x_t = (1-σ)x0 + σε
    assert torch.allclose(s.to_x0(x_t, flow, 1), x0, atol=1e-12)
    # the sigmas a run uses are looked up once, when the schedule is made
    assert s.sigmas == tuple(s.sigma(t) for t in s.timesteps)


@pytest.mark.parametrize("steps", [(), (500, 750), (1200,), (0,)])
def test_bad_steps_are_refused(steps):
    with pytest.raises(ShapeError):
        FlowMatchSchedule(steps)
