#!/usr/bin/env python3
"""A Llama-shaped GGUF file whose quantized weights are random blocks, written directly: for
speed benchmarks of a large shape (an 8B model is 4.9 GB in q4_K_M) where making a float
checkpoint, converting and quantizing it would take minutes.

  make_random_gguf.py OUT.gguf [--type q4_K_M] [--layers 22] [--hidden 2048] [--ffn 5632]
                      [--heads 32] [--kv-heads 4] [--vocab 32000] [--ctx 2048] [--seed 0]

--type is one block type for every matrix (q4_K, q5_K, q6_K, q8_0) or one of the mixes q4_K_M
and q5_K_M, whose per-tensor types follow tools/quantize (q6_K for the output matrix, and for
attn_v and ffn_down in the first and last eighth of the layers and every third layer between).
The metadata is what tools/convert writes for a Llama checkpoint without a tokenizer (prompts
are given as token ids). Each block's codes are random bytes and its f16 scales small random
values, sized so that the weights are a few hundredths, like a freshly initialised model's:
activations stay finite, but the outputs mean nothing. Only the bytes' layout is the model's,
which is all that reading speed depends on.
"""
import argparse
import struct

import numpy as np

from make_random_llama import add_shape_arguments  # the same shape options and defaults

GGUF_ALIGNMENT = 32
F32, F16, Q8_0, Q4_K, Q5_K, Q6_K = 0, 1, 8, 12, 13, 14  # ggml type ids

# Per block type: (values per block, bytes per block, [(byte offset of an f16 scale, scale size)])
# Scale sizes give weights of about 0.02-0.04 at most: q4_K/q5_K w = d * sc * q - dmin * m with
# 6-bit sc, m and q < 16 (32); q6_K w = d * sc * (q - 32) with int8 sc; q8_0 w = d * q.
BLOCKS = {
    Q8_0: (32, 34, [(0, 2.0e-4)]),
    Q4_K: (256, 144, [(0, 3.0e-5), (2, 1.0e-4)]),
    Q5_K: (256, 176, [(0, 1.5e-5), (2, 1.0e-4)]),
    Q6_K: (256, 210, [(208, 1.0e-5)]),
}
TYPE_NAMES = {"q8_0": Q8_0, "q4_K": Q4_K, "q5_K": Q5_K, "q6_K": Q6_K}
MIXES = {"q4_K_M": (Q4_K, 15), "q5_K_M": (Q5_K, 17)}  # base type, general.file_type
FILE_TYPES = {Q8_0: 7, Q4_K: 14, Q5_K: 16, Q6_K: 18}  # llama.cpp's numbers (mostly this type)


