"""The README's test command is the one CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci_lines[ci_lines.index(next(l for l in ci_lines if l.startswith("# README command 2"))) + 1]
    assert command in (ROOT / "README.md").read_text()
