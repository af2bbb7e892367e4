"""Smoke test of the benchmark's entry point: it runs and writes its outputs (no timing is asserted)."""
import csv
import json

from pushpull_ext import bench


def test_bench_quick_writes_table_json_csv(tmp_path, capsys):
    result = bench.main(["--quick", "--shapes", "cifar-stem-2020", "--providers", "reference", "ours",
                         "--min-run-time", "0.01", "--out", str(tmp_path)])
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
        ("reference", "fwd"), ("reference", "fwdbwd")}
