"""Whole-network benchmark: `python -m pushpull_ext.bench --models [resnet20 resnet50]`.

The step time of a ResNet with plain convolutions against the same network with push-pull layers in the
papers' placements (`pushpull_ext.convert`), both a training step (forward, cross-entropy, backward, an SGD
step) and inference (`torch.no_grad()` forward in eval mode). Variants of each model:

- plain: nn.Conv2d everywhere;
- pp: only the stem converted (ResNet-20: the 2020 layer; ResNet-50: the 2024 PP3 stem);
- b1: the stem and the convolutions of layer1 converted (the 2020 layer, as `convert(where="b1")`);
- b1-reference: b1 with backend="reference", the eager formula as the papers' modules compute it.

Every variant starts from the same weights and sees the same batch. The variants are timed in turn,
round after round (a shared machine's load weighs on all alike); the figure is the median over every
round's calls, "+x %" the median's excess over plain's.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bench_report import _columns, environment, pyplot_or_none, write_csv
from .bench_timing import set_precision, steady_cpu_allocator
from .conversion import convert
from .resnets import resnet20, resnet50

MODEL_MODES = ("train", "inference")
ROUNDS = {"quick": 1, "default": 3, "full": 6}  # interleaved rounds per mode
CALLS = {"quick": 1, "default": 3, "full": 5}  # timed calls per variant and round
WARMUP_CALLS = {"quick": 1, "default": 2, "full": 2}  # untimed calls per variant before each mode's rounds
LEARNING_RATE = 1e-3
PULL_2020 = {"pull": "upsample", "scale": 2.0}  # PPmodule2d: bilinear x2 pull kernel, alpha 1
PP3_2024 = {"pull": "invert", "avg_kernel": 3, "bias_out": True, "train_alpha": True}  # PushPullConv2DUnit


@dataclass(frozen=True)
class ModelSpec:
    """A network of the papers and its placements: `pp` and `b1` are convert() options of its layers."""

    name: str
    build: Callable[[], nn.Module]
    image: int
    batch: dict  # "cpu" / "cuda" / "quick" -> batch
    classes: int
    pp: dict
    b1: dict
    source: str = "pushpull_ext.resnets"
    quick_image: Optional[int] = None


def _resnet50_builder() -> tuple[Callable[[], nn.Module], str]:
    """torchvision's resnet50 where torchvision is importable, else the same layout from resnets.py."""
    try:
        import torchvision

        return torchvision.models.resnet50, f"torchvision {torchvision.__version__}"
    except ImportError:
        return resnet50, "pushpull_ext.resnets (torchvision not installed)"


def model_specs() -> dict:
    build50, source50 = _resnet50_builder()
    return {
        "resnet20": ModelSpec(
            "resnet20", resnet20, 32, {"cpu": 128, "cuda": 128, "quick": 2}, 10, pp=PULL_2020, b1=PULL_2020
        ),
        "resnet50": ModelSpec(
            "resnet50",
            build50,
            112,
            {"cpu": 8, "cuda": 64, "quick": 1},
            1000,
            pp=PP3_2024,
            b1=PULL_2020,
            source=source50,
            quick_image=64,
        ),
    }


@dataclass
class ModelSettings:
    device: str
    models: list
    threads: int
    batch: Optional[int]
    rounds: int
    calls: int
    warmup: int
    quick: bool
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------- the variants


def variants(spec: ModelSpec) -> dict:
    """name -> (placement or None, convert() options)."""
    return {
        "plain": (None, {}),
        "pp": ("pp", spec.pp),
        "b1": ("b1", spec.b1),
        "b1-reference": ("b1", {**spec.b1, "backend": "reference"}),
    }


def describe(placement: Optional[str], options: dict, replaced: list) -> str:
    if placement is None:
        return "nn.Conv2d everywhere"
    layer = "2024 invert, avg 3, b_out, trained alpha" if options.get("pull") == "invert" else "2020 upsample x2"
    backend = options.get("backend", "auto")
    return f"{len(replaced)} conv(s) -> PushPullConv2d ({layer}; backend {backend})"


def build_variants(spec: ModelSpec, device: str) -> dict:
    """Every variant from one set of weights (one plain model, copied, then converted)."""
    torch.manual_seed(0)
    plain = spec.build().to(device)
    built = {}
    for name, (placement, options) in variants(spec).items():
        model = copy.deepcopy(plain)
        replaced = convert(model, placement, **options)[1] if placement else []
        built[name] = {"model": model, "replaced": replaced, "description": describe(placement, options, replaced)}
    return built


