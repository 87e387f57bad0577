#!/usr/bin/env python3
"""Reference numbers for the weight-file tests, computed with the `gguf` Python package.

  python3 tests/data/weights/make_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes, next to this script:
  quant_reference.txt  random blocks of every dequantizable type (raw bytes in hex) and their
                       fp32 values from gguf.quants.dequantize (independent of our C++ code).
  model_reference.txt  for a few tensors of the real model (if given): first 64 dequantized
                       values and float64 sums of some rows and of the whole tensor.
"""
import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize

HERE = os.path.dirname(os.path.abspath(__file__))


def half_bytes(x):
    return np.float16(x).tobytes()


def random_blocks(rng, qtype, nblocks):
    """Random quantized bytes with finite, moderate fp16 scale fields."""
    out = bytearray()
    for _ in range(nblocks):
        if qtype == T.Q4_0:
            out += half_bytes(rng.uniform(-0.1, 0.1)) + rng.bytes(16)
        elif qtype == T.Q4_1:
            out += half_bytes(rng.uniform(0.001, 0.1)) + half_bytes(rng.uniform(-1, 1)) + rng.bytes(16)
        elif qtype == T.Q8_0:
            out += half_bytes(rng.uniform(-0.05, 0.05)) + rng.bytes(32)
        elif qtype == T.Q4_K:
            out += (half_bytes(rng.uniform(0.001, 0.05)) + half_bytes(rng.uniform(0.0, 0.05)) +
                    rng.bytes(12) + rng.bytes(128))
        elif qtype == T.Q6_K:
            out += rng.bytes(128) + rng.bytes(64) + rng.bytes(16) + half_bytes(rng.uniform(-0.01, 0.01))
        elif qtype in (T.F16,):
            out += np.asarray(rng.uniform(-3, 3, 64), np.float16).tobytes()
        elif qtype == T.BF16:
            f = np.asarray(rng.uniform(-3, 3, 64), np.float32).view(np.uint32)
            out += (f >> 16).astype(np.uint16).tobytes()
        elif qtype == T.F32:
            out += np.asarray(rng.uniform(-3, 3, 64), np.float32).tobytes()
    return bytes(out)


def write_quant_reference():
    rng = np.random.default_rng(20240531)
    lines = ["# type nbytes / hex bytes / values (gguf.quants.dequantize, %.9g)"]
    for qtype, nblocks in [(T.F32, 1), (T.F16, 1), (T.BF16, 1), (T.Q8_0, 3), (T.Q4_0, 3),
                           (T.Q4_1, 3), (T.Q4_K, 2), (T.Q6_K, 2)]:
        raw = random_blocks(rng, qtype, nblocks)
        vals = dequantize(np.frombuffer(raw, dtype=np.uint8), qtype).astype(np.float32).ravel()
        lines.append(f"type {qtype.name} {len(raw)} {vals.size}")
        lines.append("bytes " + raw.hex())
        lines.append("values " + " ".join("%.9g" % v for v in vals))
    with open(os.path.join(HERE, "quant_reference.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_model_reference(path):
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight",
             "blk.0.attn_norm.weight"]
    lines = ["# name type rows cols / first64 / rowsums row:sum ... / total (float64 sums)"]
    for name in names:
        t = tensors[name]
        vals = dequantize(t.data, t.tensor_type).astype(np.float32)
        cols = int(t.shape[0])
        vals = vals.reshape(-1, cols)
        rows = vals.shape[0]
        pick = sorted({r for r in (0, 1, rows // 2, rows - 1) if r < rows})
        lines.append(f"tensor {name} {t.tensor_type.name} {rows} {cols}")
        lines.append("first64 " + " ".join("%.9g" % v for v in vals.ravel()[:64]))
        lines.append("rowsums " + " ".join("%d:%.12g" % (r, vals[r].astype(np.float64).sum())
                                           for r in pick))
        lines.append("total %.12g" % vals.astype(np.float64).sum())
    with open(os.path.join(HERE, "model_reference.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_quant_reference()
    model = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "ASYNCTLS_MODEL_PATH",
        os.path.expanduser("~/.cache/asynctls/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if os.path.exists(model):
        write_model_reference(model)
    else:
        print("model not found, model_reference.txt not written:", model)