def matrix_type(name, layer, n_layers, type_name):
    """The block type of a matrix, as tools/quantize picks it."""
    if type_name not in MIXES:
        return TYPE_NAMES[type_name]
    if name == "output.weight":
        return Q6_K
    more_bits = layer >= 0 and (layer < n_layers // 8 or layer >= 7 * n_layers // 8 or
                                (layer - n_layers // 8) % 3 == 2)
    if more_bits and (name.endswith("attn_v.weight") or "ffn_down" in name):
        return Q6_K
    return MIXES[type_name][0]


def tensors(a):
    """(name, [ne0, ne1] or [ne0], layer) in the order tools/convert writes them."""
    head_dim = a.hidden // a.heads
    out = [("token_embd.weight", [a.hidden, a.vocab], -1)]
    for l in range(a.layers):
        p = f"blk.{l}."
        out += [(p + "attn_norm.weight", [a.hidden], l),
                (p + "attn_q.weight", [a.hidden, a.heads * head_dim], l),
                (p + "attn_k.weight", [a.hidden, a.kv_heads * head_dim], l),
                (p + "attn_v.weight", [a.hidden, a.kv_heads * head_dim], l),
                (p + "attn_output.weight", [a.heads * head_dim, a.hidden], l),
                (p + "ffn_norm.weight", [a.hidden], l),
                (p + "ffn_gate.weight", [a.hidden, a.ffn], l),
                (p + "ffn_up.weight", [a.hidden, a.ffn], l),
                (p + "ffn_down.weight", [a.ffn, a.hidden], l)]
    out += [("output_norm.weight", [a.hidden], -1), ("output.weight", [a.hidden, a.vocab], -1)]
    return out


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def metadata(a, file_type):
    u32, f32, string = 4, 6, 8
    head_dim = a.hidden // a.heads
    entries = [("general.architecture", string, "llama"), ("general.name", string, "random"),
               ("general.file_type", u32, file_type), ("llama.vocab_size", u32, a.vocab),
               ("llama.context_length", u32, a.ctx), ("llama.embedding_length", u32, a.hidden),
               ("llama.block_count", u32, a.layers), ("llama.feed_forward_length", u32, a.ffn),
               ("llama.attention.head_count", u32, a.heads), ("llama.attention.head_count_kv", u32, a.kv_heads),
               ("llama.attention.key_length", u32, head_dim), ("llama.attention.value_length", u32, head_dim),
               ("llama.attention.layer_norm_rms_epsilon", f32, 1e-5), ("llama.rope.freq_base", f32, 10000.0),
               ("llama.rope.dimension_count", u32, head_dim), ("tokenizer.ggml.bos_token_id", u32, 1),
               ("tokenizer.ggml.eos_token_id", u32, 2), ("tokenizer.ggml.model", string, "no_vocab")]
    out = b""
    for key, kind, value in entries:
        out += gguf_string(key) + struct.pack("<I", kind)
        out += gguf_string(value) if kind == string else struct.pack("<I" if kind == u32 else "<f", value)
    return out, len(entries)


def random_blocks(rng, kind, n_blocks):
    """n_blocks random blocks of a block type, as bytes: random codes, small positive scales."""
    _, size, scales = BLOCKS[kind]
    words = rng.integers(0, 2**63, size=(n_blocks * size + 7) // 8, dtype=np.uint64)
    blocks = words.view(np.uint8)[:n_blocks * size].reshape(n_blocks, size)
    for offset, magnitude in scales:
        d = (magnitude * rng.uniform(0.5, 1.5, size=n_blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--type", default="q4_K_M", choices=sorted(list(TYPE_NAMES) + list(MIXES)))
    add_shape_arguments(ap)
    a = ap.parse_args()
    if a.hidden % a.heads or a.heads % a.kv_heads:
        ap.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")

    plan = []  # (name, dims, ggml type, bytes)
    for name, dims, layer in tensors(a):
        if len(dims) == 1:
            plan.append((name, dims, F32, 4 * dims[0]))
            continue
        kind = matrix_type(name, layer, a.layers, a.type)
        per_block, size, _ = BLOCKS[kind]
        if dims[0] % per_block:
            ap.error(f"{name}: rows of {dims[0]} values are not whole {per_block}-value blocks")
        plan.append((name, dims, kind, dims[0] // per_block * dims[1] * size))

    file_type = MIXES[a.type][1] if a.type in MIXES else FILE_TYPES[TYPE_NAMES[a.type]]
    kv, n_kv = metadata(a, file_type)
    header = b"GGUF" + struct.pack("<IQQ", 3, len(plan), n_kv) + kv
    offset = 0
    for name, dims, kind, nbytes in plan:
        header += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        header += struct.pack("<IQ", kind, offset)
        offset += (nbytes + GGUF_ALIGNMENT - 1) // GGUF_ALIGNMENT * GGUF_ALIGNMENT

    rng = np.random.default_rng(a.seed)
    with open(a.out, "wb") as f:
        f.write(header + b"\0" * (-len(header) % GGUF_ALIGNMENT))
        for name, dims, kind, nbytes in plan:
            if kind == F32:  # the norms' weights: 1, as a model starts
                f.write(np.ones(dims[0], dtype=np.float32).tobytes())
            else:
                n_blocks = nbytes // BLOCKS[kind][1]
                step = max(1, (64 << 20) // BLOCKS[kind][1])  # 64 MB at a time
                for first in range(0, n_blocks, step):
                    f.write(random_blocks(rng, kind, min(step, n_blocks - first)))
            f.write(b"\0" * (-nbytes % GGUF_ALIGNMENT))
    total = sum(p[3] for p in plan)
    print(f"{a.out}: {len(plan)} tensors, {a.type}, {total / 1e9:.2f} GB of weights")


if __name__ == "__main__":
    main()
