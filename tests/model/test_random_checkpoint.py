#!/usr/bin/env python3
"""Checks of tools/make_random_llama.py, the maker of the random checkpoints the speed
benchmarks run: with and without --fast, every tensor has the shape the config implies, the
matrices have the requested spread and differ from each other, the norm weights are ones,
and convert + ggml-fa-run load the result and compute finite logits. The pool that --fast cuts
matrices from is also checked where a matrix is larger than it (the values wrap around).

Usage: test_random_checkpoint.py --convert PATH --run PATH
Exit code 77 means skipped (numpy missing).
"""
import argparse
import importlib.util
import json
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
MAKER = os.path.join(TOOLS, "make_random_llama.py")


def read_safetensors(path):
    """{name: array} of an f16 safetensors file, read by hand (header length, JSON, data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F16":
            raise AssertionError(f"{name}: dtype {info['dtype']}, expected F16")
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(data[lo:hi], dtype="<f2").reshape(info["shape"])
    return out


def check_checkpoint(ckpt, std, failures, label):
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    tensors = read_safetensors(os.path.join(ckpt, "model.safetensors"))
    hidden, ffn, heads, kv = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                              cfg["num_key_value_heads"])
    hd = hidden // heads
    expect = {"model.embed_tokens.weight": (cfg["vocab_size"], hidden), "lm_head.weight": (cfg["vocab_size"], hidden),
              "model.norm.weight": (hidden,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        expect.update({p + "self_attn.q_proj.weight": (heads * hd, hidden),
                       p + "self_attn.k_proj.weight": (kv * hd, hidden),
                       p + "self_attn.v_proj.weight": (kv * hd, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * hd),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    if set(tensors) != set(expect):
        failures.append(f"{label}: tensors {sorted(set(tensors) ^ set(expect))} missing or unexpected")
        return
    matrices = []
    for name, shape in expect.items():
        t = tensors[name].astype(np.float64)
        if t.shape != shape:
            failures.append(f"{label}: {name} has shape {t.shape}, expected {shape}")
        elif not np.isfinite(t).all():
            failures.append(f"{label}: {name} holds non-finite values")
        elif len(shape) == 1:
            if not (t == 1.0).all():
                failures.append(f"{label}: {name} is not all ones")
        else:
            if abs(t.std() / std - 1) > 0.1 or abs(t.mean()) > 0.1 * std:
                failures.append(f"{label}: {name} mean {t.mean():.3g}, std {t.std():.3g}, expected 0 and {std}")
            matrices.append((name, t.ravel()[:512]))
    for i in range(len(matrices)):
        for j in range(i):
            if np.array_equal(matrices[i][1], matrices[j][1]):
                failures.append(f"{label}: {matrices[i][0]} starts with the same values as {matrices[j][0]}")
    print(f"{label}: {len(tensors)} tensors checked")


def check_pool_wrap(failures):
    spec = importlib.util.spec_from_file_location("make_random_llama", MAKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pool = np.arange(10, dtype="<f2")
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for shape in ((3, 4), (5, 7), (1, 10), (2, 25)):
        for _ in range(20):
            m = mod.pooled_values(pool, shape, rng)
            flat = m.ravel().astype(int)
            ok = m.shape == shape and all(flat[k + 1] == (flat[k] + 1) % 10 for k in range(flat.size - 1))
            if not ok:
                failures.append(f"pooled_values: shape {shape} gave {m.shape} {flat.tolist()}, "
                                "expected a run of the pool wrapping around")
                return
    print("pooled_values: runs of the pool, wrapping, for matrices smaller and larger than it")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--convert", required=True)
    ap.add_argument("--run", required=True)
    a = ap.parse_args()
    failures = []
    check_pool_wrap(failures)
    seed = int.from_bytes(os.urandom(2), "little")
    std = 0.05
    with tempfile.TemporaryDirectory() as work:
        for fast in (False, True):
            label = "fast" if fast else "drawn"
            ckpt = os.path.join(work, label)
            cmd = [sys.executable, MAKER, ckpt, "--layers", "2", "--hidden", "128", "--ffn", "352", "--heads", "4",
                   "--kv-heads", "2", "--vocab", "257", "--seed", str(seed), "--std", str(std)]
            subprocess.run(cmd + (["--fast"] if fast else []), check=True, capture_output=True)
            check_checkpoint(ckpt, std, failures, label)
            gguf = os.path.join(work, label + ".gguf")
            subprocess.run([a.convert, ckpt, "-o", gguf, "--type", "f16"], check=True, capture_output=True)
            logits = os.path.join(work, label + ".f32")
            subprocess.run([a.run, "-m", gguf, "--tokens", "1,5,9,200", "-n", "2", "--ignore-eos", "--logits-out",
                            logits, "-t", "2"], check=True, capture_output=True)
            values = np.fromfile(logits, dtype=np.float32)
            if values.size == 0 or not np.isfinite(values).all() or values.std() == 0:
                failures.append(f"{label}: ggml-fa-run gave {values.size} logits, finite and varied: "
                                f"{bool(values.size) and bool(np.isfinite(values).all())}")
            else:
                print(f"{label}: converted and run, {values.size} finite logits")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
