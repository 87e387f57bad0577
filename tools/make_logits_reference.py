#!/usr/bin/env python3
"""Next-token logits of SmolLM2-135M-Instruct (Q4_1 GGUF) from llama.cpp (PyPI llama-cpp-python),
the independent implementation our forward pass is compared to. Writes
tests/data/reference/smollm2_logits.json: per prompt the token ids llama.cpp used, the top-64
logits, the logits at 512 fixed ids, and llama.cpp's greedy continuation (32 tokens).

usage: python3 tools/make_logits_reference.py MODEL.gguf [OUT.json]
"""
import json
import os
import sys

import numpy as np
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def prompts():
    apache = open(os.path.join(ROOT, "tests/data/prompts/apache-2.0.txt")).read()
    return [
        ("capital", "The capital of France is"),
        ("chat", "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"),
        ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
        ("long_apache", apache + "\n\nQuestion: Under this license, what must you include when you "
                                 "redistribute the Work?\nAnswer:"),
    ]


def main():
    model_path = sys.argv[1]
    out_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "tests/data/reference/smollm2_logits.json")
    llm = Llama(model_path=model_path, n_ctx=8192, n_batch=512, logits_all=True, verbose=False, seed=0)
    rng = np.random.default_rng(1234)
    probe_ids = sorted(rng.choice(llm.n_vocab(), size=512, replace=False).tolist())
    cases = []
    for name, text in prompts():
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        top = np.argsort(-logits, kind="stable")[:64]
        # Greedy continuation, 32 tokens, by repeated argmax.
        greedy = []
        for _ in range(32):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(nxt)
            llm.eval([nxt])
        cases.append({
            "name": name,
            "token_ids": ids,
            "top_ids": [int(i) for i in top],
            "top_logits": [float(logits[i]) for i in top],
            "probe_ids": probe_ids,
            "probe_logits": [float(logits[i]) for i in probe_ids],
            "greedy_ids": greedy,
            "greedy_text": llm.detokenize(greedy).decode("utf-8", errors="replace"),
        })
        print(f"{name}: {len(ids)} tokens, top-1 {top[0]} ({logits[top[0]]:.3f}), greedy: "
              f"{cases[-1]['greedy_text']!r}", file=sys.stderr)
    import llama_cpp
    doc = {"model": os.path.basename(model_path), "generator": f"llama-cpp-python {llama_cpp.__version__}",
           "cases": cases}
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
