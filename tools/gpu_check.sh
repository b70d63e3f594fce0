#!/usr/bin/env bash
# The GPU checks and figures, in one run on a machine with a CUDA GPU (from the repository root, the product
# installed):
#
#   bash tools/gpu_check.sh OUT [CPU_THREADS]
#
# 1. tests/test_gpu.py: the scorers, the build, the API and the CLI on the GPU against the CPU.
# 2. The labelled audit scan of the 100k synthetic store (tools.bench_gform): 10 and 1,000 validation samples,
#    30 label aggregates, on the GPU and on the same machine's CPU (CPU_THREADS torch threads).
# 3. The index build on the GPU against its bare forward pass (tools.bench_build): the default model, or where its
#    weights are absent (the GPU machine has no network) the same shapes with random weights from
#    $FORVALUE_CACHE's copy of the model's config and tokenizer (same FLOPs; the values mean nothing).
# 4. The exact scorer against a plain matmul on the GPU (tools.bench_query).
#
# Each step writes OUT/<step>.md (the tools' tables) and OUT/<step>.log; a failed step does not stop the others.
set -uo pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT [CPU_THREADS]}
threads=${2:-16}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
store=${GPU_CHECK_STORE:-/tmp/forvalue-gpu-check/s100k}
rows=${GPU_CHECK_ROWS:-100000}
workers=${GPU_CHECK_WORKERS:-13}
dev=${GPU_CHECK_DEVICE:-cuda}  # cpu: a dry run of this script on a machine without a GPU
status=0

step() {  # step NAME COMMAND...: run, log, time, keep going
    local name=$1
    shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    tail -n 25 "$out/$name.log"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi -L || true
"$py" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"

# the synthetic store, made by parallel writers (CPU only) while the tests use the GPU
mkdir -p "$(dirname "$store")"
makers=()
if [ ! -f "$store/validation.npz" ]; then
    for i in $(seq 0 $((workers - 1))); do
        OMP_NUM_THREADS=1 "$py" -m tools.make_synthetic_store --out "$store" --rows "$rows" --sketch-dim 0 \
            --n-val 1000 --workers "$workers" --worker "$i" >"$out/make_store.$i.log" 2>&1 &
        makers+=($!)
        [ "$i" -eq 0 ] && sleep 5  # the first writer creates the table
    done
fi

export FORVALUE_TEST_DEVICE=$dev
step test_gpu "$py" -m pytest -q tests/test_gpu.py
for pid in "${makers[@]}"; do wait "$pid" || status=1; done
cat "$out"/make_store.*.log 2>/dev/null | grep -E "^done|Error" | head -n 20

for n in 10 1000; do
    step "gform_gpu_$n" "$py" -m tools.bench_gform --store "$store" --sizes "$n" --labels 30 --token-rows 64 \
        --device "$dev" --out "$out/gform_gpu_$n.md"
    step "gform_cpu_$n" "$py" -m tools.bench_gform --store "$store" --sizes "$n" --labels 30 --token-rows 64 \
        --device cpu --threads "$threads" --out "$out/gform_cpu_$n.md"
done


model="${FORVALUE_CACHE:-$HOME/.cache/forvalue}/models/SmolLM2-135M-Instruct-Q4_1"
if [ ! -f "$model/model.safetensors" ] && [ -f "$model/config.json" ]; then
    "$py" - "$model" <<'EOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
folder = sys.argv[1]
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
print("random weights with the default model's shapes written to", folder)
EOF
fi
step build_gpu "$py" -m tools.bench_build --samples "${GPU_CHECK_BUILD_SAMPLES:-2048}" --batch-size 32 --reps 2 \
    --rss-sizes "" --device "$dev" --out "$out/build_gpu.md"
step query_gpu "$py" -m tools.bench_query --samples "${GPU_CHECK_QUERY_SAMPLES:-20000}" --val-sizes 1,10,100 \
    --device "$dev" --out "$out/query_gpu.md"
exit $status
