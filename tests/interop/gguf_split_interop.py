#!/usr/bin/env python3
"""A model split into shards by the reference `gguf` package (GGUFWriter with
split_max_tensors, the layout llama.cpp's gguf-split writes: PREFIX-0000i-of-0000N.gguf with
split.no / split.count / split.tensors.count) loads here from its first shard, with the logits
and greedy tokens of the unsplit file, bit for bit, in f16 and q8_0.

usage: gguf_split_interop.py CONVERT RUN WORKDIR      (needs: pip install gguf numpy)
"""
import os
import random
import subprocess
import sys

try:
    import gguf
    import numpy as np
except ImportError as e:
    sys.exit(f"gguf_split_interop: {e}: pip install gguf numpy")

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def split_with_gguf(src, dst_prefix, max_tensors):
    """Rewrites src as shards of at most max_tensors tensors; returns the first shard's path."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst_prefix + ".gguf", r.fields["general.architecture"].contents(),
                        split_max_tensors=max_tensors)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:  # quantized tensors come as rows of bytes, which add_tensor takes as they are
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shards = sorted(p for p in os.listdir(os.path.dirname(dst_prefix)) if
                    p.startswith(os.path.basename(dst_prefix) + "-") and p.endswith(".gguf"))
    return os.path.join(os.path.dirname(dst_prefix), shards[0]), len(shards)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    convert, run_tool, work = sys.argv[1:]
    os.makedirs(work, exist_ok=True)
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    ckpt = os.path.join(work, "ckpt")
    run([sys.executable, os.path.join(TOOLS, "make_random_llama.py"), ckpt, "--seed", str(seed % 1000),
         "--std", "0.1", "--vocab", "300", "--layers", "2", "--hidden", "128", "--ffn", "256", "--heads", "4",
         "--kv-heads", "2"])
    tokens = ",".join(str(rng.randrange(300)) for _ in range(11))
    failures = []
    for gtype in ("f16", "q8_0"):
        whole = os.path.join(work, f"whole-{gtype}.gguf")
        run([convert, ckpt, "-o", whole, "--type", gtype])
        prefix = os.path.join(work, f"split-{gtype}")
        for p in os.listdir(work):
            if p.startswith(f"split-{gtype}-"):
                os.remove(os.path.join(work, p))
        first, n_shards = split_with_gguf(whole, prefix, 7)
        outs = []
        for path, name in ((whole, "whole"), (first, "split")):
            logits = os.path.join(work, f"{name}-{gtype}.f32")
            generated = run([run_tool, "-m", path, "--tokens", tokens, "-n", "4", "--kv-type", "f32",
                             "--logits-out", logits, "--ignore-eos", "-t", "2"]).strip()
            outs.append((np.fromfile(logits, dtype=np.float32), generated))
        same = outs[0][0].tobytes() == outs[1][0].tobytes() and outs[0][1] == outs[1][1]
        print(f"gguf_split_interop: {gtype} in {n_shards} shards: logits and tokens "
              f"{'identical' if same else 'DIFFER'}")
        if n_shards < 3 or not same:
            failures.append(gtype)
    if failures:
        print(f"gguf_split_interop: FAILED for {failures} (seed {seed})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
