"""PyTorch peer for bench_attn_cuda: the same shapes through torch SDPA (flash = FlashAttention-2,
and cuDNN), timed with CUDA events (median), written as CSV in bench_attn_cuda's columns.
With --mask, the causal cases instead take an explicit additive mask (0 / -inf, bf16, shared
by every head and batch entry), as bench_attn_cuda --mask does, through the SDPA kernels that
accept one (memory-efficient attention, cuDNN); rows are named "<backend>-mask".

    python3 tools/bench_torch_peer.py [--quick] [--d D ...] [--decode-only | --no-decode | --mask] --csv FILE
"""
import argparse
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend


def median_ms(fn, reps, warm):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="only the decoding table")
    ap.add_argument("--mask", action="store_true", help="causal attention through an explicit mask, no decoding")
    ap.add_argument("--d", type=int, action="append", help="only this head dim (repeatable)")
    ap.add_argument("--no-decode", action="store_true", help="no decoding table")
    ap.add_argument("--csv", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print("peer device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    out = open(args.csv, "w")
    out.write("kind,impl,dtype,d,s,b,h,causal,fwd_ms,fwd_tflops,bwd_ms,bwd_tflops\n")
    seqs = [2048] if args.quick else [512, 2048, 8192, 16384]
    reps = 5 if args.quick else 15
    peers = () if args.decode_only else (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION))
    if args.mask:
        peers = (("efficient-mask", SDPBackend.EFFICIENT_ATTENTION), ("cudnn-mask", SDPBackend.CUDNN_ATTENTION))
    for name, backend in peers:
        for d in args.d or (64, 128, 256):
            for causal in (True,) if args.mask else (False, True):
                for s in seqs:
                    b, h = 16384 // s, 2048 // d
                    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                               for _ in range(3))
                    flops = 4 * b * h * s * s * d / (2 if causal else 1)
                    mask = None
                    if args.mask:  # row i sees keys 0..i: 0 there, -inf after
                        mask = torch.full((s, s), float("-inf"), device=dev, dtype=torch.bfloat16).triu(1)
                    try:
                        with sdpa_kernel([backend]):
                            if mask is None:
                                fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            else:
                                fwd = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                            fms = median_ms(fwd, reps, 3)
                            o = fwd()
                            g = torch.randn_like(o)
                            bms = median_ms(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True), reps, 2)
                    except Exception as e:  # the backend refuses the case
                        print(f"{name} d={d} s={s} causal={causal}: not run ({type(e).__name__})", flush=True)
                        continue
                    ftf, btf = flops / fms / 1e9, 2.5 * flops / bms / 1e9
                    print(f"{name:6s} {d:4d} {s:6d} {b:3d} {h:3d} {int(causal):6d} {fms:9.3f} {ftf:7.0f} {bms:9.3f} {btf:7.0f}",
                          flush=True)
                    out.write(f"fa,{name},bf16,{d},{s},{b},{h},{int(causal)},{fms:.4f},{ftf:.1f},{bms:.4f},{btf:.1f}\n")
                    del q, k, v, mask
    if args.mask or args.no_decode:
        out.close()
        return
    for batch, kv in ((1, 4096), (1, 65536), (8, 16384), (8, 65536)):
        hq, hkv, d = 32, 8, 128
        q = torch.randn(batch, hq, 1, d, device=dev, dtype=torch.float16)
        k = torch.randn(batch, hkv, kv, d, device=dev, dtype=torch.float16)
        v = torch.randn(batch, hkv, kv, d, device=dev, dtype=torch.float16)
        ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 50, 10)
        gbps = 2 * batch * hkv * kv * d * 2 / ms / 1e6
        print(f"  sdpa  f16 batch {batch:2d} kv {kv:6d} {ms:8.4f} ms {gbps:7.0f} GB/s", flush=True)
        out.write(f"decode,sdpa,f16,{d},{kv},{batch},{hq},0,{ms:.5f},{gbps:.1f},0,0\n")
        del q, k, v
    out.close()


if __name__ == "__main__":
    main()
