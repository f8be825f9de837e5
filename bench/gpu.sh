#!/usr/bin/env bash
# GPU check: real SD1.5 shapes (random weights) at 512 px, trained through the CLI in fp16 and bf16 with AdamW8bit,
# one generation, then our loop against the reference loop. Logs go to $OUT (or bench-out/).
# Wheels the machine lacks can sit in .whl/ (see docs/BENCHMARKS.md); they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
data=$(mktemp -d)/data
python3 -c "from lora_gradio.dataset import make_demo_dataset; make_demo_dataset('$data/4_demo', size=512)"

for precision in fp16 bf16; do
  /usr/bin/time -v python3 -m lora_gradio train --base sd15-random --data "$data" --preset low-vram-8gb \
    --set mixed_precision=$precision --set epochs=1 --set batch_size=2 --set gradient_accumulation_steps=1 \
    --set gradient_checkpointing=false --set output_name=gpu-$precision --output "$out/lora" \
    2>&1 | tr '\r' '\n' | grep -v "^ *[0-9]*%|" | tee "$out/train-$precision.log"
done
python3 -m lora_gradio generate --base sd15-random --lora "$out/lora/gpu-bf16.safetensors" --prompt "demo, a red circle" \
  --steps 20 --output "$out/generate.png" 2>&1 | tr '\r' '\n' | tail -n 3 | tee "$out/generate.log"
python3 bench/train_speed.py --base sd15-random --resolution 512 --batch-size 4 --mixed-precision bf16 \
  --optimizer adamw8bit --steps 30 2>&1 | tail -n 1 | tee "$out/speed-bf16-b4.json"

python3 bench/generate_speed.py --base sd15-random --steps 20 2>&1 | tail -n 1 | tee "$out/generate-speed.json"
python3 bench/view_speed.py --base sd15-random 2>&1 | tail -n 1 | tee "$out/view-speed.json"
rm -rf "$out/lora"
