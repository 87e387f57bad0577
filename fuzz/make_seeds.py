#!/usr/bin/env python3
"""Writes a few small valid GGUF (gguf Python package) and safetensors files (by hand) as seed
corpora:  python3 fuzz/make_seeds.py /tmp/corpus   ->  /tmp/corpus/gguf, /tmp/corpus/safetensors"""
import json
import os
import sys

import numpy as np
import gguf

root = sys.argv[1] if len(sys.argv) > 1 else "corpus"
out = os.path.join(root, "gguf")
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(1)
for i, (arch, qtype) in enumerate([("llama", gguf.GGMLQuantizationType.Q8_0),
                                   ("qwen2", gguf.GGMLQuantizationType.Q4_0),
                                   ("qwen3", gguf.GGMLQuantizationType.F16)]):
    w = gguf.GGUFWriter(os.path.join(out, f"seed{i}.gguf"), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_feed_forward_length(64)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "d"])
    w.add_token_types([1, 1, 3, 3])
    w.add_token_scores([0.0, -1.0, -2.0, -3.0])
    w.add_array("test.nested", [[1, 2], [3]])
    x = rng.standard_normal((4, 32)).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor("token_embd.weight", x.astype(np.float16))
    else:
        q = gguf.quants.quantize(x, qtype)
        w.add_tensor("token_embd.weight", q, raw_dtype=qtype)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    if arch == "qwen2":
        w.add_tensor("blk.0.attn_q.bias", np.zeros(32, np.float32))
    if arch == "qwen3":
        w.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
st_out = os.path.join(root, "safetensors")
os.makedirs(st_out, exist_ok=True)
for i, dtype in enumerate(["F32", "F16", "BF16"]):
    arrays = {"model.embed_tokens.weight": rng.standard_normal((4, 8)),
              "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8)),
              "model.layers.0.self_attn.q_proj.bias": rng.standard_normal(8),
              "lm_head.weight": rng.standard_normal((4, 8))}
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, a in arrays.items():
        if dtype == "F32":
            raw = a.astype(np.float32).tobytes()
        elif dtype == "F16":
            raw = a.astype(np.float16).tobytes()
        else:
            raw = (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(st_out, f"seed{i}.safetensors"), "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)
print("wrote seeds to", out, "and", st_out)
