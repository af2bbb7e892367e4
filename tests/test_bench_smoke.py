"""Smoke test of the benchmark's entry point: it runs and writes its outputs (no timing is asserted)."""

import csv
import json

import pytest

from pushpull_ext import bench


def test_bench_quick_writes_table_json_csv(tmp_path, capsys):
    result = bench.main(
        [
            "--quick",
            "--shapes",
            "cifar-stem-2020",
            "--providers",
            "reference",
            "ours",
            "--min-run-time",
            "0.01",
            "--out",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert "cifar-stem-2020" in printed and "ms fwd ours/ref" in printed and "x fwdbwd" in printed
    assert "batch scaled from 128 to 2" in printed

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["environment"]["git_commit"]
    assert {r["provider"] for r in saved["rows"]} == {r["provider"] for r in result["rows"]}
    reference = next(r for r in saved["rows"] if r["provider"] == "reference")
    assert reference["within_tolerance"] and set(reference["modes"]) == {"fwd", "fwdbwd"}

    with open(tmp_path / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert {(r["provider"], r["mode"]) for r in records if r["provider"] == "reference"} == {
        ("reference", "fwd"),
        ("reference", "fwdbwd"),
    }


def test_a_failing_case_or_timing_costs_only_its_rows(tmp_path, capsys, monkeypatch):
    """A lent GPU is time-boxed: one case or one provider failing (out of memory, ...) must not lose the
    rest, and results.json is written after every case (a run stopped early keeps what it measured)."""
    real_run_case, real_time_providers = bench.run_case, bench.time_providers

    def run_case(case, *args):
        if case.name == "cifar-b1-2020":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_run_case(case, *args)

    def time_providers(fns, inputs, mode, *args):
        timings = real_time_providers(fns, inputs, mode, *args)
        if mode == "fwdbwd":
            timings["cpu"] = {"failed": "failed: RuntimeError: simulated"}
        return timings

    written = []
    real_write = bench.write_outputs
    monkeypatch.setattr(bench, "run_case", run_case)
    monkeypatch.setattr(bench, "time_providers", time_providers)
    monkeypatch.setattr(
        bench, "write_outputs", lambda out, result: (written.append(len(result["rows"])), real_write(out, result))
    )
    bench.main(
        [
            "--quick",
            "--shapes",
            "cifar-stem-2020",
            "cifar-b1-2020",
            "--providers",
            "reference",
            "cpu",
            "--device",
            "cpu",
            "--min-run-time",
            "0.01",
            "--out",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert "case failed: RuntimeError: CUDA out of memory (simulated)" in printed
    assert "cifar-stem-2020 float32 cpu timing of fwdbwd failed: RuntimeError: simulated" in printed
    assert written[:2] == [2, 4]  # after each case, then at the end
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    stem_cpu = next(r for r in rows if r["shape"] == "cifar-stem-2020" and r["provider"] == "cpu")
    assert set(stem_cpu["modes"]) == {"fwd"} and "fwdbwd" in stem_cpu["timing_failed"]
    assert all("skipped" in r for r in rows if r["shape"] == "cifar-b1-2020")


def test_default_run_is_representative_and_full_is_the_sweep():
    # The CPU's defaults (on a GPU the default device is "cuda", with other providers and dtypes).
    default = bench.settings_from(bench.parse_args(["--device", "cpu"]))
    full = bench.settings_from(bench.parse_args(["--full", "--device", "cpu"]))
    assert default.providers == ["reference", "conv+relu", "cpu"]
    assert default.min_run_time == bench.MIN_RUN_TIME["default"]
    assert full.providers == ["reference", "conv+relu", "stacked+compile", "compiled-reference", "cpu"]
    assert full.min_run_time == bench.MIN_RUN_TIME["full"] > default.min_run_time
    assert len(bench._cases(bench.parse_args([]))) == len(bench.CASES)  # every paper shape in both


def test_progress_weights_are_expected_seconds():
    """A compiled provider's check weighs its compile; a timing step weighs min_run_time per provider."""
    settings = bench.settings_from(bench.parse_args(["--full", "--device", "cpu"]))
    case, peaks = bench.case_by_name("cifar-stem-2020"), {"flops_per_s": 1e11}
    batch = bench.case_batch(case, settings)
    eager = bench.expected_seconds(case, batch, settings, peaks, check="cpu")
    compiled = bench.expected_seconds(case, batch, settings, peaks, check="stacked+compile")
    assert compiled - eager == pytest.approx(bench.FIRST_COMPILE_S["cpu"]) and eager > 0
    timing = bench.expected_seconds(case, batch, settings, peaks, mode="fwd")
    providers = len(settings.providers)
    assert providers * settings.min_run_time < timing < providers * settings.min_run_time + 10
    total = bench.total_expected_seconds([case], settings, {"float32": peaks})
    steps = [{"check": p} for p in settings.providers] + [{"mode": m} for m in settings.modes]
    assert total == pytest.approx(sum(bench.expected_seconds(case, batch, settings, peaks, **s) for s in steps))


def test_results_go_to_a_dated_folder_named_at_the_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench.main(
        [
            "--quick",
            "--shapes",
            "cifar-stem-2020",
            "--providers",
            "reference",
            "--modes",
            "fwd",
            "--min-run-time",
            "0.01",
        ]
    )
    (folder,) = (tmp_path / "bench_out").iterdir()
    assert {"results.json", "results.csv"} <= {p.name for p in folder.iterdir()}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"bench_out/{folder.name}/")


def test_conv_relu_row_is_the_plain_convolution_of_the_same_geometry(tmp_path, capsys):
    """conv+relu: nn.Conv2d + ReLU of the layer's geometry, judged against its own float64 evaluation; every
    provider's time also reads as a multiple of it (conv_ratio, the "/conv+relu" column)."""
    result = bench.main(
        [
            "--quick",
            "--shapes",
            "imagenet-stem-2024",
            "--providers",
            "conv+relu",
            "cpu",
            "--device",
            "cpu",
            "--modes",
            "fwdbwd",
            "--min-run-time",
            "0.01",
            "--out",
            str(tmp_path),
        ]
    )
    assert "fwdbwd /conv+relu" in capsys.readouterr().out
    rows = {r["provider"]: r for r in result["rows"]}
    assert list(rows) == ["reference", "conv+relu", "cpu"]
    conv = rows["conv+relu"]
    assert conv["within_tolerance"] and set(conv["errors"]) == {"output", "grad_weight", "grad_bias_out"}
    assert conv["modes"]["fwdbwd"]["conv_ratio"] == pytest.approx(1.0)
    ours = rows["cpu"]["modes"]["fwdbwd"]
    assert ours["conv_ratio"] == pytest.approx(ours["ms"] / conv["modes"]["fwdbwd"]["ms"])


def test_conv_relu_has_the_layers_geometry_and_input_gradient():
    inputs = bench.make_inputs(bench.case_by_name("cifar-b1-2020"), batch=1)
    conv = bench.build_provider("conv+relu", inputs)
    layer = bench.build_provider("reference", inputs)
    assert conv().shape == layer().shape
    assert conv.grad_names == ("input", "weight", "bias")


def test_models_quick_writes_table_json_csv_plot(tmp_path, capsys):
    """--models: every variant of a whole network, training step and inference, against plain (no timing
    is asserted)."""
    result = bench.main(["--models", "resnet20", "--quick", "--batch", "2", "--threads", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "resnet20" in printed and "b1-reference" in printed and "vs plain" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["benchmark"] == "models" and saved["environment"]["git_commit"]
    assert "load_average_at_start" in saved["environment"]
    got = {(r["variant"], r["mode"]) for r in saved["rows"]}
    assert got == {(v, m) for v in ("plain", "pp", "b1", "b1-reference") for m in ("train", "inference")}
    assert all(r["over_plain_pct"] == 0 for r in saved["rows"] if r["variant"] == "plain")
    b1 = next(r for r in result["rows"] if r["variant"] == "b1")
    assert b1["replaced"] == ["conv1"] + [f"layer1.{i}.conv{j}" for i in range(3) for j in (1, 2)]
    assert b1["b1_vs_reference_logits_rel_diff"] < 1e-4
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    assert (tmp_path / "models.png").stat().st_size > 0


def test_models_resnet50_placements_are_the_papers():
    """ResNet-50: pp = the 2024 PP3 stem, b1 = the 2020 layer in the stem and layer1's middle 3x3 convolutions
    (torchvision's layout, built by pushpull_ext.resnets without torchvision)."""
    from pushpull_ext import bench_models
    from pushpull_ext.resnets import resnet50

    spec = bench_models.model_specs()["resnet50"]
    spec = bench_models.ModelSpec(**{**spec.__dict__, "build": lambda: resnet50(num_classes=10)})
    built = bench_models.build_variants(spec, "cpu")
    assert built["plain"]["replaced"] == [] and built["pp"]["replaced"] == ["conv1"]
    assert built["pp"]["model"].conv1.pull == "invert" and built["pp"]["model"].conv1.avg_kernel == 3
    assert built["b1"]["replaced"] == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert built["b1-reference"]["model"].layer1[0].conv2.backend == "reference"
