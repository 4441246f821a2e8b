#!/usr/bin/env bash
# GPU figures in one command (benchmarks/gpu.py says what each row measures).
#
#   bash benchmarks/gpu.sh --out DIR            # GPU machine: venv, pip install torch + this repo, run (~8 min)
#   bash benchmarks/gpu.sh --dry-run --out DIR  # the same script on CPU with tiny models, nothing installed
#   bash benchmarks/gpu.sh --install-only       # only the venv (~2 min), e.g. in a call of its own
#   bash benchmarks/gpu.sh --skip-vllm --out DIR # without the vLLM row (below)
#
# After gpu.py, the vLLM rows: `illava bench --engine vllm` (stock vLLM vs vLLM + the illava plugin,
# LLaVA-1.5-7B architecture, random weights, bf16; then Qwen2-VL-2B images at full decoder depth,
# and Qwen2.5-VL-3B videos against vLLM's EVS) in a venv of its own with vLLM's CUDA wheel
# (`illava[vllm]`: vLLM pins an older transformers), written to DIR/vllm*.json. GPU_VLLM_VENV: that
# venv's folder (default /tmp/illava-gpu-vllm-venv).
#
# Writes DIR/gpu.json (rewritten after every row). Other options go to gpu.py (--budget-s, --rows,
# --repeats, --memory-cap-gb). Environment: PYTHON (interpreter: the dry run's, or the one that makes
# the venv), GPU_VENV (venv folder, default /tmp/illava-gpu-venv; reused, without reinstalling, when
# it already imports torch and illava).
set -euo pipefail

out=""
dry_run=0
install_only=0
skip_vllm=0
args=()
while (($#)); do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --install-only) install_only=1; shift ;;
        --skip-vllm) skip_vllm=1; shift ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done
[[ -z $out || $out == /* ]] || out=$PWD/$out  # relative to where it was called from
cd "$(dirname "$0")/.."
out=${out:-$PWD/out/gpu}

step() { echo "[gpu.sh ${SECONDS}s] $*" >&2; }

if ((dry_run)); then
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
    fi
    step "dry run with $PYTHON: $PYTHON benchmarks/gpu.py --dry-run --out $out ${args[*]-}"
    exec "$PYTHON" benchmarks/gpu.py --dry-run --out "$out" ${args[@]+"${args[@]}"}
fi

venv=${GPU_VENV:-/tmp/illava-gpu-venv}
base=${PYTHON:-python3}
step "$("$base" --version) at $(command -v "$base"); venv $venv"
if [[ ! -x $venv/bin/python ]]; then
    "$base" -m venv "$venv" || { step "python3 -m venv failed; trying virtualenv"; "$base" -m pip install -q virtualenv && "$base" -m virtualenv -q "$venv"; }
fi
if "$venv/bin/python" -I -c 'import torch, transformers, skimage, illava' 2>/dev/null; then  # -I: not ./illava
    step "venv already has torch and illava: nothing to install"
else
    pip=("$venv/bin/python" -m pip install --progress-bar off --disable-pip-version-check)
    step "pip install torch (PyPI's default Linux build is the CUDA one)"
    "${pip[@]}" torch
    step "pip install -e .[tools] (illava, its dependencies and the tools extra)"
    "${pip[@]}" -e ".[tools]"
fi
"$venv/bin/python" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")'
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
if ((install_only)); then step "installed"; exit 0; fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # fewer fragmentation OOMs in the batch search
step "benchmarks/gpu.py --out $out ${args[*]-}"
"$venv/bin/python" benchmarks/gpu.py --out "$out" ${args[@]+"${args[@]}"}
step "done: $out/gpu.json; table rows: $venv/bin/python benchmarks/readme_table.py --from-json $out/gpu.json"
if ((skip_vllm)); then step "vLLM row skipped (--skip-vllm)"; exit 0; fi
vvenv=${GPU_VLLM_VENV:-/tmp/illava-gpu-vllm-venv}
[[ -x $vvenv/bin/python ]] || "$base" -m venv "$vvenv"
if ! "$vvenv/bin/python" -I -c 'import vllm, illava.vllm' 2>/dev/null; then
    step "pip install -e .[vllm] (vLLM 0.32, CUDA build) into $vvenv"
    "$vvenv/bin/python" -m pip install --progress-bar off --disable-pip-version-check -e ".[vllm]"
fi
step "illava bench --engine vllm -> $out/vllm.json"
"$vvenv/bin/illava" bench --engine vllm --requests 64 --repeats 3 --new-tokens 32 --decoder-layers 32 --dtype bfloat16 \
    --json "$out/vllm.json" || step "the vLLM row failed (above); the transformers rows are in $out/gpu.json"
# images at full decoder depth (Qwen2-VL-2B, 448 px: 256 tokens): the paper's encoder stage, and ToMe at
# 50 % and 33 % of stock prefill FLOPs (knobs: benchmarks/results/vllm_flops_qwen2-vl-2b.json)
for spec in encoder-only '{"method": "tome", "knob": 5.95}' '{"method": "tome", "knob": 8.18}'; do
    name=$(echo "$spec" | tr -dc 'a-z0-9.' | tr '.' '_')
    step "illava bench --engine vllm --arch qwen2-vl-2b --illava $spec -> $out/vllm-qwen2-vl-2b-$name.json"
    "$vvenv/bin/illava" bench --engine vllm --arch qwen2-vl-2b --illava "$spec" --requests 64 --repeats 3 \
        --new-tokens 32 --dtype bfloat16 --json "$out/vllm-qwen2-vl-2b-$name.json" || step "that row failed (above)"
done
# videos against vLLM's EVS at equal tokens (Qwen2.5-VL-3B, all 36 decoder layers, 16 frames of 224 px)
step "illava bench --engine vllm --video -> $out/vllm-video.json"
"$vvenv/bin/illava" bench --engine vllm --video --frames 16 --requests 32 --repeats 3 --new-tokens 32 \
    --decoder-layers 36 --dtype bfloat16 --json "$out/vllm-video.json" || step "the video row failed (above)"
