#!/usr/bin/env python3
"""The train program end to end: a byte-level model trained on a generated text must learn it,
and the GGUF file it writes must be read alike by the reference `gguf` package, by a float64
numpy forward pass written here from the llama definition, and by ggml-fa-run.

usage: test_train.py --train TRAIN --run GGML_FA_RUN --perplexity PERPLEXITY [--backend cpu|vulkan] [--seed S]

1. `train` runs on a text of sentences drawn from a small grammar (random each run); the
   held-out loss must fall from about ln 256 (uniform bytes) to below 1 nat per byte.
2. The file: architecture llama, the hyperparameters given, the byte-level vocabulary, every
   tensor with its llama.cpp name and shape (gguf package).
3. numpy's float64 forward pass on the file's weights against `ggml-fa-run --logits-out`
   (f32 cache) on a held-out window: relative error below 1e-4.
4. `ggml-fa-run -p` generates text from a prompt with the file's tokenizer.
5. `perplexity` on held-out text (two chunks) against the same measure from numpy's forward
   pass: relative difference below 1e-4.
6. A run stopped at a checkpoint (--checkpoint) and resumed from it (--init) writes the same
   file, byte for byte, as the run that went straight through.

Exit code 77 means skipped (numpy or gguf missing, or no device for --backend).
"""
import argparse
import os
import random
import re
import subprocess
import sys
import tempfile

try:
    import numpy as np
    from gguf import GGUFReader
except ImportError:
    print("test_train: numpy and gguf are needed (pip install numpy gguf); skipped")
    sys.exit(77)

SHAPE = dict(layers=2, embd=64, heads=4, kv_heads=2, ctx=48, ff=96)


def grammar_text(rng, n_bytes):
    """Sentences from a tiny grammar: learnable structure with some randomness."""
    subjects = ["the cat", "a dog", "my friend", "the old man", "our teacher", "a small bird"]
    verbs = ["sees", "likes", "follows", "finds", "watches"]
    objects = ["the ball", "a red box", "the river", "some bread", "the green door"]
    out = []
    size = 0
    while size < n_bytes:
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\n"
        out.append(s)
        size += len(s)
    return "".join(out)


