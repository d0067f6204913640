#!/usr/bin/env bash
# Runs the PyTorch peer and bench_attn_cuda on this GPU machine and prints our speed as a
# ratio of PyTorch flash (FlashAttention-2) and cuDNN, and of SDPA for decoding.
#   tools/bench_cuda.sh BUILD_DIR [OUT_DIR] [--quick | --decode-only]
set -euo pipefail
build=${1:?build directory}
out=${2:-.}
quick=${3:-}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
if [ "$quick" = "--decode-only" ]; then
    python3 "$here/bench_torch_peer.py" --decode-only --csv "$out/peer.csv"
    "$build/bench_attn_cuda" --no-fa --csv "$out/ours.csv"
else
    python3 "$here/bench_torch_peer.py" $quick --csv "$out/peer.csv"
    "$build/bench_attn_cuda" $quick --csv "$out/ours.csv"
fi
python3 - "$out/peer.csv" "$out/ours.csv" <<'PY'
import csv, sys
rows = [r for f in sys.argv[1:] for r in csv.DictReader(open(f))]
def find(kind, impl, d, s, b, causal, dtype=None):
    for r in rows:
        if (r["kind"], r["impl"], r["d"], r["s"], r["b"], r["causal"]) == (kind, impl, d, s, b, causal) and \
           (dtype is None or r["dtype"] == dtype):
            return r
print("\nratios (ours / peer), TFLOP/s forward and backward")
print(f"{'d':>4} {'s':>6} {'causal':>6} | {'ours fwd':>8} {'xFA2':>5} {'xcuDNN':>6} | {'ours bwd':>8} {'xFA2':>5} {'xcuDNN':>6}")
for r in rows:
    if r["kind"] != "fa" or r["impl"] != "ours":
        continue
    fa2 = find("fa", "flash", r["d"], r["s"], r["b"], r["causal"])
    cud = find("fa", "cudnn", r["d"], r["s"], r["b"], r["causal"])
    ratio = lambda peer, col: f"{float(r[col]) / float(peer[col]):.2f}" if peer else "  -"
    print(f"{r['d']:>4} {r['s']:>6} {r['causal']:>6} | {float(r['fwd_tflops']):8.0f} {ratio(fa2, 'fwd_tflops'):>5} "
          f"{ratio(cud, 'fwd_tflops'):>6} | {float(r['bwd_tflops']):8.0f} {ratio(fa2, 'bwd_tflops'):>5} {ratio(cud, 'bwd_tflops'):>6}")
print("\ndecode GB/s of K+V (GQA 32/8, d=128): ours vs SDPA f16")
for r in rows:
    if r["kind"] != "decode" or r["impl"] != "ours":
        continue
    peer = find("decode", "sdpa", r["d"], r["s"], r["b"], "0")
    ratio = f"{float(r['fwd_tflops']) / float(peer['fwd_tflops']):.2f}" if peer else "-"
    print(f"  {r['dtype']:5s} batch {r['b']:>2} kv {r['s']:>6}: ours {float(r['fwd_tflops']):6.0f}  "
          f"sdpa f16 {float(peer['fwd_tflops']) if peer else float('nan'):6.0f}  ratio {ratio}")
PY
