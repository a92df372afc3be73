#!/usr/bin/env bash
# Run the GGUF reader over its whole negative corpus under AddressSanitizer + UBSan + LeakSanitizer, then (unless
# --no-valgrind) under valgrind's memcheck with an unsanitized build.
# The corpus (tests/gguf_corpus.py): every hand-made bad case, every truncation of a small valid file, N seeded random
# mutations, the valid edge cases and the SmolLM2 fixture when cached; each file opened with mmap, read() and from
# memory by tests/native/gguf_check.c, which also walks every KV, string and tensor of the files that parse.
# Usage: tools/asan_gguf.sh [N_MUTATIONS (default 5000)] [--no-valgrind]
# The reader is compiled straight from native/src/gguf.c + error.c (the same flags as SPARROW_SANITIZE=ON), so the
# check does not depend on the rest of the library building.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-5000}"
out="build/gguf-asan"
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cc="${CC:-cc}"
src=(native/src/gguf.c native/src/error.c tests/native/gguf_check.c)
"$cc" -std=c11 -Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
  -fno-sanitize-recover=all -Inative/include -Inative/src "${src[@]}" -lm -o "$out/gguf_check_asan"
extra=()
[[ -f tests/.cache/SmolLM2-135M-Instruct.Q4_1.gguf ]] && extra+=(tests/.cache/SmolLM2-135M-Instruct.Q4_1.gguf)
manifest="$(python3 tests/gguf_corpus.py "$tmp/corpus" "$n" "${extra[@]}")"
echo "== ASan + UBSan + LeakSanitizer"
ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$out/gguf_check_asan" "$manifest"
if [[ "${2:-}" != "--no-valgrind" ]] && command -v valgrind >/dev/null; then
  echo "== valgrind memcheck (corpus without the large model file)"
  "$cc" -std=c11 -O1 -g -Inative/include -Inative/src "${src[@]}" -lm -o "$out/gguf_check"
  grep -v SmolLM "$manifest" > "$tmp/manifest_small.txt"
  valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=all \
    "$out/gguf_check" "$tmp/manifest_small.txt"
fi
echo "OK: no sanitizer or valgrind reports"
