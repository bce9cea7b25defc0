#!/usr/bin/env bash
# A quick GPU comparison, in under 5 minutes on one H100/H200: selfattn's engines against SDPA's
# flash backend and FlexAttention (torch.compile), forward and forward+backward, bf16.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# writes OUTDIR/gpu_scaling.{json,png} (L = 1024 ... 16384, B=1, 8 heads of 64, causal) and
# OUTDIR/gpu_book.{json,png} (the chapter's shapes: B=8, T=1024, d=768, 12 heads, causal).
# Uses $PYTHON (default python3); runs from a source checkout without installing.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import selfattn.bench" 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"

contenders=sdpa-flash,sdpa,flex,mha-auto,mha-sdpa,mha-tiled,mha-naive,torch-mha
time timeout 170 "$py" -m selfattn bench --device cuda --preset scaling --lengths 1024..16384 \
    --contenders "$contenders" --baseline sdpa-flash --repeats 5 --time-budget 0.5 --quiet \
    --json "$out/gpu_scaling.json" --plot "$out/gpu_scaling.png"
time timeout 100 "$py" -m selfattn bench --device cuda --preset book \
    --contenders "$contenders,torch-mha-weights,wrapper-naive" --baseline sdpa-flash --quiet \
    --json "$out/gpu_book.json" --plot "$out/gpu_book.png"

# Ring attention on NCCL (selfattn.ring): two ranks, one GPU each, against one GPU.
ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
    time timeout 180 "$py" -m torch.distributed.run --standalone --nproc-per-node 2 \
        benchmarks/ring.py --nccl-check
else
    echo "gpu_check: ring attention on NCCL not checked: it needs 2 GPUs, this machine has $ngpu"
fi
