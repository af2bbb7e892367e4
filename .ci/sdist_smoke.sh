#!/usr/bin/env bash
# Builds the sdist, builds a wheel from it, installs that wheel into a fresh venv (torch from pip's cache)
# and runs tests/support/smoke_installed.py there from outside the checkout. Exits non-zero on failure.
# Run inside the venv of README command 2 (it has torch; `build` is installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip install -q build
python -m build --sdist --no-isolation --outdir "$work/dist" . > "$work/build.log" || { cat "$work/build.log"; exit 1; }
sdist=("$work"/dist/pushpull_ext-*.tar.gz)
echo "sdist: $(basename "${sdist[0]}"), $(tar tzf "${sdist[0]}" | wc -l) entries"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0 "setuptools>=77" wheel
# PUSHPULL_REQUIRE_CPP=1: a compile error fails here instead of installing without the C++ kernels.
PUSHPULL_REQUIRE_CPP=1 "$work/venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$work/wheel" "${sdist[0]}"
echo "wheel: $(basename "$work"/wheel/pushpull_ext-*.whl)"
"$work/venv/bin/pip" install -q "$work"/wheel/pushpull_ext-*.whl
(cd "$work" && "$work/venv/bin/python" "$OLDPWD/tests/support/smoke_installed.py")
