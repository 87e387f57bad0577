#!/usr/bin/env python3
"""SmolLM2-135M-Instruct decode tokens/s on this machine's CPU: asynctls (CPU backend) next to
llama.cpp (PyPI llama-cpp-python, same GGUF), same prompt, same thread count, greedy.

usage: python3 bench/cpu/decode_vs_llamacpp.py [--model GGUF] [--asynctls build/cli/asynctls]
                                               [--threads 2] [--tokens 64] [--runs 3]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def llama_cpp(model, threads, tokens):
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    t0 = time.perf_counter()
    n = 0
    for _ in range(tokens):
        nxt = llm.sample(temp=0.0)
        llm.eval([nxt])
        n += 1
    return n / (time.perf_counter() - t0)


def ours(binary, model, threads, tokens):
    out = subprocess.run([binary, "generate", "--model", model, "--device", "cpu", "--threads", str(threads),
                          "--raw", "--prompt", PROMPT, "--max-tokens", str(tokens + 1)],
                         capture_output=True, text=True, check=True)
    m = re.search(r"([0-9.]+) tokens/s decode", out.stderr)
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/asynctls/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--asynctls", default=os.path.join(ROOT, "build/cli/asynctls"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for name, fn in (("asynctls cpu", lambda: ours(a.asynctls, a.model, a.threads, a.tokens)),
                     ("llama.cpp", lambda: llama_cpp(a.model, a.threads, a.tokens))):
        vals = [fn() for _ in range(a.runs)]
        rows.append((name, statistics.median(vals), vals))
    base = rows[1][1]
    print(f"{'impl':14} {'tok/s (median)':>15} {'x llama.cpp':>12}  runs")
    for name, med, vals in rows:
        print(f"{name:14} {med:15.1f} {med / base:12.2f}  {', '.join(f'{v:.1f}' for v in vals)}")


if __name__ == "__main__":
    sys.exit(main())
