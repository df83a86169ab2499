#!/usr/bin/env bash
# The comparison study on one GPU within a time limit: WORKERS processes (one torch thread each) take the
# study's units from one queue (study.py --claim) in priority order, phase by phase:
#   1. SST-2, MRPC, STS-B: every method of METHODS at 30/50/70% (unstructured ones also 90/95%), seeds 1-3
#   2. CoLA and RTE, the same
#   3. SNIP's VARIANTS at 50% on SST-2, MRPC, STS-B, seeds 1-3
#   4. with distillation at 30/50/70%: the methods whose paper distils (Sanh et al.'s movement and magnitude)
# A process that finds no unclaimed unit left in a phase goes on to the next, so the phases overlap only at
# their ends. No cell is started after SECONDS - 40; at SECONDS every process is stopped (an unfinished cell is
# lost, its unit taken over by the next run). Then the summary is written. Rerun the same command to resume.
#
#   bench/study_gpu.sh GLUE_DIR MODEL_DIR OUT SECONDS [WORKERS]
#
# Environment: PYTHON (python3), DEVICE (cuda), AMP (off: float32, the CPU study's arithmetic), CODE (the commit,
# recorded in each cell where the checkout has no git), EXTRA (more study.py arguments for every phase, e.g. a
# small setting for a dry run on the CPU). With DEVICE=cuda it starts CUDA's MPS daemon where there is one, so the
# processes' kernels share the GPU instead of taking turns (checked first; without it they take turns).
set -u
glue=$1 model=$2 out=$3 seconds=$4 workers=${5:-14}
py=${PYTHON:-python3} device=${DEVICE:-cuda} amp=${AMP:-off}
cd "$(dirname "$0")/.."
end=$(( $(date +%s) + seconds ))
mkdir -p "$(dirname "$out")"

mps=0  # 1: this script started MPS (and stops it at the end)
if [ "$device" = cuda ] && pgrep -f nvidia-cuda-mps-control >/dev/null; then
    echo "MPS: already on"
elif [ "$device" = cuda ] && command -v nvidia-cuda-mps-control >/dev/null; then
    if nvidia-cuda-mps-control -d && $py -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
        mps=1; echo "MPS: on"
    else
        echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "MPS: could not be used, processes take turns"
    fi
fi

common=(--glue-dir "$glue" --model "$model" --out "$out" --device "$device" --amp "$amp" --threads 1 --claim
        --keep-going)
[ -n "${CODE:-}" ] && common+=(--code "$CODE")
core=(sst2 mrpc stsb)
variants=(snip-sn-const snip-sn-scale0.9 snip-sn-ffn snip-lambda1e-4 snip-lambda1e-3 snip-warmup0 snip-unweighted
          snip-prox-lambda30 snip-prox-lambda100 snip-prox-lambda1000 snip-blocks snip-per-param snip-last
          snip-prox-last l0-closed)
phases=("--tasks ${core[*]}"
        "--tasks cola rte"
        "--tasks ${core[*]} --targets 0.5 --unstructured-targets --methods ${variants[*]}"
        "--tasks ${core[*]} --unstructured-targets --distill --methods movement soft-movement magnitude-unstructured")

worker() {
    for phase in "${phases[@]}"; do
        left=$(( end - $(date +%s) - 40 ))
        [ "$left" -le 0 ] && break
        # shellcheck disable=SC2086  # a phase is several arguments
        $py bench/study.py "${common[@]}" $phase --deadline "$left" ${EXTRA:-}
    done
}
pids=()
for w in $(seq "$workers"); do
    worker >"$out.worker$w.log" 2>&1 &
    pids+=($!)
done
( sleep $(( end - $(date +%s) )); kill "${pids[@]}" 2>/dev/null; pkill -f "bench/study.py.*--out $out" ) &
watchdog=$!
wait "${pids[@]}"
kill "$watchdog" 2>/dev/null
[ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control 2>/dev/null
# shellcheck disable=SC2086
$py bench/study.py --glue-dir "$glue" --model "$model" --out "$out" --device "$device" --amp "$amp" ${EXTRA:-} --summarize >/dev/null
echo "cells: $(wc -l <"$out.jsonl"); failures: $(grep -l FAILED "$out".worker*.log 2>/dev/null | wc -l) worker log(s)"
