#!/usr/bin/env python3
"""Prompt and generation speed of a ~1B-parameter Llama-shaped model with random weights,
ggml-fa-run beside Hugging Face transformers on the same GPU in the same run.

  bench_model.py --build BUILD_DIR [--types f16,q8_0,q4_0] [--prompt 512] [--gen 128]
                 [--graphs on|off|both] [--early on|off|both] [--profile] [--no-peer]
                 [--keep-gguf DIR] [--run-args "..."] [--sweep NAME=V1,V2,... [--rounds N]]
                 [--layers N] [--hidden N] [--heads N] [--kv-heads N] [--ffn N]
                 [--experts N --experts-used K] [--llama-bench PATH]

Needs torch and transformers (GPU machines). Prints one row per engine and weight type.
--graphs (default on) picks CUDA graphs on, off (GFA_CUDA_GRAPHS=0) or both in turn; --early
likewise for early kernel launches (GFA_CUDA_EARLY_LAUNCH); --profile
passes --profile and prints where each decoded token's time went; --no-peer skips the
transformers timing; --keep-gguf keeps the converted model files in DIR. --sweep runs
ggml-fa once per value of the environment variable NAME, the values in turn, --rounds times
over (an A/B comparison inside one run). --experts makes the model a Mixtral-style mixture
(N experts of --ffn each per block, K per token; transformers' MixtralForCausalLM).
--hidden/--heads/--kv-heads/--layers/--ffn change the shape (e.g. 8 layers of Llama-3-8B's:
--hidden 4096 --kv-heads 8 --ffn 14336 --layers 8). --llama-bench also times llama.cpp's
llama-bench (a CUDA build) on each file, every layer on the GPU with flash attention, its
generation at the depth of the prompt (-d) as ours follows the prompt.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--graphs", choices=["on", "off", "both"], default="on")
    ap.add_argument("--early", choices=["on", "off", "both"], default="on")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--keep-gguf", default="")
    ap.add_argument("--run-args", default="", help="extra arguments for ggml-fa-run")
    ap.add_argument("--sweep", default="", help="NAME=V1,V2,...: one run per value of NAME")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the --sweep values")
    ap.add_argument("--llama-bench", default="",
                    help="llama.cpp's llama-bench built with CUDA: timed on the same files (-ngl 99 -fa on)")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=5632, help="FFN width (of each expert with --experts)")
    ap.add_argument("--experts", type=int, default=0, help="a mixture of this many experts per block")
    ap.add_argument("--experts-used", type=int, default=2)
    args = ap.parse_args()
    # TinyLlama-1.1B's shape by default: 22 layers, hidden 2048, FFN 5632, 32 query / 4 KV heads.
    shape = dict(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    torch.manual_seed(0)
    if args.experts:
        cfg = transformers.MixtralConfig(num_local_experts=args.experts, num_experts_per_tok=args.experts_used,
                                         sliding_window=None, **shape)
        model = transformers.MixtralForCausalLM(cfg).to(torch.float16)
    else:
        cfg = transformers.LlamaConfig(**shape)
        model = transformers.LlamaForCausalLM(cfg).to(torch.float16)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e9:.2f} B parameters; device {torch.cuda.get_device_name()}", flush=True)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        model.save_pretrained(ckpt, safe_serialization=True)
        gguf_dir = args.keep_gguf or tmp
        os.makedirs(gguf_dir, exist_ok=True)
        if not args.no_peer:
            rows.append(time_transformers(model, prompt, args))
        del model
        torch.cuda.empty_cache()

        convert = os.path.join(args.build, "convert")
        quantize = os.path.join(args.build, "quantize")
        run = os.path.join(args.build, "ggml-fa-run")
        f16 = os.path.join(gguf_dir, "model-f16.gguf")
        subprocess.run([convert, ckpt, "-o", f16, "--type", "f16"], check=True, capture_output=True)
        tokens = ",".join(str(int(t)) for t in prompt[0])
        choice = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}
        sweep_name, sweep_values = "", [None]
        if args.sweep:
            sweep_name, _, values = args.sweep.partition("=")
            sweep_values = values.split(",") * max(1, args.rounds)
        settings = [(g, e, v) for v in sweep_values for g in choice[args.graphs] for e in choice[args.early]]
        for gtype in args.types.split(","):
            path = f16
            if gtype == "q8_0":
                path = os.path.join(gguf_dir, "model-q8_0.gguf")
                subprocess.run([convert, ckpt, "-o", path, "--type", "q8_0"], check=True, capture_output=True)
            elif gtype != "f16":
                path = os.path.join(gguf_dir, f"model-{gtype}.gguf")
                subprocess.run([quantize, f16, path, gtype], check=True, capture_output=True)
            cmd = [run, "-m", path, "--tokens", tokens, "-n", str(args.gen), "--ignore-eos", "--backend",
                   args.backend, "-c", str(args.prompt + args.gen + 16), "-b", str(args.prompt), "--warmup"]
            if args.profile:
                cmd.append("--profile")
            cmd += args.run_args.split()
            weight_bytes = bytes_read_per_token(path)
            if args.llama_bench:
                rows.append(time_llama_bench(args, path, gtype))
            for graphs, early, value in settings:
                env = dict(os.environ, GFA_CUDA_GRAPHS="1" if graphs == "on" else "0",
                           GFA_CUDA_EARLY_LAUNCH="1" if early == "on" else "0")
                if value is not None:
                    env[sweep_name] = value
                r = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                pp = float(re.search(r"prompt: .*\(([\d.]+) tokens/s\)", r.stderr).group(1))
                tg = float(re.search(r"generation: .*\(([\d.]+) tokens/s\)", r.stderr).group(1))
                label = f"{gtype} graphs {graphs}" + (f" early {early}" if args.early == "both" else "")
                if value is not None:
                    label += f" {sweep_name.removeprefix('GFA_CUDA_')}={value}"
                rows.append(("ggml-fa", label, pp, tg))
                print(f"ggml-fa {label}: prompt {pp:.0f} tok/s, generation {tg:.1f} tok/s "
                      f"({weight_bytes / 1e9:.3f} GB of weights read per token: {weight_bytes * tg / 1e9:.0f} GB/s)",
                      flush=True)
                if args.profile:
                    start = r.stderr.find("profile:")
                    print(r.stderr[start:] if start >= 0 else r.stderr, flush=True)
    base_pp, base_tg = rows[0][2], rows[0][3]
    print(f"\n{'engine':14s} {'weights':40s} {'prompt tok/s':>13s} {'gen tok/s':>10s} {'vs first row':>18s}")
    for eng, t, pp, tg in rows:
        print(f"{eng:14s} {t:40s} {pp:13.0f} {tg:10.1f}   ({pp / base_pp:.2f}x, {tg / base_tg:.2f}x)")
    return 0


def bytes_read_per_token(path):
    """The bytes of every tensor a decoded token reads whole: all but the token embeddings (one
    row each). With the gguf package; the file's size where it is missing."""
    try:
        import gguf
    except ImportError:
        return os.path.getsize(path)
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")


