"""The cost model of the Triton path (pushpull_ext/cost_model.py): its counts against first principles and
the papers' algebra, and its command line. Pure arithmetic on the launcher's recorded launches: no kernel runs.
Also the rule backend="auto" follows on a GPU (functional.AUTO_GPU_BACKEND, per pull mode, set by the first GPU
timings), tested with a stand-in CUDA device."""

import re
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import pushpull_ext.functional as functional
from pushpull_ext import cost_model
from pushpull_ext.shapes import case_by_name, parse_case


def _launch(phase, name):
    (launch,) = [c for c in phase.launches if c.launch == name]
    return launch


def test_lower_bound_is_the_products_of_conv2d():
    case = parse_case("2,3,4,6,5,3,1,0,invert")  # no padding: every product of conv2d(ones, ones) adds 1
    products = F.conv2d(torch.ones(2, 3, 6, 5, dtype=torch.float64), torch.ones(4, 3, 3, 3, dtype=torch.float64)).sum()
    assert cost_model.convolution_macs(case) == int(products) == 2 * 4 * 4 * 3 * 3 * 3 * 3
    forward, backward = cost_model.layer_cost(case, torch.float32)
    assert forward.lower.macs == int(products)
    assert backward.lower.macs == 2 * int(products)  # input and weight gradients


def test_invert_forward_does_one_convolutions_products():
    # 16 channels x 3 x 3 = 144 = 9 chunks of BLOCK_K 16; 2 x 8 x 8 pixels = one 128-pixel tile; 16 channels
    case = parse_case("2,16,16,8,8,3,1,1,invert")
    forward, _ = cost_model.layer_cost(case, torch.float32)
    assert _launch(forward, "pp_fwd_conv_kernel").macs == cost_model.convolution_macs(case)


@pytest.mark.parametrize("name", ["cifar-b1-2020", "imagenet-b1-2020"])
def test_upsample_forward_runs_two_convolutions_products_and_each_gradient_one(name):
    # the prefilter algebra: push and pull both over the 9 push taps, 16 or 64 channels in whole chunks;
    # the backward tiles' channel sides no wider than the channels (16-channel layers: 16, not 64)
    case = case_by_name(name)
    forward, backward = cost_model.layer_cost(case, torch.float32, upsample_path="prefilter")
    conv = cost_model.convolution_macs(case)
    assert _launch(forward, "pp_fwd_conv_kernel").macs == 2 * conv
    # the input gradient: the prefilter's adjoint, one MMA over (push tap, output channel), 16 or 64
    # channels in whole chunks (float32: 16 wide): one convolution's products
    assert _launch(backward, "pp_bwd_input_kernel").macs == conv
    # the weight gradient takes the adjoint route (the launcher's rule): x against G over the input
    # pixels, o x c tiles of 16 or 64 (whole), pixel splits rounded up to whole chunks (under half a percent)
    assert "pp_bwd_weight_kernel" not in [c.launch for c in backward.launches]
    assert _launch(backward, "pp_bwd_weight_adjoint_kernel").macs == pytest.approx(conv, rel=5e-3)
    assert backward.macs == pytest.approx(2 * conv, rel=5e-3)


@pytest.mark.parametrize("name", ["cifar-b1-2020", "imagenet-b1-2020"])
def test_tap_path_runs_one_convolutions_products_on_its_frames(name):
    # The launcher's rule takes the tap path for the stride-1 first blocks (float32, TF32): one MMA per
    # (push tap, channel chunk) on every row of its frames, so the products are one convolution's times
    # the frames' rows per output pixel (halo recomputed: 1.96x on 56 x 56, 2.00x on 32 x 32 with 256-row
    # frames), and 53 shift-adds per tile element on the CUDA cores (3 x 3 at scale 2).
    case = case_by_name(name)
    forward, _ = cost_model.layer_cost(case, torch.float32)
    (tap,) = [c for c in forward.launches if c.launch != "torch"]
    assert tap.launch == "pp_fwd_tap_kernel"
    frames = tap.macs / cost_model.convolution_macs(case)
    assert frames == pytest.approx({"cifar-b1-2020": 2.0, "imagenet-b1-2020": 1.959}[name], abs=1e-3)
    assert f"products x{frames:.2f} the output pixels'" in tap.note and "53 shift-adds a tile element" in tap.note
    assert forward.bytes <= 1.05 * forward.lower.bytes  # x, y and the masks once
    # the 3-channel stem keeps the prefilter route (its per-tap channel chunk would be 3 of 16)
    stem, _ = cost_model.layer_cost(case_by_name("cifar-stem-2020"), torch.float32)
    assert [c.launch for c in stem.launches if c.launch != "torch"] == ["pp_fwd_conv_kernel"]


