#!/usr/bin/env bash
# A quick GPU comparison, in under 5 minutes on one H100/H200: selfattn's engines against SDPA's
# flash backend and FlexAttention (torch.compile), forward and forward+backward, bf16.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# writes OUTDIR/gpu_fused.txt (the fused engine against float64 in fp32 and bf16, with the lse
# and a float mask's gradient, then its forward+backward against SDPA's flash backend in bf16,
# each figure beside its target), OUTDIR/gpu_scaling.{json,png} (L = 1024 ... 16384, B=1,
# 8 heads of 64, causal) and OUTDIR/gpu_book.{json,png} (the chapter's shapes: B=8, T=1024,
# d=768, 12 heads, causal). The timeouts add up to 5 minutes (plus 3 for the NCCL ring where
# there are 2 GPUs). Uses $PYTHON (default python3); runs from a source checkout without
# installing. Exit status 1 when the fused engine's check or target fails (the rest still runs).
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

# The fused engine (issue 16): correctness first, then its speed against SDPA's flash backend.
set +e
(
    failed=0
    time timeout 45 "$py" benchmarks/gpu_correctness.py --engines fused || failed=1
    time timeout 25 "$py" benchmarks/gpu_correctness.py --time || failed=1
    exit "$failed"
) 2>&1 | tee "$out/gpu_fused.txt"
status=${PIPESTATUS[0]}
set -e

contenders=sdpa-flash,sdpa,flex,mha-auto,mha-sdpa,mha-tiled,mha-naive,torch-mha
time timeout 150 "$py" -m selfattn bench --device cuda --preset scaling --lengths 1024..16384 \
    --contenders "$contenders" --baseline sdpa-flash --repeats 5 --time-budget 0.5 --quiet \
    --json "$out/gpu_scaling.json" --plot "$out/gpu_scaling.png"
time timeout 80 "$py" -m selfattn bench --device cuda --preset book \
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
exit "$status"
