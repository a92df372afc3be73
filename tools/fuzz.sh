#!/usr/bin/env bash
# Build the libFuzzer targets of native/fuzz (clang, -fsanitize=fuzzer,address,undefined), replay the saved crash
# inputs of tests/fuzz_regressions/<target>/, then fuzz each target for SECONDS.
#   fuzz_load      a GGUF file through sp_model_load, then the model used as a host would (vocabulary, a session)
#   fuzz_vocab     a GGUF image's vocabulary: tokenize texts of its own tokens, detokenize every token
#   fuzz_tokenize  arbitrary bytes through both tokenizers (BPE under each pre-tokenizer, SentencePiece)
#   fuzz_sampler   arbitrary sampler parameters and logits; sp_top_k
#   fuzz_eval      sp_eval with random batches, positions and masks, truncate and keep, on tiny models
#   fuzz_npy       .npy files for Token Recycling's state (sp_generator_load_drafter's reader), expected shape varied
# Usage: tools/fuzz.sh [SECONDS per target (default 20)] [TARGET...]
#   FUZZ_JOBS=N runs N targets at once (default 1); CC (default clang) compiles; SPARROW_BUILD_DIR (a developer
#   build, tools/dev_build.sh) supplies the sparrow package when it is not installed (for the BlockFFN model).
# Corpora grow in build/fuzz/corpus/<target> (kept between runs), crash inputs go to build/fuzz/crashes/<target>/,
# each target's log to build/fuzz/logs/<target>.log; the summary prints libFuzzer's final figures. Exit status 1 if a
# target crashed or a regression input fails. A crash worth keeping: copy its input to tests/fuzz_regressions/<target>/
# and add a test that reproduces it through the Python API (tests/test_hostile_native.py).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"; shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(load vocab tokenize sampler eval npy)
jobs="${FUZZ_JOBS:-1}"
out="build/fuzz"
cc="${CC:-clang}"
command -v "$cc" >/dev/null || { echo "tools/fuzz.sh needs clang (Debian: apt-get install clang libclang-rt-14-dev)"; exit 2; }

cmake -S native -B "$out/build" -G Ninja -DCMAKE_C_COMPILER="$cc" -DCMAKE_BUILD_TYPE=Debug -DSPARROW_FUZZ=ON \
  -DSPARROW_PYTHON=OFF -DSPARROW_EXAMPLES=OFF >/dev/null
cmake --build "$out/build" -j2 --target "${targets[@]/#/fuzz_}"
# the data (BlockFFN's converter comes from the sparrow package: installed, or a developer build's tree)
[[ -n "${SPARROW_BUILD_DIR:-}" ]] && export PYTHONPATH="$PWD/$SPARROW_BUILD_DIR/python${PYTHONPATH:+:$PYTHONPATH}"
[[ -f "$out/data/.done" && "$out/data/.done" -nt native/fuzz/make_data.py ]] || {
  python3 native/fuzz/make_data.py "$out" && touch "$out/data/.done"; }
export SPARROW_FUZZ_DATA="$PWD/$out/data"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"

status=0
# Saved crashes first: each must now run clean.
for t in "${targets[@]}"; do
  reg="tests/fuzz_regressions/$t"
  if compgen -G "$reg/*" >/dev/null; then
    if "$out/build/fuzz_$t" "$reg"/* >"$out/regressions-$t.log" 2>&1; then
      echo "fuzz_$t: $(ls "$reg" | wc -l) saved crash inputs run clean"
    else
      echo "fuzz_$t: a saved crash input fails again (see $out/regressions-$t.log)"; status=1
    fi
  fi
done

run_one() {
  local t="$1" seconds="$2" out="$3"
  mkdir -p "$out/corpus/$t" "$out/crashes/$t" "$out/logs"
  # -rss_limit_mb: a hostile file may make the loader allocate what its size allows, not more; -timeout: a hang
  "$out/build/fuzz_$t" "$out/corpus/$t" "$out/seeds/$t" -max_total_time="$seconds" -print_final_stats=1 \
    -rss_limit_mb=4096 -timeout=30 -artifact_prefix="$out/crashes/$t/" >"$out/logs/$t.log" 2>&1
}
export -f run_one
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {} "$seconds" "$out" || status=1

for t in "${targets[@]}"; do
  log="$out/logs/$t.log"
  last="$(grep -E '^#[0-9]+' "$log" | tail -1 | sed -E 's/ +/ /g')" || true
  execs="$(grep -oE 'stat::number_of_executed_units: +[0-9]+' "$log" | grep -oE '[0-9]+$')" || true
  rate="$(grep -oE 'stat::average_exec_per_sec: +[0-9]+' "$log" | grep -oE '[0-9]+$')" || true
  if grep -qE '^==[0-9]+==ERROR|^SUMMARY: |fuzz check failed|deadly signal|ERROR: libFuzzer' "$log"; then
    echo "fuzz_$t: CRASH after ${seconds}s (see $log, input in $out/crashes/$t/)"; status=1
  else
    echo "fuzz_$t: ${seconds}s, ${execs:-?} execs (${rate:-?}/s), last: ${last:-?}"
  fi
done
exit $status