def time_llama_bench(args, path, gtype):
    """llama.cpp's llama-bench on the same GGUF file, every layer on the GPU, flash attention on:
    the prompt from an empty context, the generation after the prompt's depth (-d), as ggml-fa's
    generation follows its prompt."""
    common = [args.llama_bench, "-m", path, "-ngl", "99", "-fa", "on", "-r", "3", "-o", "json"]
    tests = []
    for shape in (["-p", str(args.prompt), "-n", "0"], ["-p", "0", "-n", str(args.gen), "-d", str(args.prompt)]):
        r = subprocess.run(common + shape, check=True, capture_output=True, text=True)
        tests += json.loads(r.stdout)
    pp = tg = float("nan")
    for test in tests:
        if test["n_prompt"] > 0 and test["n_gen"] == 0:
            pp = float(test["avg_ts"])
        elif test["n_gen"] > 0 and test["n_prompt"] == 0:
            tg = float(test["avg_ts"])
    print(f"llama.cpp {gtype}: prompt {pp:.0f} tok/s, generation {tg:.1f} tok/s", flush=True)
    return ("llama.cpp", gtype, pp, tg)


def time_transformers(model, prompt, args):
    """transformers, f16, default attention (SDPA), KV cache on."""
    m = model.cuda().eval()
    ids = prompt.cuda()
    with torch.no_grad():
        for _ in range(2):
            m(ids)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m(ids)
        torch.cuda.synchronize()
        t_prompt = time.perf_counter() - t0
        m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=args.gen, min_new_tokens=args.gen, do_sample=False)
        torch.cuda.synchronize()
        t_total = time.perf_counter() - t0
    t_gen = max(t_total - t_prompt, 1e-9)
    return ("transformers", "f16", args.prompt / t_prompt, (args.gen - 1) / t_gen)


if __name__ == "__main__":
    sys.exit(main())
