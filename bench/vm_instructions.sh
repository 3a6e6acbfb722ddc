#!/bin/sh
# Instructions per S0 stream (request headers, response headers, the sealed audit record and the
# metrics sample) that core's code costs inside V8, the engine Envoy runs the filter in: the
# `hot_path` example built for wasm32-wasip1 (BLAKE3 with Wasm SIMD, as the filter builds it) and
# run by Node under callgrind twice, 10,000 and 30,000 streams; the difference over 20,000 is one
# stream's cost without start-up. V8 compiles everything with its optimising compiler up front
# (--no-liftoff --no-wasm-tier-up) so that tier-up does not land in one run and not the other:
# repeats within ~0.1 %. A developer's tool (needs Node 20 and valgrind; not run by make).
# Usage: bench/vm_instructions.sh [file.wasm]   (default: builds the example first)
set -eu
cd "$(dirname "$0")/.."
wasm=${1:-}
if [ -z "$wasm" ]; then
    cargo build -q --release -p apisec-core --example hot_path --target wasm32-wasip1 --features blake3/wasm32_simd
    wasm=target/wasm32-wasip1/release/examples/hot_path.wasm
fi
out=$(mktemp -d)
for n in 10000 30000; do
    HOT_S0=1 HOT_N=100 HOT_STREAM=$n valgrind --tool=callgrind --smc-check=all-non-file \
        --callgrind-out-file="$out/cg.$n" node --no-warnings --single-threaded --no-liftoff \
        --no-wasm-tier-up bench/vm_stream.mjs "$wasm" > /dev/null 2>&1
done
a=$(awk '/^summary:/ {print $2}' "$out/cg.10000")
b=$(awk '/^summary:/ {print $2}' "$out/cg.30000")
rm -rf "$out"
echo "instructions per S0 stream in V8: $(( (b - a) / 20000 ))"
