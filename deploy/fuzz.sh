#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time — SECONDS each (default
# 60) — growing its corpus in tests/fuzz/<target>/, then shrinks each corpus
# to the inputs that still add coverage. A crash stops the run; its input is
# saved under fuzz/artifacts/<target>/ (add it to the corpus once fixed:
# `cargo test --test fuzz_corpus` replays every corpus file).
#
# The machine's stable toolchain builds the instrumented targets
# (RUSTC_BOOTSTRAP lets it use the unstable flags cargo fuzz passes), so no
# nightly toolchain is needed. Installs cargo-fuzz when missing.
#
#   ./deploy/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
./deploy/setup.sh
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
# No sanitizer: Collie's own code has no `unsafe`; what fuzzing looks for
# here is a panic, an assertion of `collie::fuzzing` or a hang.
opts=(--sanitizer none --release)
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build "${opts[@]}"
for t in "${targets[@]}"; do
  mkdir -p "tests/fuzz/$t"
  echo "== fuzz $t for ${seconds}s"
  log="target/fuzz-$t.log"
  mkdir -p target
  if ! cargo fuzz run "${opts[@]}" "$t" "tests/fuzz/$t" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)" "$log" || true
done
if [ "${FUZZ_CMIN:-1}" = 1 ]; then
  for t in "${targets[@]}"; do
    cargo fuzz cmin "${opts[@]}" "$t" "tests/fuzz/$t" >/dev/null 2>&1
    echo "corpus $t: $(ls "tests/fuzz/$t" | wc -l) inputs"
  done
fi
