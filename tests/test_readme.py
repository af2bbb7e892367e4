"""The README: its test command is the one CI runs, and every ```python block runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# A block preceded by this comment is not run (it needs a model zoo download or a checkpoint file).
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->\s*$")


def python_blocks(text: str) -> list:
    """(first line number, code, why not run or None) of every ```python block."""
    blocks, lines = [], text.splitlines()
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        start = text.count("\n", 0, match.start())
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        reason = NOT_RUN.search(before)
        code = match.group(1)
        blocks.append((start + 1, code, reason.group(1) if reason else None))
    return blocks


BLOCKS = python_blocks(README)


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci_lines[ci_lines.index(next(l for l in ci_lines if l.startswith("# README command 2"))) + 1]
    assert command in README


def test_the_readme_has_python_blocks_to_run():
    assert sum(why is None for _, _, why in BLOCKS) >= 2


@pytest.mark.parametrize("line, code, why", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs(line, code, why, tmp_path, monkeypatch):
    if why is not None:
        pytest.skip(f"README line {line}: {why}")
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def _section(heading: str) -> str:
    start = README.index(f"\n## {heading}\n")
    end = README.find("\n## ", start + 1)
    return README[start:] if end < 0 else README[start:end]


def test_every_reference_points_inside_the_repository():
    """No document outside the repository is cited."""
    assert "SPEC" not in README and "../shared" not in README
