#!/usr/bin/env bash
# The GPU checks, for a machine with CUDA: the cuda-marked tests, then the MoE layer and generation
# benchmarks on the GPU. Each step runs under a timeout (7 minutes in all) and a failed or timed-out
# step does not stop the others; the exit status is that of the first failure.
#
#   bash benchmarks/cuda_checks.sh            # from the repository root
#   PYTHON=python3 bash benchmarks/cuda_checks.sh  # another interpreter than .venv/bin/python
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
status=0

step() {  # step SECONDS COMMAND...
    local limit=$1
    shift
    echo "=== $* (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local code=$?
    if [ $code -ne 0 ]; then
        [ $code -eq 124 ] && echo "=== timed out after ${limit}s" || echo "=== failed with exit code $code"
        [ $status -eq 0 ] && status=$code
    fi
}

step 30 "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
step 180 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider
step 45 "$PYTHON" benchmarks/moe_layer.py --device cuda --dtype bfloat16
step 45 "$PYTHON" benchmarks/moe_layer.py --device cuda --dtype float32
step 120 "$PYTHON" benchmarks/generate.py --device cuda --dtype bfloat16 --batches 1,8 --new-tokens 64
exit $status
