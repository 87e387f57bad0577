#!/usr/bin/env python3
"""GPU time per kernel name from an Nsight Compute duration list, largest first: where a
profiled stretch (e.g. one decode step) spends its GPU time.

  ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \
      build/bench/decode_step_bench --batches 8 --attention tls --steps 2 --profile 1 > step.csv
  python3 bench/gpu/ncu_kernel_times.py step.csv [--top 25]

Rows are grouped by the kernel's function name without template arguments or parameters.
The sum is of kernel durations alone (serialized by the profiler): gaps between kernels and
host work are not in it.
"""
import argparse
import collections
import csv
import io
import re


def base_name(name):
    name = name.replace("(anonymous namespace)::", "")
    depth, out = 0, []
    for ch in name:  # drop template arguments, stop at the parameter list
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            if ch == "(":
                break
            out.append(ch)
    name = "".join(out).strip()
    return name.split("::")[-1].split(" ")[-1] or name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    text = open(args.csv, errors="replace").read()
    start = text.find('"ID"')  # the table starts at its header; ncu's log lines come before
    if start < 0:
        raise SystemExit(f"{args.csv}: no ncu csv table (no \"ID\" header)")
    rows = csv.DictReader(io.StringIO(text[start:]))
    total_ns, count = collections.Counter(), collections.Counter()
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(r["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(r.get("Metric Unit"), 1)
        name = base_name(r["Kernel Name"])
        total_ns[name] += value * scale
        count[name] += 1
    grand = sum(total_ns.values()) or 1
    print(f"{'kernel':<44} {'calls':>7} {'total_us':>10} {'mean_us':>9} {'share':>6}")
    for name, ns in total_ns.most_common(args.top):
        print(f"{name[:44]:<44} {count[name]:>7} {ns / 1e3:>10.1f} {ns / 1e3 / count[name]:>9.2f} "
              f"{ns / grand:>6.1%}")
    print(f"{'all kernels':<44} {sum(count.values()):>7} {grand / 1e3:>10.1f}")


if __name__ == "__main__":
    main()
