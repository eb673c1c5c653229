#!/usr/bin/env bash
# Runs the GPU checks and benchmarks on a CUDA machine, from the repository root:
#   OUT=results_dir bash benchmarks/gpu_run.sh STAGE...
# Stages (in the order given):
#   install     pip-install the carried wheels (.whl/) and this package (editable, no deps)
#   check       benchmarks/gpu_check.py: kernel correctness on the GPU + launch-config timings
#   synthetic   sacli bench attention --workload synthetic (8B-class shape, fixed densities)
#   stash       copy the carried parts of the model's GGUF (.model_*/*, git-ignored folders) to
#               /tmp/model_parts: the model travels in parts, one per call (a call carries < 64 MiB)
#   assemble    stash, then every part in /tmp/model_parts, in name order -> /tmp/model.gguf
#   pull        sacli pull /tmp/model.gguf (imports the default model)
#   model       sacli bench attention --workload model on $BENCH_TEXT
#   ttft        sacli bench ttft (default model) on $BENCH_TEXT
#   ttft_forced the same with sparse attention at every length (locates the crossover)
#   projection  sacli bench ttft --shape llama-8b with the densities measured by `model`
#   fidelity    sacli eval fidelity at $EVAL_LENGTHS (YaRN past 8K), product rule vs literal/residual
#   ppl         sacli eval ppl at $PPL_LENGTHS
#   niah        sacli eval niah on a small lengths x depths grid
#   summarize   benchmarks/summarize_gpu.py: 20 documents of 16K tokens, dense vs sparse
#   pack        tar every result under $OUT into $OUT/results.tar.gz (one archive to copy back)
# Environment: OUT (results), LENGTHS (default 8K..128K), BENCH_TEXT (a long book),
# FLEX_LENGTHS (lengths at which FlexAttention is timed; default all); for the eval stages
# EVAL_RULES (default "product adaptive literal"), NIAH_RULES (default "product"; e.g. "exact product"),
# EVAL_ARGS (more options, e.g. "--alpha 0.98")
# and EVAL_TAG (a suffix of the result files).
set -uo pipefail
EVAL_RULES="${EVAL_RULES:-product adaptive literal}"
RULE_ARGS=""
for r in $EVAL_RULES; do RULE_ARGS="$RULE_ARGS --rule $r"; done
NIAH_RULE_ARGS=""
for r in ${NIAH_RULES:-product}; do NIAH_RULE_ARGS="$NIAH_RULE_ARGS --rule $r"; done
EVAL_ARGS="${EVAL_ARGS:-}"
TAG="${EVAL_TAG:-}"
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the results directory}"
LENGTHS="${LENGTHS:-8192,16384,32768,65536,131072}"
BENCH_TEXT="${BENCH_TEXT:-.dev/bench_data/moby_dick_2701.txt}"
export SACLI_HOME="${SACLI_HOME:-/tmp/sacli_home}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
status=0
run() { echo "+ $*" | tee -a "$LOG"; "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=$rc; return "$rc"; }

for stage in "$@"; do
  case "$stage" in
    install)
      run python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
      run python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
      run nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv ;;
    check)
      # a correctness failure stops the run: no benchmark numbers from a wrong kernel
      run python3 benchmarks/gpu_check.py "$OUT/gpu_check.json" "${CHECK_LENGTHS:-32768,131072}" || exit 1 ;;
    stash)
      # parts carried by this call, kept in /tmp for the next call on the same (warm) machine
      run bash -c 'mkdir -p /tmp/model_parts && cp .model_*/* /tmp/model_parts/ && ls -l /tmp/model_parts' ;;
    assemble)
      run bash -c 'mkdir -p /tmp/model_parts && { ! ls .model_*/* >/dev/null 2>&1 || cp .model_*/* /tmp/model_parts/; } &&
        cat /tmp/model_parts/* > /tmp/model.gguf && sha256sum /tmp/model.gguf' || exit 1 ;;
    synthetic)
      run python3 -m sacli.bench attention --workload synthetic --lengths "$LENGTHS" \
        ${FLEX_LENGTHS:+--flex-lengths "$FLEX_LENGTHS"} --out "$OUT/attention_synthetic.json" ;;
    pull)
      run python3 -m sacli pull /tmp/model.gguf ;;
    model)
      run python3 -m sacli.bench attention --workload model --text "$BENCH_TEXT" --lengths "$LENGTHS" \
        --no-flex --out "$OUT/attention_model.json" ;;
    ttft)
      run python3 -m sacli.bench ttft --text "$BENCH_TEXT" --lengths "$LENGTHS" --out "$OUT/ttft_default.json" ;;
    ttft_forced)
      # sparse at every length (dense_below 0): where the automatic crossover should lie
      run env SACLI_DENSE_BELOW=0 python3 -m sacli.bench ttft --text "$BENCH_TEXT" --lengths "${TTFT_LENGTHS:-$LENGTHS}" \
        --out "$OUT/ttft_default_forced.json" ;;
    projection)
      run python3 -m sacli.bench ttft --shape llama-8b --lengths "${PROJ_LENGTHS:-$LENGTHS}" --repeats 2 \
        --densities-from "$OUT/attention_model.json" --out "$OUT/ttft_llama8b.json" ;;
    fidelity)
      run python3 -m sacli eval fidelity "$BENCH_TEXT" --lengths "${EVAL_LENGTHS:-16K,32K}" --rope-scale yarn \
        --dense-below 0 $RULE_ARGS $EVAL_ARGS --out "$OUT/eval/fidelity$TAG.json" ;;
    ppl)
      run python3 -m sacli eval ppl "$BENCH_TEXT" --lengths "${PPL_LENGTHS:-8K,16K}" --rope-scale yarn \
        --dense-below 0 $RULE_ARGS $EVAL_ARGS --out "$OUT/eval/ppl$TAG.json" ;;
    niah)
      run python3 -m sacli eval niah "${NIAH_TEXT:-$BENCH_TEXT}" --lengths "${NIAH_LENGTHS:-4K,8K,16K}" \
        --depths "${NIAH_DEPTHS:-0.1,0.3,0.5,0.7,0.9}" --rope-scale yarn --dense-below 0 $NIAH_RULE_ARGS \
        $EVAL_ARGS --out "$OUT/eval/niah$TAG.json" ;;
    summarize)
      # forced sparse (dense_below 0): at 16K the automatic routing would choose dense for this model
      run env SACLI_DENSE_BELOW=0 python3 benchmarks/summarize_gpu.py --out "$OUT/summarize_gpu.json" ;;
    pack)
      (cd "$OUT" && tar czf /tmp/results.tar.gz --exclude results.tar.gz . && mv /tmp/results.tar.gz results.tar.gz) ;;
    *) echo "unknown stage $stage" | tee -a "$LOG"; status=2 ;;
  esac
done
exit "$status"
