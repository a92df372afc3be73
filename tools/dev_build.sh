#!/usr/bin/env bash
# Fast incremental developer build of libsparrow and the _sparrow Python module into a CMake build folder, plus
# BUILD_DIR/python/sparrow: the installed package's layout as links to the repository's folders (pyproject.toml's
# wheel.packages), so tests run the sources as they are edited.
# Needs CMake, Ninja and nanobind in the active Python (pip install cmake ninja nanobind).
# Usage: tools/dev_build.sh [BUILD_DIR] [extra cmake -D options]
# Then run tests against it with: SPARROW_BUILD_DIR=BUILD_DIR pytest tests
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
dir="${1:-build/dev}"; shift || true
cmake -S native -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" "$@" >/dev/null
cmake --build "$dir" -j2
pkg="$dir/python/sparrow"
mkdir -p "$pkg"
for f in "$repo"/python/sparrow/*.py; do ln -sfn "$f" "$pkg/$(basename "$f")"; done
for sub in runtime converters bench_device training models; do ln -sfn "$repo/$sub" "$pkg/$sub"; done
echo "built $dir; run: SPARROW_BUILD_DIR=$dir pytest tests"