@pytest.mark.parametrize("name", ["cifar-b1-2020", "imagenet-b1-2020"])
def test_upsample_weight_gradient_prefilter_route_runs_two_convolutions_products(name):
    # forced: dk = gP x_taps + gQ z, two MMAs a chunk, the (tap, c) side in 64-wide tiles: 144 -> 192
    # for 16 channels, 576 for 64 (whole)
    case = case_by_name(name)
    _, backward = cost_model.layer_cost(case, torch.float32, weight_grad_path="prefilter")
    conv = cost_model.convolution_macs(case)
    k_total = case.c_in * 9
    padded = -(-k_total // 64) * 64
    assert _launch(backward, "pp_bwd_weight_kernel").macs == pytest.approx(2 * conv * padded / k_total, rel=5e-3)


def test_weight_gradient_rule_keeps_the_3_channel_stem_on_the_prefilter_route():
    # the adjoint route's c side would pad 3 input channels to 16 (16 / 3 of the products) and build G
    # over them: the rule (triton_launch._weight_adjoint_pays) keeps the stem on the prefilter route
    stem = case_by_name("cifar-stem-2020")
    conv = cost_model.convolution_macs(stem)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        _, backward = cost_model.layer_cost(stem, dtype)
        assert [c.launch for c in backward.launches if c.launch.startswith("pp_bwd_weight")] == ["pp_bwd_weight_kernel"]
    _, forced = cost_model.layer_cost(stem, torch.float32, weight_grad_path="adjoint")
    adjoint = _launch(forced, "pp_bwd_weight_adjoint_kernel")
    assert adjoint.macs == pytest.approx(conv * 16 / 3, rel=5e-3)
    # G: one [BLOCK_K, BLOCK_M] tile per MMA, 25 FMAs an element (the widest U V pair's bounds) over
    # BLOCK_N = 16 MACs
    assert "adjoint prefilter (G): " in adjoint.note and "(1.56x the MACs; 25.0 U V pairs" in adjoint.note


def test_prefilter_visits_the_nonzeros_of_the_bilinear_columns():
    # 3 -> 7 with align_corners: column 1 of U has 5 nonzeros (rows 1..5), columns 0 and 2 have 3. A tile of
    # one push tap (i, j) visits its nonzero pairs, 9 to 25: (3 + 5 + 3)^2 / 9 on average over the taps; a
    # tile of several taps the most of their columns': the 3-channel stem's 27-long chunk all 25
    window = dict(TH=3, TW=3, QH=7, QW=7)
    assert cost_model.prefilter_visits("pp_fwd_conv_kernel", dict(window, CG=16, BLOCK_K=16)) == pytest.approx(121 / 9)
    assert cost_model.prefilter_visits("pp_fwd_conv_kernel", dict(window, CG=3, BLOCK_K=32)) == 25
    # the input gradient's (tap, o) chunks of 32 over 16 output channels: taps {0, 1}, {2, 3}, ..., {8},
    # each the most nonzeros of its taps' U columns times those of their V columns
    two_taps = [3 * 5, 5 * 3, 5 * 5, 3 * 5, 3 * 3]
    got = cost_model.prefilter_visits("pp_bwd_input_kernel", dict(window, CGO=16, BLOCK_K=32))
    assert got == pytest.approx(sum(two_taps) / 5)
    # both weight-gradient routes: the widest pair's bounds
    assert cost_model.prefilter_visits("pp_bwd_weight_kernel", dict(window, CG=16, BLOCK_N=64)) == 25
    assert cost_model.prefilter_visits("pp_bwd_weight_adjoint_kernel", window) == 25
    forward, _ = cost_model.layer_cost(case_by_name("imagenet-b1-2020"), torch.float32, upsample_path="prefilter")
    assert "prefilter: " in _launch(forward, "pp_fwd_conv_kernel").note


def test_upsample_input_gradient_notes_the_adjoint_prefilters_work():
    # G: one [BLOCK_M, BLOCK_K] tile per MMA, built by each channel tile: 121 / 9 FMAs per element (one push
    # tap a chunk: its nonzero U V pairs) over BLOCK_N MACs, BLOCK_N = 16 for 16 channels, 64 for 64; a x a
    # more with pooling
    for name, ratio in (("cifar-b1-2020", "0.84x"), ("imagenet-b1-2020", "0.21x")):
        _, backward = cost_model.layer_cost(case_by_name(name), torch.float32)
        assert "adjoint prefilter (G): " in _launch(backward, "pp_bwd_input_kernel").note
        assert f"({ratio} the MACs;" in _launch(backward, "pp_bwd_input_kernel").note
    _, pooled = cost_model.layer_cost(replace(parse_case("2,16,16,8,8,3,1,1,upsample"), avg_kernel=3), torch.float32)
    assert "(7.56x the MACs;" in _launch(pooled, "pp_bwd_input_kernel").note  # 0.84x times 9


def test_pooled_forward_is_one_launch_writing_y_once_and_counts_the_recomputed_halo():
    pooled = case_by_name("cifar-stem-2024")
    unpooled = parse_case("128,3,64,32,32,3,1,1,invert,0")
    forward, _ = cost_model.layer_cost(pooled, torch.bfloat16)
    plain, _ = cost_model.layer_cost(unpooled, torch.bfloat16)
    assert [c.launch for c in forward.launches if c.launch != "torch"] == ["pp_fwd_conv_kernel"]
    conv = _launch(forward, "pp_fwd_conv_kernel")
    # no scratch field: y (bf16) and the masks written once, as without pooling
    assert conv.bytes_written == _launch(plain, "pp_fwd_conv_kernel").bytes_written == 128 * 64 * 32 * 32 * (2 + 2 / 8)
    assert forward.bytes == pytest.approx(plain.bytes, rel=1e-3)
    # 5x5 pooling of a 32 x 32 image in 256-row tiles: 12 x 20 with the halo (8 x 16 outputs), 4 x 2 of them
    # per image: 2048 rows computed for 1024 pixels; the 27-long reduction runs as one 32-wide chunk
    assert "12x20 tiles" in conv.note and "x2.00" in conv.note
    assert conv.macs == 128 * 8 * 256 * 64 * 32
    assert conv.macs / plain.macs == pytest.approx(2.0)


def test_pooled_path_is_the_one_the_roofline_finds_faster():
    # the stems: fused in every dtype; 64 channels x 3 x 3 on 14 x 14 maps pooled 5x5: the halo's products
    # (2.61x) outweigh the scratch fields' bytes in float64 (10 MACs a byte), not in bfloat16 (148)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        forward, _ = cost_model.layer_cost(case_by_name("imagenet-stem-2024"), dtype)
        assert "pp_fwd_pool_epilogue_kernel" not in [c.launch for c in forward.launches]
    wide = parse_case("2,64,64,14,14,3,1,1,invert,5")
    for dtype, launches in ((torch.bfloat16, 1), (torch.float64, 2)):
        forward, _ = cost_model.layer_cost(wide, dtype)
        assert len([c for c in forward.launches if c.launch != "torch"]) == launches


def test_trainable_alpha_recomputes_the_forward_in_the_backward_writing_no_field():
    _, with_alpha = cost_model.layer_cost(case_by_name("cifar-stem-2024"), torch.float32)
    _, fixed_alpha = cost_model.layer_cost(case_by_name("cifar-b1-2020"), torch.float32)
    assert "pp_fwd_conv_kernel" not in [c.launch for c in fixed_alpha.launches]
    recompute = _launch(with_alpha, "pp_fwd_conv_kernel")
    # relu(Q') meets g in the epilogue: only the partial sums [pixel tiles, alpha and b_out, C_out] are written
    assert recompute.grid == (1024, 2) and recompute.bytes_written == 1024 * 2 * 64 * 4
    # g is read by the recompute (b_out's sum with it) and the weight kernel; torch reads no field
    field = 128 * 64 * 32 * 32 * 4
    assert recompute.bytes_read > field
    assert sum(c.bytes for c in with_alpha.launches if c.launch == "torch") < field / 10


def test_unpooled_forward_moves_about_the_lower_bound():
    for path, kernel in (("prefilter", "pp_fwd_conv_kernel"), ("taps", "pp_fwd_tap_kernel")):
        forward, _ = cost_model.layer_cost(case_by_name("imagenet-b1-2020"), torch.bfloat16, upsample_path=path)
        conv = _launch(forward, kernel)
        assert forward.lower.bytes <= conv.bytes <= 1.01 * forward.lower.bytes  # x, y, masks and the weights


def test_command_line_prints_every_launch_and_the_summary(capsys):
    assert cost_model.main(["--shapes", "cifar-b1-2020", "2,8,8,10,10,3,1,1,invert,3", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    for text in (
        "pp_fwd_conv_kernel",
        "pp_bwd_input_kernel",
        "pp_bwd_weight_kernel",
        "Q pooled 3x3 on chip",
        "lower bound",
        "Summary",
    ):
        assert text in out
    summary = out.split("Summary")[1]
    # forward MACs x conv: the tap path, 9 taps x 16 channels (no padding) on 256-row frames of 8 x 16
    # outputs (12 x 20 with the halo: twice the output pixels' rows)
    assert re.search(r"^cifar-b1-2020 +bfloat16 +2\.00 ", summary, re.MULTILINE)


# ---------------------------------------------------------------- backend="auto": the per-mode rule the GPU timings set


def _cuda_tensor_stand_in():
    """resolve_backend reads only `.device`: a stand-in lets the GPU rule be tested without a GPU."""
    return types.SimpleNamespace(device=torch.device("cuda", 0))


@pytest.fixture
def gpu_with_both_backends(monkeypatch):
    """An sm_90 GPU on which Triton and the CUDA extension can both run."""
    monkeypatch.delenv("PUSHPULL_BACKEND", raising=False)
    monkeypatch.setattr(functional, "CPP_ERROR", None)
    monkeypatch.setattr(functional, "has_cpp_kernel", lambda device_type: True)
    monkeypatch.setattr(functional.ops, "TRITON_OP_ERROR", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_auto_takes_the_cuda_extension_first_on_a_gpu_for_every_pull_mode():
    for pull in ("upsample", "invert", None):
        assert functional.auto_candidates("cuda", pull) == ("cuda", "triton")
    assert functional.auto_candidates("cpu", "upsample") == ("cpu",)


def test_auto_follows_the_table_per_pull_mode(monkeypatch, gpu_with_both_backends):
    monkeypatch.setitem(functional.AUTO_GPU_BACKEND, "upsample", "triton")
    assert functional.resolve_backend("auto", _cuda_tensor_stand_in(), "upsample") == "triton"
    assert functional.resolve_backend("auto", _cuda_tensor_stand_in(), "invert") == "cuda"
    monkeypatch.setattr(functional, "has_cpp_kernel", lambda device_type: False)  # no CUDA kernels: the other one
    assert functional.resolve_backend("auto", _cuda_tensor_stand_in(), "invert") == "triton"


def test_the_layer_passes_its_pull_mode_to_the_rule(monkeypatch):
    seen = []

    def recording(backend, input, pull=None):
        seen.append(pull)
        return "reference"

    monkeypatch.setattr(functional, "resolve_backend", recording)
    x, w = torch.randn(1, 2, 6, 6, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    for pull in ("invert", "upsample"):
        functional.push_pull_conv2d(x, w, padding=1, pull=pull)
    assert seen == ["invert", "upsample"]
