#!/usr/bin/env python3
"""Where a kernel's time goes, from Nsight Compute's source page: stall-sample totals, then the
samples of each stretch of SASS between barriers (BAR.SYNC / UCGABAR_WAIT: the kernel's phases)
with its top stall reasons, then the hottest instructions.

  ncu --clock-control none --profile-from-start off --kernel-name regex:MlaScoreSelectKernel \
      --launch-count 1 --set full -o /tmp/mla build/bench/tls_bench --profile-steps 1 \
      --only mla_h128 --batches 8 --contexts 32768 --k-t 512
  ncu -i /tmp/mla.ncu-rep --page source --csv --print-source sass > /tmp/mla.csv
  python3 bench/gpu/ncu_segments.py /tmp/mla.csv

Samples are per warp, so a phase's share of samples is its share of time when every warp takes
part in every phase (the TLS token kernels). `tls_bench --profile-steps N` runs N eager steps
of each method between cudaProfilerStart / Stop, so `--profile-from-start off` profiles only
those (add `--metrics gpu__time_duration.sum --csv` for a per-kernel duration list).
"""
import csv
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main(path):
    rows = list(csv.reader(open(path, errors="replace")))
    head = next(i for i, r in enumerate(rows) if "Source" in r and "Address" in r)
    hdr = rows[head]
    data = [r for r in rows[head + 1:] if len(r) == len(hdr)]
    col = {c: i for i, c in enumerate(hdr)}
    key, exe = col["Warp Stall Sampling (All Samples)"], col["Instructions Executed"]
    src, addr = col["Source"], col["Address"]
    stalls = [c for c in hdr if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(num(r[key]) for r in data) or 1
    executed = sum(num(r[exe]) for r in data) or 1
    base = int(data[0][addr], 16)

    def top(seg, n):
        s = sum(num(r[key]) for r in seg) or 1
        ranked = sorted(stalls, key=lambda c: -sum(num(r[col[c]]) for r in seg))[:n]
        return " ".join("%s:%.0f" % (c[6:], 100 * sum(num(r[col[c]]) for r in seg) / s)
                        for c in ranked)

    print("samples %d, warp instructions %d" % (total, executed))
    print("stalls (% of samples):", top(data, 8))
    print("\nsegment  instrs  samples  executed  top stalls | first instruction")
    seg = []

    def flush():
        s = sum(num(r[key]) for r in seg)
        if seg and s / total >= 0.005:
            print("%7x %7d %7.1f%% %8.1f%%  %s | %s" % (
                int(seg[0][addr], 16) - base, len(seg), 100 * s / total,
                100 * sum(num(r[exe]) for r in seg) / executed, top(seg, 3), seg[0][src].strip()[:40]))
        seg.clear()

    for r in data:
        seg.append(r)
        if "BAR.SYNC" in r[src] or "UCGABAR_WAIT" in r[src]:
            flush()
    flush()
    print("\ninstructions with >= 0.5% of the samples:")
    for r in data:
        if num(r[key]) / total >= 0.005:
            print("%7x %5.1f%%  %-50s %s" % (int(r[addr], 16) - base, 100 * num(r[key]) / total,
                                           r[src].strip()[:50], top([r], 2)))


if __name__ == "__main__":
    main(sys.argv[1])
