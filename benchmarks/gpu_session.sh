#!/usr/bin/env bash
# Everything issue 8 needs from a GPU, in one device call of about 5-8 minutes on an H100 / H200:
#   1. the CUDA tests (tests/test_cuda.py: kernels vs masked dense, backend choice, tau = 1 = dense,
#      evicted = masked decoding, the paged engine on the device, zipvl-tiny's answer);
#   2. the GPU prefill benchmark: LongVA-7B-shaped random model, bf16, 16K / 32K / 64K tokens, dense vs
#      ZipVL at r = 0.5 / 0.35 / 0.3 / 0.1 and tau 0.975, CUDA events (flash-attn when it imports).
# Results and logs go to $OUT (the device tool's folder; default benchmarks/results/gpu_session).
#
# On a machine without package registries, carry the wheels it lacks: here `make gpu-wheels` fills
# .whl/ (pydantic, transformers 5.23, ... for CPython 3.12), then, with the device tool:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Knobs: PYTHON (default python3), SIZES (default "16384 32768 65536"), REPEATS (3),
# TEST_TIMEOUT_S (150), PREFILL_TIMEOUT_S (390: the two fit one 600 s device call with the wheel install), SKIP_WHEELS=1 (use the installed packages as they are).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${SKIP_WHEELS:-}" ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 3; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
start=$SECONDS
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" - <<'PY'
import torch, transformers, pydantic
from zipvl_ray.sparsity import flash_attn_available
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "pydantic", pydantic.__version__, "device", torch.cuda.get_device_name() if cuda else "cpu",
      "flash-attn", flash_attn_available())
PY
} 2>&1 | tee "$OUT/session.log"

echo "== 1. CUDA tests" | tee -a "$OUT/session.log"
timeout "${TEST_TIMEOUT_S:-150}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
tests_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc after $((SECONDS - start)) s" | tee -a "$OUT/session.log"

echo "== 2. prefill benchmark" | tee -a "$OUT/session.log"
prefill_args=(--shape longva-7b --sizes ${SIZES:-16384 32768 65536} --repeats "${REPEATS:-3}")
[[ -n "${SMOKE:-}" ]] && prefill_args=(--smoke)
timeout "${PREFILL_TIMEOUT_S:-390}" "$PY" -m benchmarks.prefill "${prefill_args[@]}" --out-dir "$OUT" 2>&1 \
    | tee "$OUT/prefill.log"
prefill_rc=${PIPESTATUS[0]}
echo "prefill rc=$prefill_rc after $((SECONDS - start)) s" | tee -a "$OUT/session.log"
exit $(( tests_rc != 0 || prefill_rc != 0 ))
