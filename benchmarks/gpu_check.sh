#!/usr/bin/env bash
# The project's GPU validation as one command, sized for a short lease on one H100/H200 (about 5 minutes).
#
#   benchmarks/gpu_check.sh                 # in the NGC image (megatron-core, TE) or a bare CUDA image
#   MEGATRON_CORE_WHEEL=megatron_core-0.16.1-cp312-*.whl benchmarks/gpu_check.sh   # bare image: torch +
#       transformers only; the wheel is unpacked into a temporary directory and put on PYTHONPATH with this
#       source tree (nothing is pip-installed)
#   PEAK_TFLOPS=790 (default: the measured BF16 matmul peak of an H200) sets the MFU denominator.
#
# Prints, section by section:
#   (a) 30 steps of a one-GPU DeepSeek-V3-shaped proxy in BF16 (V3's hidden 7168, 128 heads, MLA ranks,
#       expert width 2048; 2 MoE layers + MTP, 8 routed experts, top-4, so it fits): tokens/s, TFLOP/s per GPU, MFU, peak memory
#   (b) benchmarks/model_step.py --device cuda: our model vs transformers' DeepseekV3 on the same weights
#   (c) benchmarks/grouped_experts.py --device cuda: routed experts as grouped GEMMs vs the SequentialMLP loop
#       on one layer of V3's expert shapes
#   (d) Transformer Engine blockwise FP8 vs BF16 step time and loss (benchmarks/fp8_te_step_time.py), where TE is
#       installed; otherwise says so. Then benchmarks/fp8_gemm_fidelity.py --device cuda: our emulated blockwise FP8
#       GEMM vs the real FP8 kernels it finds (scaled_mm blockwise and tensorwise, TE's Linear), n/a with the reason
# Without a CUDA device it exits 2 with one line.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PEAK_TFLOPS=${PEAK_TFLOPS:-790}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); run it on a GPU node" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}
if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
    if [[ -z "${MEGATRON_CORE_WHEEL:-}" ]]; then
        echo "gpu_check: megatron-core is not importable; set MEGATRON_CORE_WHEEL=path/to/megatron_core-0.16.1-*.whl" >&2
        exit 2
    fi
    unpacked=$(mktemp -d)
    trap 'rm -rf "$unpacked"' EXIT
    "$PYTHON" -m zipfile -e "$MEGATRON_CORE_WHEEL" "$unpacked"
    export PYTHONPATH="$PYTHONPATH:$unpacked"
fi
"$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')"

echo "== (a) DeepSeek-V3-shaped proxy, BF16, 1 GPU, 30 steps"
log=$(mktemp)
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 pretrain_dsv3.py --model deepseek-v3 \
    --num-layers 2 --moe-layer-freq 1 --num-experts 8 --moe-router-topk 4 --moe-router-num-groups 4 \
    --moe-router-group-topk 2 --mtp-num-layers 1 --seq-length 4096 --max-position-embeddings 4096 \
    --micro-batch-size 1 --global-batch-size 4 --train-iters 30 --log-interval 1 --bf16 --moe-grouped-gemm \
    --use-distributed-optimizer --mock-data --metrics-jsonl "$log.jsonl" > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
"$PYTHON" - "$log.jsonl" "$PEAK_TFLOPS" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])][5:]  # the first 5 steps warm up
peak = float(sys.argv[2])
tps = statistics.median(r["tokens_per_s"] for r in rows)
tflops = statistics.median(r["tflops_per_device"] for r in rows)
print(f"{'tokens/s':>10} {'TFLOP/s/GPU':>12} {'MFU':>6} {'peak MiB':>9} {'loss first/last':>18}")
print(f"{tps:>10.0f} {tflops:>12.1f} {100 * tflops / peak:>5.1f}% {max(r['max_memory_mb'] for r in rows):>9.0f} "
      f"{rows[0]['lm_loss']:>8.3f} / {rows[-1]['lm_loss']:.3f}")
PY

echo "== (b) our model vs transformers' DeepseekV3, BF16"
"$PYTHON" benchmarks/model_step.py --device cuda --batch-size 8 --seq-length 512

echo "== (c) routed experts: grouped GEMMs vs the SequentialMLP loop, BF16"
"$PYTHON" benchmarks/grouped_experts.py --device cuda --steps 10

echo "== (d) Transformer Engine blockwise FP8 vs BF16; emulated blockwise FP8 GEMM vs real FP8 kernels"
if "$PYTHON" -c "import transformer_engine" 2>/dev/null; then
    "$PYTHON" benchmarks/fp8_te_step_time.py --steps 10 --warmup 3
else
    echo "Transformer Engine is not installed: no FP8 step-time comparison (the emulated recipe runs without it)"
fi
"$PYTHON" benchmarks/fp8_gemm_fidelity.py --device cuda
