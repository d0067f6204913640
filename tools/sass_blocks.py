#!/usr/bin/env python3
"""Where a kernel's instructions go, per step of its main loop, from its SASS.

    cuobjdump -sass -fun KERNEL_SYMBOL file.cubin > kernel.sass
    python3 tools/sass_blocks.py kernel.sass [--anchor HMMA]

The main loop is taken as the shortest backward branch whose body holds every instruction of
the anchor opcode (the tensor-core products, by default). Its body is cut into basic blocks
(at branch targets and after branches); each block is printed with its address range, size,
the branch that ends it and its most frequent opcodes. Summing the blocks a step actually
runs (the streamlined paths, not the rare ones) gives instructions per warp per step, which
ncu's smsp__inst_executed divided by the steps and warps of a launch confirms.

A cubin comes from `nvcc -cubin -arch=sm_90a ...` on one of the fa_*.cu files; cuobjdump is
in the CUDA toolkit (or the nvidia-cuda-cuobjdump wheel).
"""
import argparse
import collections
import re
import sys

INSTR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
BRANCH = re.compile(r"\bBRA\s+(?:`?\(?\.?[A-Za-z_0-9]*\)?\s*)?(?:P\d+,\s*)?(0x[0-9a-f]+)")


def opcode(text):
    """Base opcode of an instruction: predicate and modifiers dropped (@P0 HMMA.16816.F32 -> HMMA)."""
    words = text.split()
    word = words[1] if words[0].startswith("@") else words[0]
    return word.split(".")[0]


def parse(lines):
    instrs = []
    for line in lines:
        m = INSTR.match(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2).strip()))
    return instrs


def main_loop(instrs, anchor):
    hits = [a for a, t in instrs if opcode(t) == anchor]
    if not hits:
        return None
    best = None
    for addr, text in instrs:
        m = BRANCH.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < addr and target <= hits[0] and addr >= hits[-1]:
            if best is None or addr - target < best[1] - best[0]:
                best = (target, addr)
    return best


def basic_blocks(body):
    targets = {int(m.group(1), 16) for _, t in body for m in [BRANCH.search(t)] if m}
    blocks, current = [], []
    for addr, text in body:
        if addr in targets and current:
            blocks.append(current)
            current = []
        current.append((addr, text))
        if opcode(text) in ("BRA", "EXIT", "RET"):
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sass", nargs="?", help="cuobjdump -sass output of one kernel (default: stdin)")
    ap.add_argument("--anchor", default="HMMA", help="opcode that marks the main loop's body")
    args = ap.parse_args()
    text = open(args.sass, errors="replace").read() if args.sass else sys.stdin.read()
    lines = text.splitlines()
    instrs = parse(lines)
    if not instrs:
        sys.exit("no SASS instructions found (expected cuobjdump -sass output)")
    loop = main_loop(instrs, args.anchor)
    if loop is None:
        sys.exit(f"no loop holds every {args.anchor} instruction")
    body = [(a, t) for a, t in instrs if loop[0] <= a <= loop[1]]
    mix = collections.Counter(opcode(t) for _, t in body)
    print(f"kernel: {len(instrs)} instructions; main loop {loop[0]:#x}-{loop[1]:#x}: {len(body)} "
          f"(static), {mix[args.anchor]} {args.anchor}")
    for block in basic_blocks(body):
        ops = collections.Counter(opcode(t) for _, t in block)
        top = " ".join(f"{k}:{v}" for k, v in ops.most_common(6))
        print(f"  {block[0][0]:06x}-{block[-1][0]:06x} {len(block):5d}  ends {block[-1][1][:36]:36s}  {top}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output cut short by a pager or head
        sys.exit(0)
