"""Rewrites the README's performance section from the committed result files.

    python benchmarks/render_readme.py          # reads benchmarks/results/*/results.json

Each results.json (written by `python -m pushpull_ext.bench --out DIR`) becomes one table: device,
versions, commit and date, then per shape and provider the median forward and forward+backward
times and the speedup over the eager reference. Only figures a committed file holds reach the README.
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


def _table(result: dict, folder: Path) -> list[str]:
    env, settings = result["environment"], result["settings"]
    date = (env.get("date") or _commit_date(folder / "results.json"))[:10]
    lines = [
        f"### {env.get('device_name', env['device'])} ({env['device']}, {settings.get('threads')} threads) — "
        f"`{folder.relative_to(ROOT)}`",
        "",
        f"torch {env['torch']}, Triton {env.get('triton')}, CUDA {env.get('cuda')}; commit "
        f"`{env['git_commit'][:12]}`; {date}; TF32 {'on' if settings.get('tf32') else 'off'}; "
        f"dtypes {', '.join(settings['dtypes'])}.",
        "",
        "| shape | batch | dtype | provider | fwd ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup | within tolerance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        modes = row.get("modes", {})
        cells = []
        for mode in ("fwd", "fwdbwd"):
            m = modes.get(mode)
            cells += [f"{m['ms']:.2f}", f"{m['speedup']:.2f}x"] if m else ["-", "-"]
        batch = f"{row['batch']}" + ("" if row["batch"] == row["spec_batch"] else f" (paper {row['spec_batch']})")
        lines.append(
            f"| {row['shape']} | {batch} | {row['dtype']} | {row['provider']} | "
            + " | ".join(cells)
            + f" | {row['tolerance']} |"
        )
    for png in sorted(folder.glob("speedup_*.png")):
        lines += ["", f"![{png.stem}]({png.relative_to(ROOT)})"]
    return lines + [""]


def render() -> str:
    sections = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("**/results.json")):
        sections += _table(json.loads(path.read_text()), path.parent)
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
