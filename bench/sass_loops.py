#!/usr/bin/env python3
"""The hot loop of each kernel in `cuobjdump -sass` output, counted by opcode.

A kernel's hot loop here is the longest range [target, branch] of a backward branch that holds
a matrix instruction (IGMMA, IMMA, HMMA) or at least --min-exp MUFU.EX2: in the token kernels the
chunk loop, in the attention kernels the key-tile loop. Counts are static (instructions in the
loop's body, predicated or not), which is what "SASS instructions per chunk" means in
bench/results/: divide by the pairs a lane handles per trip for a per-pair figure.

  cuobjdump -sass build/kernels/CMakeFiles/asynctls_kernels_cuda.dir/cuda/tls_token_fused.cu.o |
    python3 bench/sass_loops.py --kernel MlaScoreSelectKernel
"""
import argparse
import collections
import re
import sys

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\b(?:\s+`?\(?\.L_x_\d+\)?)?\s+0x([0-9a-f]+)")
MATRIX = ("IGMMA", "IMMA", "HMMA", "HGMMA")


def opcode(text):
    """The opcode of one instruction without its predicate and modifiers (IGMMA.64x32x32 -> IGMMA)."""
    text = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)
    return text.split()[0].split(".")[0] if text else ""


def functions(sass):
    """(name, [(address, text)]) per function of the listing."""
    for chunk in sass.split("Function : ")[1:]:
        name, _, body = chunk.partition("\n")
        yield name.strip(), [(int(a, 16), t) for a, t in INSTR.findall(body)]


def hot_loop(instrs, min_exp):
    """(first, last, [text]) of the longest backward-branch range with matrix work, or None."""
    best = None
    for addr, text in instrs:
        m = BRANCH.search(text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        target = int(m.group(1), 16)
        body = [t for a, t in instrs if target <= a <= addr]
        ops = [opcode(t) for t in body]
        exps = sum(1 for t in body if "MUFU.EX2" in t)
        if any(o in MATRIX for o in ops) or exps >= min_exp:
            if best is None or len(body) > len(best[2]):
                best = (target, addr, body)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sass", nargs="?", help="cuobjdump -sass output (default: standard input)")
    ap.add_argument("--kernel", default="", help="only functions whose name holds this")
    ap.add_argument("--min-exp", type=int, default=8, help="MUFU.EX2 that make a loop hot")
    ap.add_argument("--top", type=int, default=14, help="opcodes listed per loop")
    args = ap.parse_args()
    sass = open(args.sass).read() if args.sass else sys.stdin.read()
    found = 0
    for name, instrs in functions(sass):
        if args.kernel not in name:
            continue
        loop = hot_loop(instrs, args.min_exp)
        if loop is None:
            continue
        found += 1
        first, last, body = loop
        counts = collections.Counter(opcode(t) for t in body)
        print(f"{name}\n  loop {first:#x}-{last:#x}: {len(body)} instructions; " +
              " ".join(f"{k}:{v}" for k, v in counts.most_common(args.top)))
    if found == 0:
        print("no hot loop found" + (f" in a function holding {args.kernel!r}" if args.kernel else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
