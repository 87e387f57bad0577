#!/usr/bin/env python3
"""Baseline for bench/kernels/attention_bench: PyTorch SDPA on the same shapes.

Qwen3-8B attention layout (32 query / 8 KV heads, head_dim 128, bf16), GQA through
enable_gqa=True (no K/V expansion):
  decode  (q_len 1): batch 1, 2, 4, 8 x context 16K..128K; cuDNN and flash backends.
  prefill (causal, batch 1, q_len == context): 8K, 16K, 32K; flash and cuDNN backends.
  mla     (--mode mla): MLA decode with absorbed queries (tls_bench's mla_hN rows: N query
          heads over one shared latent KV head of 576 dims, V its first 512), which SDPA's flash
          and cuDNN backends do not take (head dim 576 > 256); so PyTorch's own form of it: S = q
          c^T (cuBLAS, bf16), softmax in fp32, O = P c[:, :512] (cuBLAS, bf16), over a
          contiguous latent cache (no paging: the best case for it).
Each sample replays a CUDA graph of N calls (no Python launch gaps in the figure), timed with
CUDA events; the figure is the median. Decode rotates over enough K/V copies to miss the 60 MB L2.
Prints a table and, with --json FILE, writes records shaped like attention_bench's.
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV, D = 32, 8, 128
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def time_ms(fn, per_sample, samples):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(per_sample):  # warm-up outside the graph (backend selection, plans)
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(per_sample):
                fn(i)
        replay = graph.replay
    except Exception as e:  # a backend that cannot be captured: plain launches (host gaps count)
        print(f"  (graph capture failed: {str(e).strip()[:100]}; timing plain launches)")
        torch.cuda.synchronize()

        def replay():
            for i in range(per_sample):
                fn(i)
    replay()
    replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / per_sample)
    times.sort()
    return times[len(times) // 2]


def bench_decode(backend, batch, context, samples):
    kv_bytes = 2 * batch * HKV * context * D * 2
    copies = min(16, max(2, (1 << 30) // kv_bytes + 1))
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    ks = [torch.randn(batch, HKV, context, D, device="cuda", dtype=torch.bfloat16)
          for _ in range(copies)]
    vs = [torch.randn(batch, HKV, context, D, device="cuda", dtype=torch.bfloat16)
          for _ in range(copies)]
    out = torch.empty_like(q)

    def call(i):
        with sdpa_kernel([BACKENDS[backend]]):
            out.copy_(F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies],
                                                     enable_gqa=True))

    ms = time_ms(call, max(copies, 8), samples)
    del ks, vs
    torch.cuda.empty_cache()
    return {"kind": "decode", "batch": batch, "context": context, "ms": ms,
            "gbps": kv_bytes / (ms * 1e6), "tflops": 0.0}


MLA_DIM, MLA_V_DIM = 576, 512


def bench_mla(heads, batch, context, samples):
    cache_bytes = batch * context * MLA_DIM * 2
    copies = min(16, max(2, (1 << 30) // cache_bytes + 1))
    q = torch.randn(batch, heads, MLA_DIM, device="cuda", dtype=torch.bfloat16)
    caches = [torch.randn(batch, context, MLA_DIM, device="cuda", dtype=torch.bfloat16)
              for _ in range(copies)]
    scale = 1.0 / math.sqrt(MLA_DIM)
    out = torch.empty(batch, heads, MLA_V_DIM, device="cuda", dtype=torch.bfloat16)

    def call(i):
        c = caches[i % copies]
        s = torch.matmul(q, c.transpose(1, 2))  # [batch, heads, context]
        p = torch.softmax(s.float() * scale, dim=-1).to(torch.bfloat16)
        out.copy_(torch.matmul(p, c[:, :, :MLA_V_DIM]))

    ms = time_ms(call, max(copies, 8), samples)
    del caches
    torch.cuda.empty_cache()
    flops = 2.0 * batch * heads * context * (MLA_DIM + MLA_V_DIM)
    return {"kind": "mla_decode", "heads": heads, "batch": batch, "context": context, "ms": ms,
            "gbps": cache_bytes / (ms * 1e6), "tflops": flops / (ms * 1e9)}


def bench_prefill(backend, context, samples):
    q = torch.randn(1, HQ, context, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, context, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, context, D, device="cuda", dtype=torch.bfloat16)

    def call(_):
        with sdpa_kernel([BACKENDS[backend]]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    ms = time_ms(call, 2, samples)
    flops = 4.0 * HQ * D * (context * (context + 1) / 2)
    return {"kind": "prefill", "batch": 1, "context": context, "ms": ms, "gbps": 0.0,
            "tflops": flops / (ms * 1e9)}


def failed_record(e, **fields):
    """The record of a shape that could not be timed (a backend rejecting it, out of memory):
    its fields, no figures, and the first line of the exception's message."""
    why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return {**fields, "ms": None, "gbps": None, "tflops": None, "error": why}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="all", choices=["decode", "prefill", "all", "mla"])
    ap.add_argument("--mla-heads", default="16,32,64,128", help="comma list (--mode mla)")
    ap.add_argument("--json")
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--q-heads", type=int, default=HQ)
    ap.add_argument("--kv-heads", type=int, default=HKV)
    ap.add_argument("--batches", help="comma list, overrides the default batches")
    ap.add_argument("--contexts", help="comma list, overrides the default decode contexts")
    args = ap.parse_args()
    globals().update(HQ=args.q_heads, HKV=args.kv_heads)
    torch.manual_seed(0)
    shape = (f"MLA: one latent KV head, d {MLA_DIM} / v {MLA_V_DIM}" if args.mode == "mla"
             else f"{HQ} q / {HKV} kv heads, d {D}")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}; {shape}")
    batches = [1, 8] if args.quick else [1, 2, 4, 8]
    contexts = [16384, 131072] if args.quick else [16384, 32768, 65536, 131072]
    prefill_contexts = [8192] if args.quick else [8192, 16384, 32768]
    if args.batches:
        batches = [int(x) for x in args.batches.split(",")]
    if args.contexts:
        contexts = [int(x) for x in args.contexts.split(",")]
    results = []

    def report(r, columns, rates):
        """Keeps record r and prints its row: the columns, ms and (when timed) the rates."""
        results.append(r)
        ms = ("%10.4f" % r["ms"]) if r["ms"] else "%10s" % "n/a"
        print(f"{columns} {ms} {rates if r['ms'] else ''}"
              + (f"  ({r['error']})" if "error" in r else ""), flush=True)

    def run(backend, fn, *a):
        try:
            r = fn(backend, *a)
        except Exception as e:  # a backend that rejects the shape: record why, keep going
            r = failed_record(e, kind=fn.__name__.split("_")[1],
                              batch=a[0] if len(a) == 3 else 1, context=a[-2])
            torch.cuda.synchronize()
        r["impl"] = "sdpa_" + backend
        rate = r["gbps"] if r["kind"] == "decode" else r["tflops"]
        report(r, f"{r['impl']:12s} {r['kind']:8s} {r['batch']:6d} {r['context']:8d}",
               "%10.1f" % (rate or 0))

    if args.mode != "mla":
        print(f"{'impl':12s} {'kind':8s} {'batch':>6s} {'context':>8s} {'ms':>10s} "
              f"{'GB/s|TF/s':>10s}")
    if args.mode in ("decode", "all"):
        for backend in ("cudnn", "flash"):
            for b in batches:
                for l in contexts:
                    run(backend, bench_decode, b, l, args.samples)
    if args.mode == "mla":
        print(f"{'impl':12s} {'heads':>5s} {'batch':>6s} {'context':>8s} {'ms':>10s} "
              f"{'GB/s':>8s} {'TF/s':>8s}")
        for h in [int(x) for x in args.mla_heads.split(",")]:
            for b in batches:
                for l in contexts:
                    try:
                        r = bench_mla(h, b, l, args.samples)
                    except Exception as e:  # out of memory, say: record why, keep going
                        r = failed_record(e, kind="mla_decode", heads=h, batch=b, context=l)
                        torch.cuda.empty_cache()
                    r["impl"] = "torch_mla"
                    report(r, f"{r['impl']:12s} {h:5d} {b:6d} {l:8d}",
                           "%8.1f %8.1f" % (r["gbps"] or 0, r["tflops"] or 0))
    if args.mode in ("prefill", "all"):
        for backend in ("flash", "cudnn"):
            for l in prefill_contexts:
                run(backend, bench_prefill, l, max(5, args.samples // 3))
    if args.json:
        with open(args.json, "w") as f:
            shape = ({"kv_heads": 1, "head_dim": MLA_DIM, "v_head_dim": MLA_V_DIM}
                     if args.mode == "mla" else {"q_heads": HQ, "kv_heads": HKV, "head_dim": D})
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       **shape, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
