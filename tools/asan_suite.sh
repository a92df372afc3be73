#!/usr/bin/env bash
# The Python suite (or the test files given) against an AddressSanitizer + UBSan build of libsparrow and _sparrow:
# tools/dev_build.sh build/asan -DSPARROW_SANITIZE=ON, the sanitizer runtimes preloaded into Python (which is not
# built with them), leak checking off (CPython's own allocations would drown it; tools/asan_gguf.sh checks the reader
# for leaks), a failed allocation returning NULL as glibc's does (the chat-template sandbox caps RLIMIT_AS and expects
# MemoryError), SIGSEGV left to the process (tests that kill a child with it expect that signal back; a real
# segfault still fails its test). Any ASan or UBSan report aborts the process, so it fails its test.
# Usage: tools/asan_suite.sh [PYTEST ARGS...]      (default: tests)
# Needs what tools/dev_build.sh needs (cmake, ninja, nanobind in the active Python) and gcc's sanitizer runtimes.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/dev_build.sh build/asan -DSPARROW_SANITIZE=ON >/dev/null
asan="$(${CC:-cc} -print-file-name=libasan.so)"
ubsan="$(${CC:-cc} -print-file-name=libubsan.so)"
[[ -e "$asan" && -e "$ubsan" ]] || { echo "no sanitizer runtimes next to ${CC:-cc}"; exit 2; }
[[ $# -gt 0 ]] || set -- tests
export LD_PRELOAD="$asan:$ubsan${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:handle_segv=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
SPARROW_BUILD_DIR=build/asan pytest "$@"
