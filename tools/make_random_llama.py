#!/usr/bin/env python3
"""A Llama-shaped checkpoint with random weights, in the Hugging Face layout (config.json +
model.safetensors, f16), made with numpy alone: for speed benchmarks that need a model of a
given shape but not a trained one, on machines without torch.

  make_random_llama.py OUT_DIR [--layers 22] [--hidden 2048] [--ffn 5632] [--heads 32]
                       [--kv-heads 4] [--vocab 32000] [--ctx 2048] [--seed 0] [--std 0.02]
                       [--experts N --experts-used K [--shared-expert W]] [--fast]

With --experts the checkpoint is Mixtral's (model_type mixtral): each block has a router and
N experts of --ffn each, K of them per token. --shared-expert makes it Qwen2-MoE's (model_type
qwen2_moe): q/k/v biases, and beside the experts a shared expert of width W whose output a
per-token sigmoid gate scales.

The defaults are TinyLlama-1.1B's shape (untied embeddings). Weights are drawn like
transformers' Llama initialisation (normal, std 0.02; RMSNorm weights 1), so activations
stay finite through every layer; a larger --std makes attention far from uniform, which
numerical comparisons need to notice rotary or head-layout mistakes. There is no tokenizer:
prompts are given as token ids.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np


def tensor_shapes(a):
    """(HF name, shape) in the order transformers saves them."""
    head_dim = a.hidden // a.heads
    shapes = [("model.embed_tokens.weight", (a.vocab, a.hidden))]
    for layer in range(a.layers):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "self_attn.q_proj.weight", (a.heads * head_dim, a.hidden)),
            (p + "self_attn.k_proj.weight", (a.kv_heads * head_dim, a.hidden)),
            (p + "self_attn.v_proj.weight", (a.kv_heads * head_dim, a.hidden)),
            (p + "self_attn.o_proj.weight", (a.hidden, a.heads * head_dim)),
        ]
        if a.shared_expert:  # Qwen2-MoE
            shapes += [
                (p + "self_attn.q_proj.bias", (a.heads * head_dim,)),
                (p + "self_attn.k_proj.bias", (a.kv_heads * head_dim,)),
                (p + "self_attn.v_proj.bias", (a.kv_heads * head_dim,)),
                (p + "mlp.gate.weight", (a.experts, a.hidden)),
            ]
            for e in range(a.experts):
                q = p + f"mlp.experts.{e}."
                shapes += [(q + "gate_proj.weight", (a.ffn, a.hidden)), (q + "up_proj.weight", (a.ffn, a.hidden)),
                           (q + "down_proj.weight", (a.hidden, a.ffn))]
            q = p + "mlp.shared_expert."
            shapes += [(q + "gate_proj.weight", (a.shared_expert, a.hidden)),
                       (q + "up_proj.weight", (a.shared_expert, a.hidden)),
                       (q + "down_proj.weight", (a.hidden, a.shared_expert)),
                       (p + "mlp.shared_expert_gate.weight", (1, a.hidden))]
        elif a.experts:
            shapes.append((p + "block_sparse_moe.gate.weight", (a.experts, a.hidden)))
            for e in range(a.experts):
                q = p + f"block_sparse_moe.experts.{e}."
                shapes += [(q + "w1.weight", (a.ffn, a.hidden)), (q + "w2.weight", (a.hidden, a.ffn)),
                           (q + "w3.weight", (a.ffn, a.hidden))]
        else:
            shapes += [
                (p + "mlp.gate_proj.weight", (a.ffn, a.hidden)),
                (p + "mlp.up_proj.weight", (a.ffn, a.hidden)),
                (p + "mlp.down_proj.weight", (a.hidden, a.ffn)),
            ]
        shapes += [
            (p + "input_layernorm.weight", (a.hidden,)),
            (p + "post_attention_layernorm.weight", (a.hidden,)),
        ]
    shapes += [("model.norm.weight", (a.hidden,)), ("lm_head.weight", (a.vocab, a.hidden))]
    return shapes


def pooled_values(pool, shape, rng):
    """A matrix cut from the pool at a random offset, wrapping around (--fast)."""
    n = int(np.prod(shape))
    start = int(rng.integers(len(pool)))
    reps = (start + n + len(pool) - 1) // len(pool)
    flat = np.tile(pool, reps)[start:start + n] if reps > 1 else pool[start:start + n]
    return flat.reshape(shape)


def write_safetensors(path, shapes, rng, std, fast=False):
    """safetensors: u64 little-endian header length, JSON header (padded with spaces to a
    multiple of 8 so the data starts aligned), then the raw little-endian tensor data."""
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * np.float32(std)).astype("<f2") if fast else None
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path + ".part", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes:
            if name.endswith(".bias"):
                values = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype("<f2")
            elif len(shape) == 1:  # RMSNorm weights start at 1
                values = np.ones(shape, dtype="<f2")
            elif fast:
                values = pooled_values(pool, shape, rng)
            else:
                # Row blocks keep the f32 scratch small for the large matrices.
                values = np.empty(shape, dtype="<f2")
                step = max(1, (1 << 22) // shape[1])
                for r in range(0, shape[0], step):
                    block = rng.standard_normal((min(step, shape[0] - r), shape[1]), dtype=np.float32)
                    values[r:r + step] = block * np.float32(std)
            f.write(values.tobytes())
    os.replace(path + ".part", path)
    return offset


def add_shape_arguments(ap):
    """The model shape's options (TinyLlama-1.1B's by default) and --seed; make_random_gguf.py
    takes the same."""
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    add_shape_arguments(ap)
    ap.add_argument("--std", type=float, default=0.02, help="standard deviation of the matrices")
    ap.add_argument("--fast", action="store_true",
                    help="cut every matrix from one pool of 16M random values at a random offset: an 8B-sized "
                    "checkpoint is written at disk speed instead of minutes of drawing (for speed benchmarks; "
                    "the values repeat across matrices)")
    ap.add_argument("--experts", type=int, default=0, help="a mixture of this many experts per block (Mixtral)")
    ap.add_argument("--experts-used", type=int, default=2, help="experts per token")
    ap.add_argument("--shared-expert", type=int, default=0, help="with --experts: Qwen2-MoE with a shared expert this wide")
    a = ap.parse_args()
    if a.shared_expert and not a.experts:
        ap.error("--shared-expert needs --experts")
    if a.shared_expert < 0:
        ap.error("--shared-expert must be positive")
    if a.experts and not 0 < a.experts_used <= a.experts:
        ap.error(f"--experts-used must be in [1, {a.experts}]")
    for name in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "ctx"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if not a.std > 0:
        ap.error("--std must be positive")
    if a.hidden % a.heads or (a.hidden // a.heads) % 2:
        ap.error(f"--hidden {a.hidden} must split into {a.heads} heads of an even size")
    if a.heads % a.kv_heads:
        ap.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")

    os.makedirs(a.out_dir, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": a.vocab,
        "hidden_size": a.hidden,
        "intermediate_size": a.ffn,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "max_position_embeddings": a.ctx,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if a.shared_expert:
        config.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=a.experts,
                      num_experts_per_tok=a.experts_used, moe_intermediate_size=a.ffn,
                      shared_expert_intermediate_size=a.shared_expert, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[], use_sliding_window=False)
    elif a.experts:
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=a.experts,
                      num_experts_per_tok=a.experts_used)
    with open(os.path.join(a.out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shapes = tensor_shapes(a)
    nbytes = write_safetensors(os.path.join(a.out_dir, "model.safetensors"), shapes, np.random.default_rng(a.seed), a.std,
                               a.fast)
    n_params = sum(int(np.prod(s)) for _, s in shapes)
    print(f"{a.out_dir}: {n_params / 1e9:.3f} B parameters, {nbytes / 2**20:.1f} MiB of f16 weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
