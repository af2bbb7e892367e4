"""The figures the hardening tests gather, for the README's testing section.

Tests call `count(section, key)` as they run (examples fuzzed per backend, bad inputs tried, ...).
At the end of the session conftest.py prints them and, when the environment variable
PUSHPULL_TEST_RESULTS names a file, writes them there as JSON (benchmarks/gpu_suite.sh does so).
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter, defaultdict

RESULTS_ENV = "PUSHPULL_TEST_RESULTS"

_COUNTS: dict[str, Counter] = defaultdict(Counter)


def count(section: str, key: str, n: int = 1) -> None:
    _COUNTS[section][key] += n


def counts() -> dict:
    """{section: {key: count}}, sorted, as plain dicts."""
    return {section: dict(sorted(keys.items())) for section, keys in sorted(_COUNTS.items())}


def summary_lines() -> list[str]:
    return [f"{section}: " + ", ".join(f"{key}={n}" for key, n in keys.items()) for section, keys in counts().items()]


def write_if_asked(extra: dict) -> str | None:
    """Write counts() plus `extra` to $PUSHPULL_TEST_RESULTS (if set); return the path written.

    Under pytest-xdist each worker writes its counts to PATH.<worker>.part, and the controller, whose
    session ends after the workers', adds them up into PATH."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        with open(f"{path}.{worker}.part", "w") as f:
            json.dump(counts(), f)
        return None
    for part in sorted(glob.glob(f"{glob.escape(path)}.*.part")):
        with open(part) as f:
            for section, keys in json.load(f).items():
                _COUNTS[section].update(keys)
        os.remove(part)
    if not _COUNTS:
        return None
    with open(path, "w") as f:
        json.dump({**extra, "counts": counts()}, f, indent=2)
    return path
