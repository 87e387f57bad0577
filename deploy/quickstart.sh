#!/usr/bin/env bash
# The main job: install what is missing, build, fetch SmolLM2-135M-Instruct once, and
# generate from a long-context prompt (the Apache-2.0 license, ~2,300 tokens, plus a
# question) on the GPU when there is one, else the CPU, streaming the answer.
# Extra args go to `asynctls generate` (e.g. --device cpu, --max-tokens 64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/build.sh >/dev/null
prompt=$(mktemp)
trap 'rm -f "$prompt"' EXIT
{
  cat tests/data/prompts/apache-2.0.txt
  printf '\n\nIn two sentences: what does this license let me do, and what must I keep when I redistribute the work?'
} >"$prompt"
exec ./build/cli/asynctls generate --prompt-file "$prompt" --max-tokens 128 "$@"
