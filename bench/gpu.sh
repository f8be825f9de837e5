#!/usr/bin/env bash
# The GPU check behind the targets in docs/BENCHMARKS.md, on the full SD1.5 architecture (random weights) at 512 px:
# the CLI in fp16 and in bf16 with AdamW8bit and one generation; our loop against both reference loops at batch 1 and
# 16 (rank 32, default settings), LoCon and DoRA; peak GPU memory of the default and low-vram-8gb presets against the
# estimate; the Test tab's time per image at every layer against diffusers with the same LoRA, and 5 visitors at
# once. Logs go to $OUT (or bench-out/); it exits non-zero if a command failed.
#
#   bash bench/gpu.sh               # on a GPU machine
#   bash bench/gpu.sh --cpu-smoke   # the same commands on the CPU with the demo model, tiny and short (CI runs it)
#
# Wheels the machine lacks can sit in .whl/ (see docs/BENCHMARKS.md); they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}
python=${PYTHON:-python3}
if [ "${1:-}" = "--cpu-smoke" ]; then
  export CUDA_VISIBLE_DEVICES=""
  base=demo size=64 steps=3 big_batch=4 sample_steps=2 loops=lora-gradio generate="--rounds 1 --visitors 2 --images 1"
  echo "cpu smoke run: demo model, 64 px, 3 steps" | tee "$out/device.txt"
else
  base=sd15-random size=512 steps=30 big_batch=16 sample_steps=20 loops=lora-gradio,diffusers,bare
  generate="--rounds 3 --visitors 5 --images 4"
  if compgen -G ".whl/*.whl" >/dev/null; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
fi
timer=""
[ -x /usr/bin/time ] && timer="/usr/bin/time -v"  # peak RSS and wall time of each CLI run
failed=0
step() {  # run one command, keep its output in $out/$1, remember a failure
  local log=$1
  shift
  "$@" 2>&1 | tr '\r' '\n' | grep -v "^ *[0-9]*%|" | tee "$out/$log" | tail -n 3
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "FAILED: $*"; failed=1; }
}
data=$(mktemp -d)/data
$python -c "from lora_gradio.demo.shapes import make_demo_dataset; make_demo_dataset('$data/4_demo', size=$size)"

for precision in fp16 bf16; do
  step "train-$precision.log" $timer $python -m lora_gradio train --base $base --data "$data" \
    --preset low-vram-8gb --set mixed_precision=$precision --set max_train_steps=$steps --set batch_size=2 \
    --set resolution=$size --set gradient_checkpointing=false --set output_name=gpu-$precision \
    --set sample_steps=$sample_steps --output "$out/lora"
done
step generate.log $python -m lora_gradio generate --base $base --lora "$out/lora/gpu-bf16.safetensors" \
  --prompt "demo, a red circle" --steps $sample_steps --output "$out/generate.png"

# speed targets: batch 1 and batch 16 at rank 32 with the default settings, against both references in the same run
for batch in 1 $big_batch; do
  step "speed-b$batch.json" $python bench/train_speed.py --base $base --resolution $size --batch-size $batch \
    --rank 32 --mixed-precision bf16 --steps $steps --loops $loops
done
for network in locon dora; do
  step "speed-$network.json" $python bench/train_speed.py --base $base --resolution $size --batch-size 1 \
    --rank 32 --network-type $network --mixed-precision bf16 --steps $steps --loops $loops
done
# peak memory at batch 1 of each preset, beside the estimate the Train tab shows
for preset in seed-recommended low-vram-8gb; do
  step "memory-$preset.json" $python bench/train_speed.py --base $base --preset $preset --resolution $size \
    --batch-size 1 --rank 32 --steps $steps --loops lora-gradio
done
step generate-speed.json $python bench/generate_speed.py --base $base --steps $sample_steps $generate
step view-speed.json $python bench/view_speed.py --base $base
rm -rf "$out/lora" "$(dirname "$data")"
exit $failed
