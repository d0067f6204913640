#!/usr/bin/env python3
"""Checks of tools/make_random_gguf.py, the maker of the random quantized models the speed
benchmarks run: for each --type, the file has the tensors, shapes and block types that
tools/quantize gives a converted checkpoint of the same shape (so both read the same bytes),
the same metadata but the name, block scales that are finite and small, codes that differ
between tensors, and ggml-fa-run loads it and computes finite, varied logits.

Usage: test_random_gguf.py --convert PATH --quantize PATH --run PATH
Exit code 77 means skipped (numpy missing).
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile

try:
    import numpy as np
except ImportError as e:  # pragma: no cover
    print(f"SKIP: {e} (pip install numpy)")
    sys.exit(77)

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools")
SHAPE = ["--layers", "9", "--hidden", "256", "--ffn", "512", "--heads", "2", "--kv-heads", "1", "--vocab", "300"]
# block type id: (values, bytes, offsets of f16 scales)
BLOCKS = {8: (32, 34, [0]), 12: (256, 144, [0, 2]), 13: (256, 176, [0, 2]), 14: (256, 210, [208])}


def read_gguf(path):
    """(metadata {key: value}, tensors {name: (type, dims, bytes)}) of a GGUF v3 file."""
    data = open(path, "rb").read()
    at = 0

    def take(fmt):
        nonlocal at
        values = struct.unpack_from("<" + fmt, data, at)
        at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string():
        nonlocal at
        n = take("Q")
        at += n
        return data[at - n:at].decode()

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:
            inner, n = take("I"), take("Q")
            return [value(inner) for _ in range(n)]
        return take(scalar[kind])

    assert data[:4] == b"GGUF" and take("4sI")[1] == 3, "not a GGUF v3 file"
    n_tensors, n_kv = take("QQ")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        kind, offset = take("IQ")
        infos.append((name, kind, dims, offset))
    align = meta.get("general.alignment", 32)
    start = (at + align - 1) // align * align
    tensors = {}
    for name, kind, dims, offset in infos:
        if kind == 0:
            size = 4 * int(np.prod(dims))
        else:
            per, nbytes, _ = BLOCKS[kind]
            size = dims[0] // per * int(np.prod(dims[1:])) * nbytes
        tensors[name] = (kind, dims, data[start + offset:start + offset + size])
    return meta, tensors


def check_type(work, a, type_name, failures):
    made = os.path.join(work, f"random-{type_name}.gguf")
    subprocess.run([sys.executable, os.path.join(TOOLS, "make_random_gguf.py"), made, "--type", type_name,
                    "--seed", str(int.from_bytes(os.urandom(2), "little"))] + SHAPE, check=True, capture_output=True)
    # The same shape through the float pipeline: random checkpoint, convert, quantize.
    ckpt, f16, quantized = (os.path.join(work, n) for n in ("ckpt", "ckpt.gguf", f"ckpt-{type_name}.gguf"))
    if not os.path.exists(f16):
        subprocess.run([sys.executable, os.path.join(TOOLS, "make_random_llama.py"), ckpt, "--fast"] + SHAPE,
                       check=True, capture_output=True)
        subprocess.run([a.convert, ckpt, "-o", f16, "--type", "f16"], check=True, capture_output=True)
    subprocess.run([a.quantize, f16, quantized, type_name], check=True, capture_output=True)

    meta, tensors = read_gguf(made)
    want_meta, want = read_gguf(quantized)
    label = f"--type {type_name}"
    layout = {n: (t[0], t[1]) for n, t in tensors.items()}
    want_layout = {n: (t[0], t[1]) for n, t in want.items()}
    if layout != want_layout:
        wrong = sorted(n for n in set(layout) | set(want_layout) if layout.get(n) != want_layout.get(n))
        failures.append(f"{label}: (type, shape) differ from tools/quantize's for {wrong[:6]}")
    meta.pop("general.name"), want_meta.pop("general.name")
    if meta != want_meta:
        failures.append(f"{label}: metadata {meta} differ from tools/convert + quantize's {want_meta}")
    starts = set()
    for name, (kind, dims, raw) in tensors.items():
        if kind == 0:
            if not (np.frombuffer(raw, dtype="<f4") == 1.0).all():
                failures.append(f"{label}: {name} is not all ones")
            continue
        _, nbytes, scale_at = BLOCKS[kind]
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, nbytes)
        for at in scale_at:
            d = blocks[:, at:at + 2].copy().view("<f2").astype(np.float64).ravel()
            if not (np.isfinite(d).all() and (d > 0).all() and d.max() < 1e-3):
                failures.append(f"{label}: {name} has block scales outside (0, 1e-3): {d.min()} .. {d.max()}")
        starts.add(raw[:64])
    n_matrices = sum(1 for t in tensors.values() if t[0] != 0)
    if len(starts) != n_matrices:
        failures.append(f"{label}: {n_matrices - len(starts)} matrices start with the same bytes as another")

    logits = os.path.join(work, f"random-{type_name}.f32")
    subprocess.run([a.run, "-m", made, "--tokens", "1,5,9,200", "-n", "2", "--ignore-eos", "--logits-out", logits,
                    "-t", "2"], check=True, capture_output=True)
    values = np.fromfile(logits, dtype=np.float32)
    if values.size == 0 or not np.isfinite(values).all() or values.std() == 0:
        failures.append(f"{label}: ggml-fa-run gave {values.size} logits, not all finite and varied")
    else:
        print(f"{label}: {len(tensors)} tensors as tools/quantize lays them out; {values.size} finite logits")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--convert", required=True)
    ap.add_argument("--quantize", required=True)
    ap.add_argument("--run", required=True)
    a = ap.parse_args()
    failures = []
    with tempfile.TemporaryDirectory() as work:
        for type_name in ("q4_K_M", "q5_K_M", "q8_0", "q6_K"):
            check_type(work, a, type_name, failures)
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
