#!/usr/bin/env bash
# Fast incremental developer build of libsparrow and the _sparrow Python module into a CMake build folder.
# Usage: tools/dev_build.sh [BUILD_DIR] [extra cmake -D options]
# Then run tests against it with: SPARROW_BUILD_DIR=BUILD_DIR python -m pytest tests
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-build/dev}"; shift || true
cmake -S native -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" "$@" >/dev/null
cmake --build "$dir" -j2
