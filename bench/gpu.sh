#!/usr/bin/env bash
# Graft on a GPU, in one go, from the repository root: `bench/gpu.sh`.
#
#   1. the environment: .venv (made by `make install` only if it is missing), nvidia-smi,
#      torch's view of the GPU and the precision Graft will choose there;
#   2. bench/speed.py on the GPU, on 10,000 JPEG photos (500x375, as users send them), their
#      images decoded where a job decodes them by default (GRAFT_DECODE=auto: nvJPEG, resized
#      and normalised on the GPU, engine/device_decode.py): a job against one inference pass
#      over them, a second job on the same images (their pixels kept by the first: the decoded
#      cache) against a pure forward, and the engine's extraction pass against a pure forward
#      of the same backbone in the same dtype;
#   3. the CUDA tests (tests/engine/test_cuda.py, `-m cuda`: skipped on machines without one):
#      a fine-tuning job under autocast (auto, fp16 with loss scaling, fp32), the dtype chosen
#      on the real device, no out-of-memory retry on a normal job, GPU memory given back after
#      a job (and after a cancelled one); JPEG photos decoded by nvJPEG against the loaders
#      (features within the stated cosine), a job on JPEGs decoded there whose figures are the
#      exported file's, and its second job reading the kept pixels;
#   4. bench/refit_scale.py on the GPU: one cross-fitted refit of a layer of 1,000 old and 200
#      new labels over 2,048 features of 100,000 images (iterations, gradient, seconds, memory);
#   5. bench/decode_profile.py on the GPU: where the extraction pass's time goes on 10,000
#      JPEG photos (and 2,000 PNGs of them): each CPU stage of a loader item, the engine's
#      loader alone, the extraction pass through the loaders, nvjpeg decoding alone, the engine's
#      device path (alone and feeding the same pass), a pure forward, and the host-to-device copy.
#
# Everything goes to stdout and, when $OUT is set, to $OUT/gpu.log (the tests' JUnit report to
# $OUT/cuda-tests.xml). Every step has a time limit (545 s in all, past `make install`:
# one call of the device tool), so the script cannot hang; the steps go in the order of what
# they decide. Exits non-zero if any step failed; later steps still run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu.log") 2>&1
fi

WORKERS=$(( $(nproc) > 10 ? 8 : ( $(nproc) > 2 ? $(nproc) - 2 : 1 ) ))
failed=()

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

# run NAME SECONDS COMMAND...: a step with a hard time limit; a failure is noted, not fatal
run() {
  local name=$1 limit=$2 status=0
  shift 2
  timeout --kill-after=15 "$limit" "$@" || status=$?
  if (( status != 0 )); then
    (( status == 124 || status == 137 )) && echo "!! $name: stopped after ${limit}s"
    echo "!! $name failed (exit $status)"
    failed+=("$name")
  fi
}

step "environment"
# The project's .venv where there is one; else a python3 that already holds the ML stack (a GPU
# machine's image: the engine, its tests and bench/speed.py need no web stack); else install.
if [[ -x .venv/bin/python ]] && timeout 60 .venv/bin/python -c 'import torch, timm' 2>/dev/null
then
  PY=.venv/bin/python
elif timeout 60 python3 -c 'import torch, timm, sklearn, safetensors, pytest' 2>/dev/null; then
  PY=python3
else
  timeout 900 make install
  PY=.venv/bin/python
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "python: $PY ($("$PY" --version 2>&1))"
timeout 30 nvidia-smi || echo "nvidia-smi: not available"
run "torch info" 45 "$PY" - <<'EOF'
import torch

from engine.device import compute_dtype, precision_name

print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: this script is for a machine with a GPU")
device = torch.device("cuda")
props = torch.cuda.get_device_properties(device)
print(f"{props.name}: capability {props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs")
print(f"bf16 supported (emulation included): {torch.cuda.is_bf16_supported()}")
print(f"Graft's backbone precision here: {precision_name(compute_dtype(device))} (GRAFT_PRECISION=auto)")
EOF
if (( ${#failed[@]} )); then
  echo "no usable GPU: nothing more to run"
  exit 1
fi

step "bench/speed.py: a job, a second job and the extraction pass on 10,000 JPEG photos"
run "speed" 180 "$PY" bench/speed.py --device cuda --photos --images 10000 --views 1 \
  --repeat 1 --arch timm:resnet18 timm:resnet50 timm:vit_base_patch16_224 --no-seed \
  --extraction --second-job --workers "$WORKERS"

step "CUDA tests"
junit=()
[[ -n "${OUT:-}" ]] && junit=(--junitxml "$OUT/cuda-tests.xml")
run "CUDA tests" 120 "$PY" -m pytest -q -m cuda tests/engine/test_cuda.py -p no:cacheprovider \
  -rs --durations=5 ${junit[@]+"${junit[@]}"}

step "bench/refit_scale.py: one cross-fitted refit, 1,000 + 200 labels, 2,048 features, 100k images"
run "refit at scale" 90 "$PY" bench/refit_scale.py --device cuda --images 100000

step "bench/decode_profile.py: where the extraction pass's time goes, on JPEG and PNG photos"
run "decode profile" 80 "$PY" bench/decode_profile.py --device cuda --images 10000 \
  --workers "$WORKERS" --budget 60

step "done"
if (( ${#failed[@]} )); then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