def model_batch(spec: ModelSpec, settings: ModelSettings) -> tuple[int, int]:
    """(batch, image size): --batch, the --quick smoke sizes, or the model's default on this device."""
    image = (spec.quick_image or spec.image) if settings.quick else spec.image
    if settings.batch:
        return settings.batch, image
    return spec.batch["quick" if settings.quick else settings.device], image


# ---------------------------------------------------------------- what is timed


def training_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()

    return step


def inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def forward():
        with torch.no_grad():
            model(x)

    return forward


def mode_calls(built: dict, mode: str, x: torch.Tensor, labels: torch.Tensor) -> dict:
    calls = {}
    for name, entry in built.items():
        entry["model"].train(mode == "train")
        calls[name] = training_step(entry["model"], x, labels) if mode == "train" else inference(entry["model"], x)
    return calls


def time_interleaved(calls: dict, settings: ModelSettings, sync: Callable[[], None]) -> dict:
    """Seconds of each call: every variant `settings.calls` times in turn, `settings.rounds` times over,
    after `settings.warmup` untimed calls each."""
    for call in calls.values():
        for _ in range(settings.warmup):
            call()
    sync()
    samples = {name: [] for name in calls}
    for _ in range(settings.rounds):
        for name, call in calls.items():
            for _ in range(settings.calls):
                start = time.perf_counter()
                call()
                sync()
                samples[name].append(time.perf_counter() - start)
    return samples


def summarize(samples: list) -> dict:
    ordered = sorted(samples)
    return {
        "ms": statistics.median(ordered) * 1e3,
        "ms_best": ordered[0] * 1e3,
        "ms_p20": ordered[int(0.2 * (len(ordered) - 1))] * 1e3,
        "ms_p80": ordered[int(round(0.8 * (len(ordered) - 1)))] * 1e3,
        "samples": len(ordered),
    }


def logits_agreement(built: dict, x: torch.Tensor) -> float:
    """max |b1 - b1-reference| / max |b1-reference| of the logits in eval mode, before any training step:
    ours and the eager formula compute the same network."""
    with torch.no_grad():
        ours, eager = (built[name]["model"].eval()(x).double() for name in ("b1", "b1-reference"))
    return ((ours - eager).abs().max() / eager.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- one model


def run_model(spec: ModelSpec, settings: ModelSettings) -> list:
    batch, image = model_batch(spec, settings)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, image, image, generator=gen).to(settings.device)
    labels = torch.randint(0, spec.classes, (batch,), generator=gen).to(settings.device)
    built = build_variants(spec, settings.device)
    agreement = logits_agreement(built, x)
    sync = torch.cuda.synchronize if settings.device == "cuda" else lambda: None
    rows = []
    for mode in MODEL_MODES:
        print(f"{spec.name} batch {batch} {image}x{image}: timing {mode}", file=sys.stderr, flush=True)
        samples = time_interleaved(mode_calls(built, mode, x, labels), settings, sync)
        rows += _mode_rows(spec, built, samples, mode, batch, image, agreement)
    return rows


def _mode_rows(spec, built, samples, mode, batch, image, agreement) -> list:
    plain_ms = summarize(samples["plain"])["ms"]
    rows = []
    for name, times in samples.items():
        figures = summarize(times)
        rows.append(
            {
                "model": spec.name,
                "source": spec.source,
                "variant": name,
                "description": built[name]["description"],
                "replaced": built[name]["replaced"],
                "mode": mode,
                "batch": batch,
                "image": image,
                **figures,
                "over_plain_pct": 100.0 * (figures["ms"] / plain_ms - 1.0),
                "b1_vs_reference_logits_rel_diff": agreement,
            }
        )
    return rows


# ---------------------------------------------------------------- report


def format_models_table(rows: list) -> str:
    lines = [["model", "batch", "image", "mode", "variant", "ms median", "ms best", "ms p20-p80", "vs plain", "layers"]]
    for r in rows:
        lines.append(
            [
                r["model"],
                str(r["batch"]),
                f"{r['image']}px",
                r["mode"],
                r["variant"],
                f"{r['ms']:.1f}",
                f"{r['ms_best']:.1f}",
                f"{r['ms_p20']:.1f}-{r['ms_p80']:.1f}",
                "-" if r["variant"] == "plain" else f"{r['over_plain_pct']:+.1f} %",
                r["description"],
            ]
        )
    return _columns(lines)


