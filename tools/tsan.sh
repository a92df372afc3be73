#!/usr/bin/env bash
# ThreadSanitizer over the library's threads: the thread pool, two sessions sharing one model (with a tokenizer thread
# beside them), and two threads contending for one session (tests/native/tsan_sessions.c), and the generator with a
# second thread refused while it runs (tests/native/generator_threads.c), on each tiny model that
# native/fuzz/make_data.py writes (llama in F32, F16, Q4_0, Q8_0; BlockFFN when the converter can be imported).
# Usage: tools/tsan.sh        (CC: the compiler, default cc; gcc and clang both work)
# Exit status non-zero on any ThreadSanitizer report or failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${SPARROW_TSAN_DIR:-build/tsan}"  # SPARROW_TSAN_DIR: another build folder
cc="${CC:-cc}"
cmake -S native -B "$out/build" -G Ninja -DCMAKE_C_COMPILER="$cc" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" -DSPARROW_PYTHON=OFF -DSPARROW_EXAMPLES=OFF >/dev/null
cmake --build "$out/build" -j2 --target sparrow_static
"$cc" -std=c11 -Wall -Wextra -Werror -O1 -g -fsanitize=thread -Inative/include tests/native/tsan_sessions.c \
  "$out/build/libsparrow_static.a" -lpthread -lm -o "$out/tsan_sessions"
"$cc" -std=c11 -Wall -Wextra -Werror -O1 -g -fsanitize=thread -Inative/include tests/native/generator_threads.c \
  "$out/build/libsparrow_static.a" -lpthread -lm -o "$out/generator_threads"
[[ -n "${SPARROW_BUILD_DIR:-}" ]] && export PYTHONPATH="$PWD/$SPARROW_BUILD_DIR/python${PYTHONPATH:+:$PYTHONPATH}"
[[ -f "$out/data/.done" && "$out/data/.done" -nt native/fuzz/make_data.py ]] || {
  python3 native/fuzz/make_data.py "$out" >/dev/null && touch "$out/data/.done"; }
for m in "$out"/data/model-*.gguf; do
  echo "== $(basename "$m")"
  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" "$out/tsan_sessions" "$m"
  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" "$out/generator_threads" "$m"
done
echo "OK: no ThreadSanitizer reports"
