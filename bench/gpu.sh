#!/usr/bin/env bash
# Every benchmark at GPU scale on one GPU, random-weight models of the real architectures, in about 8 minutes:
# SD1.5 trainer (512 and 704x1024) and builder, LAN sampling, scoring, and the SDXL trainer at 1024
# (gradient checkpointing, bf16, 8-bit AdamW) against diffusers' train_diffusion_dpo_sdxl.py recipe.
# Writes bench/results/gpu-*.json.
#
#   bench/gpu.sh                 # on a CUDA machine
#   bench/gpu.sh --smoke         # every part at tiny scale on the CPU (a minute or two); HGDPO_BENCH_SMOKE=1 too
#
# PEER_SDXL=<path of diffusers' train_diffusion_dpo_sdxl.py> adds the SDXL baseline (its python needs
# datasets and wandb: PYTHON=<that venv's python>). A part that fails is reported and the others still run;
# the exit status is the number of failed parts.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SMOKE=${HGDPO_BENCH_SMOKE:-0}
[ "${1:-}" = "--smoke" ] && SMOKE=1
if [ "$SMOKE" = 1 ]; then
    OUT=${OUT_DIR:-/tmp/hgdpo-gpu-smoke}; PREFIX=smoke
else
    OUT=bench/results; PREFIX=gpu
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=0

part() {  # part NAME TIMEOUT_S COMMAND...: run one benchmark, record failure and go on
    local name=$1 limit=$2; shift 2
    [ "$SMOKE" = 1 ] && limit=900  # a shared CPU can be slow; the limits below are the GPU budget
    local start=$SECONDS
    echo "== $name: $*"
    if timeout "$limit" "$@" > "$OUT/$PREFIX-$name.log" 2>&1; then
        echo "   ok in $((SECONDS - start)) s"
    else
        echo "   FAILED ($?) after $((SECONDS - start)) s; see $OUT/$PREFIX-$name.log"; tail -5 "$OUT/$PREFIX-$name.log"
        failed=$((failed + 1))
    fi
}

if [ "$SMOKE" = 1 ]; then  # tiny models, CPU, one of everything
    TRAIN=(--device cpu --arch tiny --resolution 64 --warmup 1 --steps 1 --rounds 1 --memory none --threads 1)
    part train-sd15-512 300 "$PYTHON" bench/train_throughput.py "${TRAIN[@]}" --json "$OUT/$PREFIX-train-sd15-512.json"
    part build-sd15-512 300 "$PYTHON" bench/build_throughput.py --device cpu --arch tiny --resolution 64 --steps 2 \
        --pool-size 2 --prompts 2 --rounds 1 --warmup 0 --threads 1 --scorer-arch tiny --score-images 2 \
        --score-rounds 1 --json "$OUT/$PREFIX-build-sd15-512.json"
    part lan-sd15-512 300 "$PYTHON" bench/lan_sampling.py --arch tiny --resolution 64 --steps 2 --rounds 1 \
        --warmup 0 --best-of 2 --best-of-batch 2 --threads 1 --memory none --output "$OUT/$PREFIX-lan-sd15-512.json"
    part score 300 "$PYTHON" bench/score_throughput.py --arch tiny --device cpu --images 2 --batch-size 2 \
        --rounds 1 --warmup 0 --threads 1 --json "$OUT/$PREFIX-score.json"
    SDXL=(--arch tiny --resolution 64 --steps 1,2 --mixed-precision no --optimizer adamw --work /tmp/hgdpo-sdxl-smoke)
else
    TRAIN=(--device cuda --arch sd15 --warmup 2 --steps 3 --rounds 3)
    part train-sd15-512 150 "$PYTHON" bench/train_throughput.py "${TRAIN[@]}" --resolution 512 \
        --mixed-precision bf16 --json "$OUT/$PREFIX-train-sd15-512.json"
    part train-sd15-704x1024 150 "$PYTHON" bench/train_throughput.py "${TRAIN[@]}" --resolution 704x1024 \
        --mixed-precision bf16 --gradient-checkpointing --optimizer adamw8bit \
        --json "$OUT/$PREFIX-train-sd15-704x1024.json"
    part build-sd15-704x1024 120 "$PYTHON" bench/build_throughput.py --device cuda --arch sd15 --resolution 704x1024 \
        --rounds 2 --warmup 1 --score-images 32 --score-resolution 704x1024 --json "$OUT/$PREFIX-build-sd15-704x1024.json"
    part lan-sd15-512 90 "$PYTHON" bench/lan_sampling.py --arch sd15 --device cuda --dtype fp16 --resolution 512 \
        --steps 50 --rounds 2 --output "$OUT/$PREFIX-lan-sd15-512.json"
    part score 60 "$PYTHON" bench/score_throughput.py --arch full --device cuda --dtype fp16 --images 32 \
        --batch-size 16 --rounds 2 --json "$OUT/$PREFIX-score.json"
    SDXL=(--arch full --resolution 1024 --steps 3,9 --mixed-precision bf16 --optimizer adamw8bit)
fi
PEER=()
[ -n "${PEER_SDXL:-}" ] && PEER=(--peer "$PEER_SDXL")
part train-sdxl-1024 240 "$PYTHON" bench/sdxl_train_memory.py "${SDXL[@]}" "${PEER[@]}" \
    --json "$OUT/$PREFIX-train-sdxl-1024.json"
echo "done: $failed part(s) failed; results in $OUT/$PREFIX-*.json"
exit "$failed"