def write_models_outputs(out_dir: Path, result: dict) -> None:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    write_csv(out_dir / "results.csv", [{k: v for k, v in r.items() if k != "replaced"} for r in result["rows"]])
    write_models_plot(out_dir / "models.png", result["rows"], result["environment"])


def write_models_plot(path: Path, rows: list, env: dict) -> None:
    plt = pyplot_or_none("plot")
    if plt is None:
        return
    panels = list(dict.fromkeys((r["model"], r["mode"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (model, mode) in zip(axes[0], panels):
        _plot_panel(ax, [r for r in rows if r["model"] == model and r["mode"] == mode])
    load = env.get("load_average_at_start")
    shared = f"; load average {load[0]:.1f} at start (shared machine)" if load else ""
    fig.suptitle(f"step time, {env.get('device_name')} ({env.get('device')}){shared}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_panel(ax, rows: list) -> None:
    names = [r["variant"] for r in rows]
    bars = ax.bar(range(len(rows)), [r["ms"] for r in rows], color=["#888888", "#1f77b4", "#2ca02c", "#d62728"])
    for bar, r in zip(bars, rows):
        label = "plain" if r["variant"] == "plain" else f"{r['over_plain_pct']:+.0f}%"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    first = rows[0]
    ax.set_title(f"{first['model']} {first['mode']}\nbatch {first['batch']}, {first['image']}px", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=30, fontsize=7)
    ax.set_ylabel("ms per step (median)", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)


# ---------------------------------------------------------------- entry point


def models_settings(ns, device: str, threads: int) -> ModelSettings:
    specs = model_specs()
    names = ns.models or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"--models: unknown model(s) {unknown}; choose from {list(specs)}")
    level = "quick" if ns.quick else "full" if ns.full else "default"
    rounds, calls = ns.rounds or ROUNDS[level], ns.calls or CALLS[level]
    return ModelSettings(device, names, threads, ns.batch, rounds, calls, WARMUP_CALLS[level], ns.quick)


def run_models(ns, device: str, threads: int, out: Path) -> dict:
    """The --models run: prints the table, writes results.json, results.csv and models.png to `out`."""
    settings = models_settings(ns, device, threads)
    set_precision(ns.tf32, threads)
    env = environment(device)
    env["cpu_allocator"] = steady_cpu_allocator()
    specs = model_specs()
    print(_header(settings, env, specs), flush=True)
    start, rows = time.perf_counter(), []
    for name in settings.models:
        rows += run_model(specs[name], settings)
    result = {
        "benchmark": "models",
        "environment": env,
        "settings": asdict(settings),
        "elapsed_s": time.perf_counter() - start,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "rows": rows,
    }
    print("\n" + format_models_table(rows))
    print(_agreement_lines(rows))
    load = tuple(round(v, 2) for v in result["load_average_at_end"] or ())
    print(f"total time {result['elapsed_s']:.1f} s; load average at end {load}")
    write_models_outputs(out, result)
    print(f"results (results.json, results.csv, models.png): {out}/")
    return result


def _header(settings: ModelSettings, env: dict, specs: dict) -> str:
    load = tuple(round(v, 2) for v in env.get("load_average_at_start") or ())
    lines = [
        f"device: {env['device_name']} ({settings.device}); torch {env['torch']}; commit {env['git_commit'][:12]}",
        f"threads: {settings.threads}; load average at start {load}; allocator: {env.get('cpu_allocator')}",
        f"timing: {settings.rounds} interleaved round(s) x {settings.calls} call(s) per variant and mode, after "
        f"{settings.warmup} warm-up call(s); train = forward + cross-entropy + backward + SGD step; "
        "inference = eval-mode forward under torch.no_grad()",
    ]
    lines += [f"{name}: {specs[name].source}" for name in settings.models]
    return "\n".join(lines)


def _agreement_lines(rows: list) -> str:
    seen = dict.fromkeys((r["model"], r["b1_vs_reference_logits_rel_diff"]) for r in rows)
    return "\n".join(f"{model}: b1 vs b1-reference logits, max relative difference {d:.1e}" for model, d in seen)
