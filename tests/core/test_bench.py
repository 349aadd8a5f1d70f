"""The benchmark CLI's estimates: KV budgets of the presets against Self Forcing's window."""

import json
import subprocess
import sys

import pytest
import torch

from headforcing_core.bench import main


def run_bench(capsys, *args):
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_budgets_at_1p3b(capsys):
    r = run_bench(capsys, "--estimate", "--model-shape", "1.3b", "--width", "832", "--height", "480",
                  "--seconds", "30", "60", "600")
    for length in ("30s", "60s", "600s"):
        pol = r["results"][length]["policies"]
        assert pol["head_forcing"]["kv_ratio_vs_self_forcing_window"] <= 0.45
        # Pyramid Forcing's code keeps six phase buckets of 4 frames for its Wave heads: its KV is most of the
        # window's, while each query attends about half as many frames (docs/pyramid_forcing.md); the chunk
        # lives in the attention scratch, not in its pools (issue 20)
        assert 0.8 <= pol["pyramid_forcing"]["kv_ratio_vs_self_forcing_window"] <= 0.85
        # the peak without the weights (issue 20's goals at 832×480, 60 s; at 10 minutes the latents, the same
        # for every policy, grow to ≈ 4 GiB and bring the ratios towards 1)
        if length != "600s":
            window = pol["self_forcing_window"]["run_bytes"]
            goals = {"head_forcing": 0.6, "pyramid_forcing": 1.0, "sink_window": 0.8, "longlive": 0.65}
            assert all(pol[p]["run_bytes"] <= goal * window for p, goal in goals.items()), length
        assert 9.5 <= pol["pyramid_forcing"]["attended_frames"] <= 10.5
        assert pol["longlive"]["attended_frames"] == pytest.approx(12)
        # 21 frames of 1560 tokens, 30 layers × 12 heads × 128 × K and V × bf16
        assert pol["self_forcing_window"]["kv_bytes"] == 21 * 1560 * 30 * 12 * 128 * 2 * 2
        assert pol["self_forcing_window"]["attended_frames"] == pytest.approx(21)


def test_estimate_rows_count_the_weights_in_their_dtype_fp8_included(capsys):
    """The 14B rows' total is the run's peak plus the weights as ComfyUI holds them loaded: fp8 weights
    (UNETLoader's fp8_e4m3fn / e5m2) are one byte a parameter but the float32 patch embedding."""
    from headforcing_core.backbone import BackboneSpec
    from headforcing_core.bench import MODEL_SHAPES
    spec = BackboneSpec.from_config(MODEL_SHAPES["14b"])
    args = ("--estimate", "--model-shape", "14b", "--seconds", "60", "--policy", "longlive", "head_forcing")
    by_dtype = {w: run_bench(capsys, *args, "--weights-dtype", w) for w in ("fp8", "bf16")}
    assert run_bench(capsys, *args)["weights_dtype"] == "bf16"  # the default
    for w, dtype in (("fp8", torch.float8_e4m3fn), ("bf16", torch.bfloat16)):
        r = by_dtype[w]
        assert r["weights_dtype"] == w and r["weights_bytes"] == spec.weights_bytes(dtype)
        for row in r["results"]["60s"]["policies"].values():
            assert row["weights_bytes"] == r["weights_bytes"]
            assert row["total_bytes"] == row["run_bytes"] + row["weights_bytes"]
    # 14.29 B parameters: ≈ 13.3 GiB in fp8, ≈ 26.6 GiB in bf16; the run adds the one weight fp8 casts to bf16
    # at a time (at the attention call, the widest stage here: 5120 × 5120 + 5120 in bf16), nothing else changes
    assert by_dtype["fp8"]["weights_bytes"] / 2**30 == pytest.approx(13.31, abs=0.01)
    assert by_dtype["bf16"]["weights_bytes"] / 2**30 == pytest.approx(26.62, abs=0.01)
    fp8_rows, bf16_rows = (by_dtype[w]["results"]["60s"]["policies"] for w in ("fp8", "bf16"))
    for name in fp8_rows:
        assert fp8_rows[name]["run_bytes"] - bf16_rows[name]["run_bytes"] == (5120 * 5120 + 5120) * 2
        assert fp8_rows[name]["kv_bytes"] == bf16_rows[name]["kv_bytes"]


def test_timed_run_on_the_tiny_model(capsys):
    r = run_bench(capsys, "--model-shape", "tiny", "--width", "64", "--height", "64", "--seconds", "10",
                  "--chunks", "2", "--device", "cpu")
    pol = r["results"]["10s"]["policies"]
    for name, row in pol.items():
        assert row["seconds_per_chunk"] > 0 and row["video_fps"] > 0
        assert row["counters"]["sync_ops_in_model_calls"] == 0
        if name != "head_forcing":  # episodic memory fills up over time; the estimate is its steady state
            assert row["attended_tokens_measured"] == pytest.approx(row["attended_tokens"], rel=0.15)


def test_module_entry_point_prints_json():
    out = subprocess.run([sys.executable, "-m", "headforcing_core.bench", "--estimate", "--policy", "full",
                          "head_forcing"], capture_output=True, text=True, check=True)
    assert "head_forcing" in json.loads(out.stdout)["results"]["30s"]["policies"]


def test_profile_says_where_a_chunk_spends_its_time(capsys):
    r = run_bench(capsys, "--model-shape", "tiny", "--width", "64", "--height", "64", "--seconds", "10",
                  "--chunks", "1", "--device", "cpu", "--policy", "self_forcing_window", "head_forcing", "--profile")
    for row in r["results"]["10s"]["policies"].values():
        prof = row["profile"]
        assert prof["clock"] == "cpu"
        assert {"attention", "matmul", "elementwise"} <= set(prof["seconds_by_kind"])
        kinds = {o["kind"] for o in prof["top_ops"]}
        assert {"attention", "matmul"} <= kinds
        assert [o["seconds"] for o in prof["top_ops"]] == sorted((o["seconds"] for o in prof["top_ops"]), reverse=True)


@pytest.mark.parametrize("name,kind", [("aten::_flash_attention_forward", "attention"),
                                       ("aten::_efficient_attention_forward", "attention"),
                                       ("aten::addmm", "matmul"), ("aten::mm", "matmul"),
                                       ("aten::index_copy_", "copy_index"), ("aten::_to_copy", "copy_index"),
                                       ("aten::cat", "copy_index"), ("aten::mul", "elementwise"),
                                       ("aten::native_layer_norm", "elementwise"), ("aten::addcmul", "elementwise"),
                                       ("flash_attn::_flash_attn_varlen_forward", "attention"),
                                       ("torch_attn::_varlen_attn", "attention")])
def test_op_kinds(name, kind):
    from headforcing_core.bench import op_kind
    assert op_kind(name) == kind


def test_pipelined_throughput_is_reported_beside_the_synchronised_one(capsys):
    r = run_bench(capsys, "--model-shape", "tiny", "--width", "64", "--height", "64", "--seconds", "10",
                  "--chunks", "2", "--device", "cpu", "--policy", "self_forcing_window", "head_forcing")
    pol = r["results"]["10s"]["policies"]
    for row in pol.values():
        assert row["pipelined_seconds_per_chunk"] > 0
        assert row["pipelined_video_fps"] == pytest.approx(4 * 3 / row["pipelined_seconds_per_chunk"])
    assert pol["self_forcing_window"]["pipelined_speedup_vs_self_forcing_window"] == 1.0
