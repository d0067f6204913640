#!/usr/bin/env python3
"""Training speed of a byte-level Llama-shaped model: ggml-fa's `train` beside the same model
and training loop in PyTorch (scaled_dot_product_attention, torch.optim.AdamW), same machine,
same run, same data, shapes, batch, steps, learning-rate schedule and gradient clipping.

  bench_train.py --build BUILD_DIR --data FILE [--device cpu|cuda] [--threads 2]
                 [--layers 4 --embd 256 --heads 4 --kv-heads 4 --ctx 128 --batch 8 --steps 60]
                 [--dtype f32|bf16 (PyTorch's autocast on cuda)] [--tf32] [--no-check]

Both are timed per step (forward, backward and update; the held-out evaluations are not
timed), the first 3 steps left out. Before timing, the check: the model ggml-fa trained is
loaded into the PyTorch model from its GGUF file, and PyTorch's logits for a held-out window
must match ggml-fa-run's (--logits-out) on the same file, so both sides compute one model.
Needs torch, numpy and gguf (PyPI).
"""
import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return r.stdout


def learning_rate(a, step):  # as tools/train: linear warm-up, cosine to min_lr
    if step <= a.warmup:
        return a.lr * step / (a.warmup + 1)
    progress = min(1.0, (step - a.warmup) / max(a.steps - a.warmup, 1))
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * progress))


