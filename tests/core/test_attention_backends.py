"""Every attention backend agrees with the per-sequence reference on random ragged layouts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import headforcing_core.attention as attention
from headforcing_core.attention import (BACKENDS, LayerProblem, Run, flash_varlen_available, reference_attention,
                                        select_backend, torch_varlen_available)

from . import varlen_contract


@st.composite
def layouts(draw):
    """A layer's sequences: runs of sequences sharing a key window, some with device-side lengths."""
    batch = draw(st.integers(1, 2))
    queries = draw(st.integers(1, 9))
    dim = draw(st.sampled_from([8, 16, 64]))
    width = draw(st.integers(4, 40))
    runs = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 3), st.integers(1, 4), st.booleans()),
                         min_size=1, max_size=4))  # (sequences, lead, length, device-side lengths)
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, queries, dim, width, runs, seed


def make_problem(batch, queries, dim, width, runs, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ns = sum(n for n, *_ in runs)
    q = torch.randn(batch, ns, queries, dim, generator=g)
    k = torch.randn(batch, ns, width, dim, generator=g)
    v = torch.randn(batch, ns, width, dim, generator=g)
    starts = torch.zeros(batch, ns, dtype=torch.int64)
    lengths = torch.zeros(batch, ns, dtype=torch.int64)
    out_runs, first = [], 0
    for n, lead, length, masked in runs:
        lead = min(lead, width - 1)
        length = max(1, min(width - lead, length * width // 4))
        starts[:, first:first + n] = lead
        if masked:  # lengths that differ per batch row and sequence, known on the device only
            lengths[:, first:first + n] = torch.randint(1, length + 1, (batch, n), generator=g)
        else:
            lengths[:, first:first + n] = length
        out_runs.append(Run(first, first + n, length, masked, lead))
        first += n
    pos = torch.arange(width)
    keep = (pos >= starts[..., None]) & (pos < (starts + lengths)[..., None])
    mask = torch.where(keep, 0.0, float("-inf")).unsqueeze(-2)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return LayerProblem(cast(q), cast(k), cast(v), cast(mask), lengths.to(device), tuple(out_runs), starts.to(device))


@pytest.mark.parametrize("name", ["grouped", "padded"])
@settings(max_examples=60, deadline=None)
@given(layout=layouts())
def test_cpu_backends_match_reference(name, layout):
    p = make_problem(*layout)
    ref = reference_attention(p)
    got = BACKENDS[name](p)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name,seqused", [("torch_varlen", True), ("torch_varlen", False), ("flash_varlen", False)])
@settings(max_examples=60, deadline=None)
@given(layout=layouts())
def test_varlen_backends_match_reference_with_the_kernel_contract(name, seqused, layout):
    """The varlen backends' offsets, used lengths and packing, with the kernels' documented contract
    (tests/core/varlen_contract.py) standing in for the CUDA kernels."""
    p = make_problem(*layout)
    with pytest.MonkeyPatch.context() as mp:
        varlen_contract.install(mp, seqused=seqused)
        got = BACKENDS[name](p)
    assert got.shape == p.q.shape
    assert torch.allclose(got, reference_attention(p), atol=2e-5, rtol=1e-4)


def test_torch_varlen_reads_the_planned_buffer_in_place_when_the_kernel_takes_used_lengths(monkeypatch):
    """With ``seqused_k`` the keys handed over are the buffer itself (a view: nothing packed), and each
    sequence's slot starts at its lead."""
    p = make_problem(1, 3, 16, 24, [(2, 3, 2, True), (1, 5, 3, False)], 3)
    seen = {}

    def spy(query, key, value, cu_q, cu_k, max_q, max_k, *, seqused_k=None):
        seen.update(key=key, cu_k=cu_k.tolist(), used=seqused_k.tolist())
        return varlen_contract.varlen(query, key, value, cu_q, cu_k, max_q, max_k, seqused_k=seqused_k)

    monkeypatch.setattr(attention, "_torch_varlen_fn", lambda: (spy, True))
    got = attention.torch_varlen_attention(p)
    assert seen["key"].data_ptr() == p.k.data_ptr() and seen["key"].shape == (3 * 24, 1, 16)
    assert seen["cu_k"] == [3, 24 + 3, 48 + 5, 72]
    assert seen["used"] == p.lengths.reshape(-1).tolist()
    assert torch.allclose(got, reference_attention(p), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("seqused", [True, False])
def test_torch_varlen_binds_this_torchs_real_kernel(monkeypatch, seqused):
    """The real ``varlen_attn`` of the installed torch takes our arguments (run on meta tensors, where
    its registered fake kernel checks the call without computing): the signature we detect is the one
    we call."""
    real, takes_seqused = attention._torch_varlen_fn.__wrapped__()
    if real is None or (seqused and not takes_seqused):
        pytest.skip("this torch's varlen_attn lacks what this case calls")
    monkeypatch.setattr(attention, "_torch_varlen_fn", lambda: (real, seqused))
    p = make_problem(2, 3, 16, 24, [(2, 3, 2, True), (1, 5, 3, False)], 3, dtype=torch.bfloat16)
    p = LayerProblem(*(t.to("meta") for t in (p.q, p.k, p.v, p.mask, p.lengths)), p.runs, p.starts.to("meta"))
    out = attention.torch_varlen_attention(p)
    assert out.device.type == "meta" and out.shape == p.q.shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["torch_varlen", "flash_varlen"])
def test_varlen_backends_hand_a_pool_read_in_place_to_sdpa(monkeypatch, name):
    """A prerotated pool has no per-sequence lengths, only (maybe) a mask over its pages: SDPA's case."""
    p = make_problem(2, 3, 16, 20, [(3, 0, 4, False)], 4)
    p.mask[..., 4:8] = float("-inf")  # a page the chunk does not attend
    p = LayerProblem(p.q, p.k, p.v, p.mask, None, p.runs, None)
    varlen_contract.install(monkeypatch)
    monkeypatch.setattr(attention, "_torch_varlen_fn", lambda: pytest.fail("the varlen kernel was called"))
    monkeypatch.setattr(attention, "_flash_varlen_fn", lambda: lambda *a: pytest.fail("the varlen kernel was called"))
    assert torch.allclose(BACKENDS[name](p), reference_attention(p), atol=2e-5, rtol=1e-4)


def test_grouped_hands_sdpa_masks_that_start_on_an_aligned_key(monkeypatch):
    """CUDA's masked SDPA reads the bias in 16-byte vectors: a mask view must start at a multiple
    of KEY_ALIGN keys (an unaligned start was a 'misaligned address' on the H200)."""
    import headforcing_core.attention as attention

    p = make_problem(2, 3, 16, 40, [(2, 3, 2, True), (1, 5, 3, True), (1, 0, 1, False)], 7)
    seen, real = [], attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        if attn_mask is not None:
            seen.append((attn_mask.storage_offset() % attention.KEY_ALIGN, k.shape[2]))
        return real(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    got = attention.grouped_attention(p)
    assert len(seen) == 2 and all(offset == 0 for offset, _ in seen)
    assert torch.allclose(got, reference_attention(p), atol=2e-5, rtol=1e-4)


def test_reference_is_a_real_softmax_over_the_window():
    p = make_problem(1, 3, 8, 10, [(1, 2, 4, False)], 0)
    p.k[0, 0, 4] = 50 * p.q[0, 0, 0]  # query 0 must attend almost only to key 4 (inside [2, 12))
    p.k[0, 0, 0] = 80 * p.q[0, 0, 0]  # key 0 is in the lead: masked out, it must not win
    out = reference_attention(p)
    assert torch.allclose(out[0, 0, 0], p.v[0, 0, 4], atol=1e-4)


def test_auto_picks_padded_on_cpu_without_flash():
    name, fn = select_backend("auto", torch.device("cpu"), torch.float32)
    assert name == "padded" and fn is BACKENDS["padded"]
    assert not torch_varlen_available(torch.device("cpu"), torch.bfloat16)
    for unavailable in ("flash_varlen", "torch_varlen", "nope"):
        with pytest.raises(ValueError):
            select_backend(unavailable, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("flash,torch_varlen,want", [(True, True, "flash_varlen"), (False, True, "torch_varlen"),
                                                     (False, False, "padded")])
def test_auto_prefers_flash_attn_then_torch_varlen_then_padded(monkeypatch, flash, torch_varlen, want):
    monkeypatch.setattr(attention, "flash_varlen_available", lambda device, dtype: flash)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda device, dtype: torch_varlen)
    assert select_backend("auto", torch.device("cuda"), torch.bfloat16)[0] == want


def test_torch_varlen_probe_refuses_a_kernel_that_fails_or_is_wrong(monkeypatch):
    """``auto`` only picks torch_varlen after one probe call agrees with the reference on the device."""
    attention._torch_varlen_works.cache_clear()
    try:
        monkeypatch.setattr(attention, "_torch_varlen_fn", lambda: (varlen_contract.varlen, True))
        assert attention._torch_varlen_works("cpu")
        attention._torch_varlen_works.cache_clear()
        monkeypatch.setattr(attention, "_torch_varlen_fn",
                            lambda: (lambda q, k, v, *a, **kw: varlen_contract.varlen(q, k, v, *a, **kw) + 1, True))
        assert not attention._torch_varlen_works("cpu")
        attention._torch_varlen_works.cache_clear()

        def broken(*a, **kw):
            raise RuntimeError("no kernel image is available for execution on the device")

        monkeypatch.setattr(attention, "_torch_varlen_fn", lambda: (broken, True))
        assert not attention._torch_varlen_works("cpu")
    finally:
        attention._torch_varlen_works.cache_clear()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@st.composite
def gpu_layouts(draw):
    """Layouts as the plan makes them on a GPU: 64- or 128-wide heads, key slots a multiple of 8."""
    batch, queries, _, width, runs, seed = draw(layouts())
    return batch, queries, draw(st.sampled_from([64, 128])), -(-width // 8) * 8, runs, seed


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["grouped", "padded", "flash_varlen", "torch_varlen"])
@settings(max_examples=30, deadline=None)
@given(layout=gpu_layouts())
def test_gpu_backends_match_reference_bf16(name, layout):
    if name == "flash_varlen" and not flash_varlen_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("flash-attn not installed")
    if name == "torch_varlen" and not torch_varlen_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this torch has no usable torch.nn.attention.varlen kernel")
    p = make_problem(*layout, dtype=torch.bfloat16, device="cuda")
    ref = reference_attention(p)
    got = BACKENDS[name](p)
    assert torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name,seqused", [("torch_varlen", True), ("torch_varlen", False), ("flash_varlen", False)])
def test_varlen_backends_never_wait_for_the_host(monkeypatch, name, seqused):
    """Offsets, used lengths and packing destinations are made on the device from the plan's tensors:
    nothing the backend itself dispatches is sync-prone (the kernel stand-in runs outside the count)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from headforcing_core.counters import OpCounter

    def uncounted(*args, **kwargs):
        with _disable_current_modes():
            return varlen_contract.varlen(*args, **kwargs)

    varlen_contract.install(monkeypatch, seqused=seqused)
    monkeypatch.setattr(attention, "_torch_varlen_fn", lambda: (uncounted, seqused))
    monkeypatch.setattr(attention, "_flash_varlen_fn", lambda: uncounted)
    p = make_problem(2, 3, 16, 24, [(2, 3, 2, True), (1, 5, 3, False)], 3)
    with OpCounter() as counter:
        got = BACKENDS[name](p)
    assert counter.total > 0 and counter.sync == 0, dict(counter.sync_ops)
    assert torch.allclose(got, reference_attention(p), atol=2e-5, rtol=1e-4)