def rms_norm(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w


def forward(t, tokens, heads, kv_heads):
    """The llama forward pass in float64 from GGUF tensors (rope on pairs 2i, 2i + 1)."""
    T = len(tokens)
    E = t["token_embd.weight"].shape[1]
    D = t["blk.0.attn_q.weight"].shape[0] // heads
    inv = 10000.0 ** (-np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # [T, H, D]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos[:, None, :] - x1 * sin[:, None, :]
        out[..., 1::2] = x0 * sin[:, None, :] + x1 * cos[:, None, :]
        return out

    x = t["token_embd.weight"][tokens]  # [T, E]
    n_layers = len([k for k in t if k.endswith("attn_norm.weight")])
    for layer in range(n_layers):
        p = f"blk.{layer}."
        h = rms_norm(x, t[p + "attn_norm.weight"])
        q = rope((h @ t[p + "attn_q.weight"].T).reshape(T, heads, D))
        k = rope((h @ t[p + "attn_k.weight"].T).reshape(T, kv_heads, D))
        v = (h @ t[p + "attn_v.weight"].T).reshape(T, kv_heads, D)
        o = np.empty((T, heads, D))
        for hq in range(heads):
            hk = hq // (heads // kv_heads)
            s = q[:, hq, :] @ k[:, hk, :].T / np.sqrt(D)
            s[np.triu_indices(T, 1)] = -np.inf
            s = np.exp(s - s.max(-1, keepdims=True))
            o[:, hq, :] = (s / s.sum(-1, keepdims=True)) @ v[:, hk, :]
        x = x + o.reshape(T, heads * D) @ t[p + "attn_output.weight"].T
        h = rms_norm(x, t[p + "ffn_norm.weight"])
        g = h @ t[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
    return rms_norm(x, t["output_norm.weight"]) @ t["output.weight"].T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--perplexity", required=True)
    ap.add_argument("--generate", default=None, help="examples/generate, checked against ggml-fa-run's greedy text")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    a = ap.parse_args()
    print(f"seed {a.seed}")
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="gfa-train-test-")
    data = os.path.join(work, "text.txt")
    with open(data, "w") as f:
        f.write(grammar_text(rng, 60000))
    model = os.path.join(work, "model.gguf")

    # 1. training
    cmd = [a.train, "--data", data, "-o", model, "--layers", str(SHAPE["layers"]), "--embd", str(SHAPE["embd"]),
           "--heads", str(SHAPE["heads"]), "--kv-heads", str(SHAPE["kv_heads"]), "--ff", str(SHAPE["ff"]),
           "--ctx", str(SHAPE["ctx"]), "--batch", "8", "--steps", "150", "--warmup", "10", "--lr", "3e-3",
           "--eval-every", "50", "--seed", str(a.seed), "--backend", a.backend, "-t", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout + r.stderr)
    if r.returncode != 0 and "no Vulkan0 device" in r.stderr:
        return 77
    if r.returncode != 0:
        print(f"FAIL: train exited with {r.returncode}")
        return 1
    losses = [float(x) for x in re.findall(r"held-out(?: loss)? ([\d.]+)", r.stdout)]
    first, last = losses[0], losses[-1]
    # Uniform bytes: ln 256 = 5.55. The grammar leaves about 0.15 nats per byte of choice;
    # a model that learned its words and sentence frame ends near 0.3-0.5 (seen over seeds).
    if not (abs(first - np.log(256)) < 0.2 and last < 1.0):
        print(f"FAIL: held-out loss {first:.3f} -> {last:.3f}; expected ~5.55 -> < 1.0")
        return 1

    # 2. the file, read by the reference package
    reader = GGUFReader(model)
    fields = {name: f for name, f in reader.fields.items()}

    def scalar(key):
        f = fields[key]
        return f.parts[f.data[0]].tolist()[0]

    def string(key):
        f = fields[key]
        return bytes(f.parts[f.data[0]]).decode()

    expect = {"llama.block_count": SHAPE["layers"], "llama.embedding_length": SHAPE["embd"],
              "llama.attention.head_count": SHAPE["heads"], "llama.attention.head_count_kv": SHAPE["kv_heads"],
              "llama.feed_forward_length": SHAPE["ff"], "llama.context_length": SHAPE["ctx"]}
    for key, value in expect.items():
        if scalar(key) != value:
            print(f"FAIL: {key} = {scalar(key)}, expected {value}")
            return 1
    if string("general.architecture") != "llama" or string("tokenizer.ggml.model") != "gpt2":
        print("FAIL: architecture or tokenizer model")
        return 1
    if len(fields["tokenizer.ggml.tokens"].data) != 256:
        print("FAIL: the vocabulary does not have 256 tokens")
        return 1
    tensors = {t.name: np.array(t.data, dtype=np.float64).reshape(list(reversed(t.shape.tolist())))
               for t in reader.tensors}
    D = SHAPE["embd"] // SHAPE["heads"]
    shapes = {"token_embd.weight": (256, SHAPE["embd"]), "output.weight": (256, SHAPE["embd"]),
              "blk.1.attn_k.weight": (SHAPE["kv_heads"] * D, SHAPE["embd"]),
              "blk.0.ffn_down.weight": (SHAPE["embd"], SHAPE["ff"])}
    for name, shape in shapes.items():
        if tensors[name].shape != shape:
            print(f"FAIL: {name} has shape {tensors[name].shape}, expected {shape}")
            return 1
    if len(tensors) != 3 + 9 * SHAPE["layers"]:
        print(f"FAIL: {len(tensors)} tensors")
        return 1

    # 3. numpy's forward pass against ggml-fa-run on the same file
    text = open(data, "rb").read()
    tokens = list(text[-SHAPE["ctx"]:])
    logits_path = os.path.join(work, "logits.f32")
    run_args = ["--backend", a.backend] if a.backend != "cpu" else []
    r = subprocess.run([a.run, "-m", model, "--tokens", ",".join(map(str, tokens)), "-n", "0", "--kv-type", "f32",
                        "-t", "2", "--logits-out", logits_path, *run_args], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout + r.stderr)
        print("FAIL: ggml-fa-run --logits-out")
        return 1
    ours = np.fromfile(logits_path, dtype=np.float32).reshape(len(tokens), 256)
    want = forward(tensors, np.array(tokens), SHAPE["heads"], SHAPE["kv_heads"])
    err = np.linalg.norm(ours - want) / np.linalg.norm(want)
    print(f"logits of ggml-fa-run against the numpy forward pass: relative error {err:.2e}")
    if not err < 1e-4:
        print("FAIL: logits differ")
        return 1

    # 4. text generation with the file's tokenizer
    r = subprocess.run([a.run, "-m", model, "-p", "the cat ", "-n", "30", "-t", "2", *run_args], capture_output=True,
                       text=True)
    print(r.stdout)
    if r.returncode != 0 or "the cat " not in r.stdout:
        print(r.stderr)
        print("FAIL: ggml-fa-run -p")
        return 1
    # 4b. the library's smallest generation program: the same greedy text as ggml-fa-run
    if a.generate and a.backend == "cpu":
        g = subprocess.run([a.generate, model, "the cat ", "30"], capture_output=True, text=True)
        if g.returncode != 0 or g.stdout != r.stdout:
            print(g.stdout + g.stderr)
            print("FAIL: examples/generate's greedy text differs from ggml-fa-run's")
            return 1
        print("examples/generate: the same greedy text as ggml-fa-run")
    # 5. perplexity: llama-perplexity's measure (second half of each chunk scored)
    n_ctx = SHAPE["ctx"]
    held_out = os.path.join(work, "held_out.txt")
    with open(held_out, "wb") as f:
        f.write(text[-2 * n_ctx:])
    r = subprocess.run([a.perplexity, "-m", model, "-f", held_out, "-c", str(n_ctx), "--kv-type", "f32", "-t", "2",
                        *run_args], capture_output=True, text=True)
    m = re.search(r"PPL = ([\d.]+)", r.stdout)
    if r.returncode != 0 or not m:
        print(r.stdout + r.stderr)
        print("FAIL: perplexity")
        return 1
    nll = []
    chunk_tokens = list(text[-2 * n_ctx:])
    for c in range(2):
        chunk = np.array(chunk_tokens[c * n_ctx:(c + 1) * n_ctx])
        logits = forward(tensors, chunk, SHAPE["heads"], SHAPE["kv_heads"])
        for j in range(n_ctx // 2, n_ctx - 1):
            row = logits[j] - logits[j].max()
            nll.append(np.log(np.exp(row).sum()) - row[chunk[j + 1]])
    want_ppl = float(np.exp(np.mean(nll)))
    got_ppl = float(m.group(1))
    print(f"perplexity {got_ppl}, numpy {want_ppl:.4f}")
    if not abs(got_ppl - want_ppl) <= 1e-4 * want_ppl + 5e-5:  # the tool prints 4 decimals
        print("FAIL: perplexity differs")
        return 1

    # 6. a checkpoint resumes the run exactly
    def short_run(steps, *extra):
        r = subprocess.run([a.train, "--data", data, "--layers", "1", "--embd", "32", "--heads", "2", "--ctx", "24",
                            "--steps", str(steps), "--eval-every", "5", "--seed", str(a.seed), "-t", "2", *extra],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout + r.stderr)
            sys.exit("FAIL: a short run of train")
        return r.stdout

    straight, resumed, ckpt = (os.path.join(work, n) for n in ("straight.gguf", "resumed.gguf", "ckpt.gguf"))
    short_run(10, "-o", straight)
    short_run(5, "--checkpoint", ckpt)
    out = short_run(10, "--init", ckpt, "-o", resumed)
    if "a checkpoint at step 5" not in out or open(straight, "rb").read() != open(resumed, "rb").read():
        print(out)
        print("FAIL: the resumed run's file differs from the straight run's")
        return 1
    print("a run resumed from its checkpoint at step 5 wrote the same file as the straight run")
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
