#!/usr/bin/env python3
"""A kernel's issue and pipe utilization from Nsight Compute's raw page (one profiled launch):
which pipe (tensor, FMA, ALU, XU, LSU...) is the busiest, as % of its peak while the SM is active.

  ncu -i /tmp/mla.ncu-rep --page raw --csv > /tmp/mla-raw.csv
  python3 bench/gpu/ncu_pipes.py /tmp/mla-raw.csv
"""
import csv
import re
import sys

WANTED = re.compile(r"^(sm__inst_executed_pipe_\w+\.avg\.pct_of_peak_sustained_active|"
                    r"sm__pipe_\w+_cycles_active\.avg\.pct_of_peak_sustained_active|"
                    r"sm__issue_active\.avg\.pct_of_peak_sustained_active|"
                    r"smsp__warps_active\.avg\.per_cycle_active|"
                    r"sm__throughput\.avg\.pct_of_peak_sustained_elapsed|"
                    r"l1tex__throughput\.avg\.pct_of_peak_sustained_active|"
                    r"lts__throughput\.avg\.pct_of_peak_sustained_elapsed)$")


def main(path):
    rows = list(csv.reader(open(path, errors="replace")))
    head = next(i for i, r in enumerate(rows) if "ID" in r and len(r) > 10)
    names, values = rows[head], rows[head + 2]
    picked = []
    for n, v in zip(names, values):
        if WANTED.match(n):
            try:
                picked.append((float(v.replace(",", "")), n))
            except ValueError:
                pass
    for v, n in sorted(picked, reverse=True):
        if v >= 1.0:
            print("%7.1f  %s" % (v, n))


if __name__ == "__main__":
    main(sys.argv[1])
