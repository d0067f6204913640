#!/usr/bin/env bash
# Runs the PyTorch peer and bench_attn_cuda on this GPU machine and prints our speed as a
# ratio of PyTorch flash (FlashAttention-2) and cuDNN, and of SDPA for decoding.
#   tools/bench_cuda.sh BUILD_DIR [OUT_DIR] [--quick | --decode-only | --mask]
# --mask: causal attention through an explicit mask, ours against PyTorch's kernels that take
# a mask (memory-efficient attention, cuDNN) and against FlashAttention-2 with the causal flag.
set -euo pipefail
build=${1:?build directory}
out=${2:-.}
quick=${3:-}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
if [ "$quick" = "--decode-only" ]; then
    python3 "$here/bench_torch_peer.py" --decode-only --csv "$out/peer.csv"
    "$build/bench_attn_cuda" --no-fa --csv "$out/ours.csv"
elif [ "$quick" = "--mask" ]; then
    python3 "$here/bench_torch_peer.py" --mask --csv "$out/peer.csv"
    python3 "$here/bench_torch_peer.py" --csv "$out/peer_flag.csv"
    "$build/bench_attn_cuda" --mask --no-decode --causal 1 --csv "$out/ours.csv"
    python3 - "$out/peer.csv" "$out/peer_flag.csv" "$out/ours.csv" <<'PY'
import csv, sys
rows = [r for f in sys.argv[1:] for r in csv.DictReader(open(f))]
def find(impl, r):
    for p in rows:
        if p["kind"] == "fa" and p["impl"] == impl and (p["d"], p["s"], p["b"], p["causal"]) == (r["d"], r["s"], r["b"], "1"):
            return p
print("\ncausal attention through an explicit mask: ours / peer, TFLOP/s (FLOPs halved)")
print(f"{'d':>4} {'s':>6} | {'ours fwd':>8} {'xeff':>5} {'xcuDNN':>6} {'xFA2flag':>8} | {'ours bwd':>8} {'xeff':>5} {'xcuDNN':>6} {'xFA2flag':>8}")
for r in rows:
    if r["kind"] != "fa" or r["impl"] != "ours" or r["causal"] != "1":
        continue
    eff, cud, fa2 = find("efficient-mask", r), find("cudnn-mask", r), find("flash", r)
    ratio = lambda peer, col: f"{float(r[col]) / float(peer[col]):.2f}" if peer else "  -"
    print(f"{r['d']:>4} {r['s']:>6} | {float(r['fwd_tflops']):8.0f} {ratio(eff, 'fwd_tflops'):>5} {ratio(cud, 'fwd_tflops'):>6} "
          f"{ratio(fa2, 'fwd_tflops'):>8} | {float(r['bwd_tflops']):8.0f} {ratio(eff, 'bwd_tflops'):>5} "
          f"{ratio(cud, 'bwd_tflops'):>6} {ratio(fa2, 'bwd_tflops'):>8}")
PY
    exit 0
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
