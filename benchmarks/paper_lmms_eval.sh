#!/usr/bin/env bash
# Reproduce the paper's benchmark table with lmms-eval: baseline (stock model) and iLLaVA rows,
# accuracy together with prefill time and throughput. Needs a GPU machine with hub access.
#
#   pip install torch torchvision            # a matching pair for your CUDA
#   pip install -e ".[eval]"                  # lmms-eval + what it needs; no second torch
#   bash benchmarks/paper_lmms_eval.sh        # MODEL=... BATCH=... LIMIT=... OUT=... to change
#   python benchmarks/lmms_eval_table.py runs/paper   # the markdown table
#
# Image benchmarks run the `image` preset, video benchmarks the `video` preset (METHOD.md: the
# authors' LLaVA-OV-7B settings). MMVet is scored by a GPT judge and MMBench dev uses GPT answer
# extraction: both need OPENAI_API_KEY. MMBench-EN v1.1 has no task in lmms-eval 0.7.x (it ships
# v1.0 only), so only `mmbench_en_dev` (v1.0) runs here.
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
LMMS_MODEL=${LMMS_MODEL:-illava_llava_onevision}   # illava_qwen2_vl for Qwen2-VL / Qwen2.5-VL
BATCH=${BATCH:-1}
OUT=${OUT:-runs/paper}
LIMIT=${LIMIT:-}                                   # e.g. LIMIT=50 for a quick pass
IMAGE_TASKS=${IMAGE_TASKS:-"mme mmbench_en_dev mmmu_val mmstar mmvet muirbench"}
VIDEO_TASKS=${VIDEO_TASKS:-"mvbench videomme egoschema"}
EXTRA=${EXTRA:-"dtype=bfloat16,attn_implementation=sdpa"}

run() {  # run TASK PRESET
  local task=$1 preset=$2 name
  for row in baseline illava; do
    name="$task-$row"
    local p=$preset; [ "$row" = baseline ] && p=none
    mkdir -p "$OUT/$name"
    illava eval lmms --model "$LMMS_MODEL" \
      --model_args "pretrained=$MODEL,preset=$p,$EXTRA,timing_log=$OUT/$name/timing.json" \
      --tasks "$task" --batch_size "$BATCH" --output_path "$OUT/$name" --log_samples \
      ${LIMIT:+--limit "$LIMIT"}
  done
}

for t in $IMAGE_TASKS; do run "$t" image; done
for t in $VIDEO_TASKS; do run "$t" video; done
echo "done: python benchmarks/lmms_eval_table.py $OUT"
