import pytest
import torch

from headforcing_core import WanConfig, random_backbone

TINY = WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512)
# the Wan 2.1 14B layout (Krea Realtime 14B), narrow: 40 layers × 40 heads of width 8
LAYOUT_14B = WanConfig(dim=40 * 8, num_heads=40, num_layers=40, ffn_dim=64)


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny matrix calls (40-layer models): several times faster than a
    contended thread pool on a small shared machine. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model():
    return random_backbone(TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_model64():
    return random_backbone(TINY, seed=0, dtype=torch.float64)


def text_context(batch=1, tokens=24, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, 4096, generator=g) * 0.5).to(dtype)


def latent_noise(frames, h=8, w=8, batch=1, seed=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, frames, h, w, generator=g).to(dtype)


def rel_err(a, b):
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())
