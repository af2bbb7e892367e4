"""Rewrites the README's performance section from the committed result files.

    python benchmarks/render_readme.py          # reads benchmarks/results/*/results.json

Each results.json (written by `python -m pushpull_ext.bench --out DIR`) becomes one table: device,
versions, commit and date, then per shape and provider the median forward and forward+backward
times, the speedup over the eager reference and, where the run had the conv+relu provider, the time
over the plain convolution + ReLU of the same geometry. A results.json of `--models` becomes the
whole-network table: per model, mode and variant the median step time and its excess over plain.
Only figures a committed file holds reach the README.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"


def _commit_date(path: Path) -> str:
    """Date of the commit that added `path` (results written before bench.py recorded the date); today if
    it is not committed yet."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or datetime.date.today().isoformat()


def _load(env: dict, end=None) -> str:
    """The shared machine's load average (1, 5, 15 min) at the run's start, and at its end where recorded."""
    parts = [(when, load) for when, load in (("start", env.get("load_average_at_start")), ("end", end)) if load]
    return "".join(f"; load average at {when} {', '.join(f'{v:.2f}' for v in load)}" for when, load in parts)


def _table(result: dict, folder: Path) -> list[str]:
    env, settings = result["environment"], result["settings"]
    date = (env.get("date") or _commit_date(folder / "results.json"))[:10]
    with_conv = any(m.get("conv_ratio") for row in result["rows"] for m in row.get("modes", {}).values())
    conv_head = " fwd / conv+relu | fwd+bwd / conv+relu |" if with_conv else ""
    lines = [
        f"### {env.get('device_name', env['device'])} ({env['device']}, {settings.get('threads')} threads) — "
        f"`{folder.relative_to(ROOT)}`",
        "",
        f"torch {env['torch']}, Triton {env.get('triton')}, CUDA {env.get('cuda')}; commit "
        f"`{env['git_commit'][:12]}`; {date}; TF32 {'on' if settings.get('tf32') else 'off'}; "
        f"dtypes {', '.join(settings['dtypes'])}{_load(env, env.get('load_average_at_end'))}.",
        "",
        "| shape | batch | dtype | provider | fwd ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup |"
        + conv_head
        + " within tolerance |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if with_conv else "") + "---|",
    ]
    for row in result["rows"]:
        modes = row.get("modes", {})
        cells = []
        for mode in ("fwd", "fwdbwd"):
            m = modes.get(mode)
            cells += [f"{m['ms']:.2f}", f"{m['speedup']:.2f}x"] if m else ["-", "-"]
        for mode in ("fwd", "fwdbwd") if with_conv else ():
            ratio = modes.get(mode, {}).get("conv_ratio")
            cells.append(f"{ratio:.2f}x" if ratio else "-")
        batch = f"{row['batch']}" + ("" if row["batch"] == row["spec_batch"] else f" (paper {row['spec_batch']})")
        lines.append(
            f"| {row['shape']} | {batch} | {row['dtype']} | {row['provider']} | "
            + " | ".join(cells)
            + f" | {row['tolerance']} |"
        )
    for png in sorted(folder.glob("speedup_*.png")):
        lines += ["", f"![{png.stem}]({png.relative_to(ROOT)})"]
    return lines + [""]


def _models_table(result: dict, folder: Path) -> list[str]:
    """The whole-network run (`--models`): median step time per model, mode and variant, and + % over plain."""
    env, settings = result["environment"], result["settings"]
    lines = [
        f"### Whole networks: {env.get('device_name', env['device'])} ({env['device']}, {settings['threads']} "
        f"threads) — `{folder.relative_to(ROOT)}`",
        "",
        f"torch {env['torch']}; commit `{env['git_commit'][:12]}`; {env['date'][:10]}; {settings['rounds']} "
        f"interleaved rounds x {settings['calls']} calls per variant and mode{_load(env, result.get('load_average_at_end'))}.",
        "",
        "| model | batch | input | mode | variant | ms (median) | ms (best) | vs plain | layers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        over = "-" if r["variant"] == "plain" else f"{r['over_plain_pct']:+.1f} %"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['image']} px | {r['mode']} | {r['variant']} | {r['ms']:.1f} | "
            f"{r['ms_best']:.1f} | {over} | {r['description']} |"
        )
    for png in sorted(folder.glob("*.png")):
        lines += ["", f"![{png.stem}]({png.relative_to(ROOT)})"]
    return lines + [""]


def _section_order(path: Path) -> tuple:
    """A machine's whole-network table (folder `<name>-models`) right after its per-layer one (`<name>`)."""
    folder = str(path.parent.relative_to(ROOT))
    return (folder.removesuffix("-models"), folder.endswith("-models"))


def render() -> str:
    sections = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("**/results.json"), key=_section_order):
        result = json.loads(path.read_text())
        table = _models_table if result.get("benchmark") == "models" else _table
        sections += table(result, path.parent)
    if not sections:
        sections = ["No committed benchmark results yet.", ""]
    return "\n".join(sections)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the markers {BEGIN} / {END}", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render()}{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
