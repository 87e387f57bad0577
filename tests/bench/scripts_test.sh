#!/usr/bin/env bash
# The benchmark scripts without a GPU: every bench/gpu shell script parses, every benchmark
# Python script compiles, tls_summary.py turns a small tls_bench.json (a GQA and an MLA row) plus
# PyTorch baseline files into the combined table with the right ratios, with and without the
# baselines, and sass_loops.py finds and counts a kernel's hot loop in a SASS listing. A broken
# script then fails here, not on the device.
#   bash tests/bench/scripts_test.sh SOURCE_DIR
set -euo pipefail
src=${1:?usage: scripts_test.sh SOURCE_DIR}
fail() { echo "FAIL: $*"; exit 1; }

for f in "$src"/bench/gpu/*.sh; do bash -n "$f" || fail "$f does not parse"; done
for f in "$src"/bench/*.py "$src"/bench/gpu/*.py; do
  python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' "$f" ||
    fail "$f does not compile"
done

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/tls_bench.json" <<'JSON'
{"device": "Test GPU", "hbm_bytes_per_s": 4.0e12, "results": [
 {"config": "gqa_g4", "q_heads": 32, "kv_heads": 8, "mla": false, "batch": 8, "context": 131072,
  "k_t": 512, "tls_ms": 0.05, "tls_serial_ms": 0.08, "dense_ms": 1.0, "quest_ms": 0.045,
  "token_only_ms": 2.0, "stages_ms": {"append": 0.002, "block_score": 0.02, "block_select": 0.005,
  "token_branch": 0.02, "attention": 0.02}, "bytes": {"tls": 100000000},
  "floor_ms": {"tls": 0.025}},
 {"config": "mla_h128", "q_heads": 128, "kv_heads": 1, "mla": true, "batch": 8, "context": 32768,
  "k_t": 512, "tls_ms": 0.06, "tls_serial_ms": 0.08, "dense_ms": 0.42, "quest_ms": 0.042,
  "token_only_ms": 2.2, "stages_ms": {"token_branch": 0.036, "attention": 0.024},
  "bytes": {"tls": 89000000}, "floor_ms": {"tls": 0.02}}]}
JSON
python3 "$src/bench/gpu/tls_summary.py" "$dir" > "$dir/bare.txt" || fail "tls_summary.py without baselines"
grep -q "^gqa_g4   8 128K  512 |   0.0500   1.0000      n/a      n/a      n/a" "$dir/bare.txt" ||
  fail "GQA row without baselines: $(grep gqa_g4 "$dir/bare.txt" | head -1)"
grep -q "GQA>=6x:ok Q>=0.8:ok" "$dir/bare.txt" || fail "GQA targets"
grep -q "^mla_h128  8  32K  512 .* 7.00    n/a  0.700 .*MLA>=10x:MISS Q>=0.8:MISS" "$dir/bare.txt" ||
  fail "MLA row without baselines: $(grep mla_h128 "$dir/bare.txt" | head -1)"

cat > "$dir/sdpa_kv8.json" <<'JSON'
{"results": [{"impl": "sdpa_cudnn", "batch": 8, "context": 131072, "ms": 0.9},
             {"impl": "sdpa_flash", "batch": 8, "context": 131072, "ms": 0.95},
             {"impl": "sdpa_flash", "batch": 1, "context": 131072, "ms": null, "error": "x"}]}
JSON
cat > "$dir/sdpa_mla.json" <<'JSON'
{"results": [{"impl": "torch_mla", "heads": 128, "batch": 8, "context": 32768, "ms": 0.72},
             {"impl": "torch_mla", "heads": 16, "batch": 8, "context": 32768, "ms": 0.25}]}
JSON
python3 "$src/bench/gpu/tls_summary.py" "$dir" > "$dir/full.txt" || fail "tls_summary.py with baselines"
# GQA: xPyT = the faster SDPA backend (cuDNN, 0.9 ms) over TLS (0.05 ms).
grep -q "^gqa_g4   8 128K  512 |   0.0500   1.0000   0.9000   0.9500      n/a .* 20.00  18.00  0.900" \
  "$dir/full.txt" || fail "GQA row with SDPA: $(grep gqa_g4 "$dir/full.txt" | head -1)"
# MLA: no SDPA; xPyT = torch (0.72 ms, the 128-head row's) over TLS (0.06 ms).
grep -q "^mla_h128  8  32K  512 |   0.0600   0.4200      n/a      n/a   0.7200 .*  7.00  12.00  0.700" \
  "$dir/full.txt" || fail "MLA row with torch: $(grep mla_h128 "$dir/full.txt" | head -1)"
grep -q "^cells met: GQA>=6x 1/1, MLA>=10x 0/1, Q>=0.8 GQA 1/1, Q>=0.8 MLA 0/1" "$dir/full.txt" ||
  fail "target counts: $(grep 'cells met' "$dir/full.txt")"

# sass_loops.py: of two backward branches the longer range with matrix work is the hot loop
# (the inner one has none); the counts drop predicates and modifiers.
cat > "$dir/k.sass" <<'SASS'
	code for sm_90a
		Function : _Z5OtherKernelv
        /*0000*/                   EXIT ;
		Function : _Z9TokenKernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   IGMMA.64x32x32.S8.U8 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   FFMA R2, R3, R4, R5 ;
        /*0040*/                   MUFU.EX2 R6, R2 ;
        /*0050*/                   FMNMX R7, R6, R7, !PT ;
        /*0060*/               @P0 BRA 0x30 ;
        /*0070*/              @!P1 FADD.RZ R8, R7, 1 ;
        /*0080*/                   BRA `(.L_x_3) 0x10 ;
        /*0090*/                   EXIT ;
SASS
python3 "$src/bench/sass_loops.py" "$dir/k.sass" --kernel TokenKernel > "$dir/loops.txt" ||
  fail "sass_loops.py: $(cat "$dir/loops.txt")"
grep -q "loop 0x10-0x80: 8 instructions; " "$dir/loops.txt" || fail "hot loop: $(cat "$dir/loops.txt")"
for op in "FMNMX:1" "FADD:1" "IGMMA:1" "BRA:2" "MUFU:1" "WARPGROUP:1"; do
  grep -q " $op\b" "$dir/loops.txt" || fail "no $op in: $(cat "$dir/loops.txt")"
done
if python3 "$src/bench/sass_loops.py" "$dir/k.sass" --kernel OtherKernel > /dev/null; then
  fail "sass_loops.py found a loop in a kernel without one"
fi
echo "bench scripts: ok"