def torch_model(a, torch):
    nn, F = torch.nn, torch.nn.functional
    D = a.embd // a.heads
    ff = (a.embd * 8 // 3 + 31) // 32 * 32

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(a.embd))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.ffn_norm = RMSNorm(), RMSNorm()
            self.q = nn.Linear(a.embd, a.heads * D, bias=False)
            self.k = nn.Linear(a.embd, a.kv_heads * D, bias=False)
            self.v = nn.Linear(a.embd, a.kv_heads * D, bias=False)
            self.o = nn.Linear(a.heads * D, a.embd, bias=False)
            self.gate = nn.Linear(a.embd, ff, bias=False)
            self.up = nn.Linear(a.embd, ff, bias=False)
            self.down = nn.Linear(ff, a.embd, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            h = self.attn_norm(x)

            def heads(t, n):
                return t.view(B, T, n, D).transpose(1, 2)  # [B, n, T, D]

            def rope(t):  # pairs (2i, 2i + 1), the GGUF llama layout
                t0, t1 = t[..., 0::2], t[..., 1::2]
                return torch.stack((t0 * cos - t1 * sin, t0 * sin + t1 * cos), dim=-1).flatten(-2)

            q, k = rope(heads(self.q(h), a.heads)), rope(heads(self.k(h), a.kv_heads))
            v = heads(self.v(h), a.kv_heads)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=a.kv_heads != a.heads)
            x = x + self.o(o.transpose(1, 2).reshape(B, T, a.heads * D))
            h = self.ffn_norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embd = nn.Embedding(256, a.embd)
            self.blocks = nn.ModuleList(Block() for _ in range(a.layers))
            self.norm = RMSNorm()
            self.out = nn.Linear(a.embd, 256, bias=False)
            inv_freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
            angles = torch.arange(a.ctx, dtype=torch.float64)[:, None] * inv_freq[None, :]
            self.register_buffer("cos", angles.cos().float(), persistent=False)
            self.register_buffer("sin", angles.sin().float(), persistent=False)
            for name, p in self.named_parameters():  # as ggml-fa's Trainer initializes
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * a.layers) if name.endswith(("o.weight", "down.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, tokens):
            T = tokens.shape[1]
            x = self.embd(tokens)
            for b in self.blocks:
                x = b(x, self.cos[:T], self.sin[:T])
            return self.out(self.norm(x))

    return Model()


def load_gguf(model, path, torch):
    """The weights of a GGUF file written by ggml-fa's train (f32) into the PyTorch model."""
    from gguf import GGUFReader
    tensors = {t.name: np.array(t.data) for t in GGUFReader(path).tensors}

    def put(param, name):
        w = tensors[name].astype(np.float32).reshape(param.shape)  # GGUF [in, out] is torch's [out, in]
        param.data.copy_(torch.from_numpy(w))

    put(model.embd.weight, "token_embd.weight")
    put(model.norm.weight, "output_norm.weight")
    put(model.out.weight, "output.weight")
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        for mod, name in ((b.attn_norm, "attn_norm"), (b.ffn_norm, "ffn_norm"), (b.q, "attn_q"), (b.k, "attn_k"),
                          (b.v, "attn_v"), (b.o, "attn_output"), (b.gate, "ffn_gate"), (b.up, "ffn_up"),
                          (b.down, "ffn_down")):
            put(mod.weight, p + name + ".weight")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--tf32", action="store_true",
                    help="f32 products on TensorFloat-32 tensor cores, both sides (ggml-fa's --tf32, "
                         "PyTorch's allow_tf32)")
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    a.kv_heads = a.kv_heads or a.heads
    import torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32

    # ---- ggml-fa
    work = tempfile.mkdtemp(prefix="bench-train-")
    gguf_path = os.path.join(work, "trained.gguf")
    shape = ["--layers", str(a.layers), "--embd", str(a.embd), "--heads", str(a.heads), "--kv-heads",
             str(a.kv_heads), "--ctx", str(a.ctx), "--batch", str(a.batch)]
    sched = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--lr", str(a.lr), "--min-lr", str(a.min_lr)]
    out = run([os.path.join(a.build, "train"), "--data", a.data, *shape, *sched, "--eval-every", str(a.steps),
               "--backend", a.device, "-t", str(a.threads), "-o", gguf_path] + (["--tf32"] if a.tf32 else []))
    log(out.strip())
    m = re.search(r"after the first 3: ([\d.]+) ms per step", out)
    ours_ms = float(m.group(1))
    ours_loss = float(re.findall(r"held-out ([\d.]+)", out)[-1])

    # ---- the same loop in PyTorch
    data = np.frombuffer(open(a.data, "rb").read(), dtype=np.uint8).astype(np.int64)
    n_val = int(len(data) * 0.1)
    n_train = len(data) - n_val
    dev = torch.device(a.device)
    model = torch_model(a, torch).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    rng = np.random.default_rng(1)
    W = a.ctx + 1
    autocast = torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.dtype == "bf16")

    def loss_of(batch):
        with autocast:
            logits = model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), batch[:, 1:].reshape(-1))

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    steady = 0.0
    for s in range(1, a.steps + 1):
        starts = rng.integers(0, n_train - W + 1, a.batch)
        batch = torch.from_numpy(np.stack([data[i:i + W] for i in starts])).to(dev)
        for g in opt.param_groups:
            g["lr"] = learning_rate(a, s)
        sync()
        t0 = time.perf_counter()
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train's default --grad-clip 1
        opt.step()
        sync()
        if s > 3:
            steady += time.perf_counter() - t0
    torch_ms = 1e3 * steady / (a.steps - 3)
    with torch.no_grad():  # the held-out windows tools/train evaluates: 4 batches, evenly spaced
        n = 4 * a.batch
        starts = [n_train + int((n_val - W) * k / (n - 1)) for k in range(n)]
        windows = torch.from_numpy(np.stack([data[i:i + W] for i in starts])).to(dev)
        torch_loss = float(np.mean([loss_of(windows[e * a.batch:(e + 1) * a.batch]).item() for e in range(4)]))

    # ---- the check: ggml-fa's trained model in PyTorch against ggml-fa-run on the same file
    check = "not run"
    try:
        import gguf  # noqa: F401  (the check reads the file with it)
    except ImportError:
        a.no_check = True
        check = "not run (no gguf package)"
    if not a.no_check:
        ref = torch_model(a, torch).double()
        load_gguf(ref, gguf_path, torch)
        tokens = data[n_train:n_train + a.ctx]
        logits_path = os.path.join(work, "logits.f32")
        run([os.path.join(a.build, "ggml-fa-run"), "-m", gguf_path, "--tokens", ",".join(map(str, tokens)), "-n", "0",
             "--kv-type", "f32", "-t", str(a.threads), "--logits-out", logits_path])
        ours = np.fromfile(logits_path, dtype=np.float32).reshape(a.ctx, 256)
        with torch.no_grad():
            want = ref(torch.from_numpy(tokens[None, :].astype(np.int64)))[0].numpy()
        err = np.linalg.norm(ours - want) / np.linalg.norm(want)
        check = f"{err:.2e}"
        if not err < 1e-4:
            sys.exit(f"the model ggml-fa trained gives other logits in PyTorch: relative error {err:.3e}")

    tok = a.batch * a.ctx
    print(f"model: {a.layers} layers, embedding {a.embd}, heads {a.heads}/{a.kv_heads}, context {a.ctx}, "
          f"batch {a.batch}, {a.steps} steps, device {a.device}, {a.threads} threads, torch {torch.__version__} "
          f"({a.dtype}{', tf32 products' if a.tf32 else ''})")
    print(f"check: ggml-fa-run vs PyTorch (float64) on the trained file, logits relative error {check}")
    print("| | ms per step | tokens/s | held-out loss |")
    print("|---|---:|---:|---:|")
    print(f"| ggml-fa | {ours_ms:.2f} | {tok / ours_ms * 1e3:.0f} | {ours_loss:.4f} |")
    print(f"| PyTorch | {torch_ms:.2f} | {tok / torch_ms * 1e3:.0f} | {torch_loss:.4f} |")
    print(f"speed ratio ggml-fa / PyTorch: {torch_ms / ours_ms:.2f}x")


if __name__ == "__main__":
    main()
