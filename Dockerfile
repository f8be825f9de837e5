# lora-gradio for a rented GPU (RunPod, Vast and the like):
#   docker build -t lora-gradio .
#   docker run --gpus all -p 7860:7860 -v lora-workspace:/workspace -e LORA_GRADIO_AUTH=you:a-long-password lora-gradio
# PyPI's Linux torch wheel brings CUDA itself; the host's NVIDIA driver comes in through --gpus all.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /bin/bash lora \
    && mkdir -p /workspace \
    && chown 1000:1000 /workspace

WORKDIR /app
COPY requirements.txt .
# A local wheel folder may stand in for PyPI (PIP_FIND_LINKS, PIP_NO_INDEX as build args); by default pip uses PyPI.
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
# bitsandbytes ships a library for every CUDA and ROCm release; only its CPU one and the one for torch's CUDA can load.
RUN python3 -m venv /opt/venv && pip install --no-cache-dir -r requirements.txt \
    && cuda=$(python3 -c "import torch; print((torch.version.cuda or 'none').replace('.', ''))") \
    && find /opt/venv/lib/python3*/site-packages/bitsandbytes -name 'libbitsandbytes_*.so' \
        ! -name libbitsandbytes_cpu.so ! -name "libbitsandbytes_cuda$cuda.so" -delete
COPY --chown=1000:1000 app.py ./
COPY --chown=1000:1000 lora_gradio ./lora_gradio
COPY --chown=1000:1000 presets ./presets

# One volume keeps everything: datasets, models, runs and the Hugging Face cache. The app starts as root only to give
# that volume to uid 1000 (platforms often mount it owned by root), then runs as uid 1000 (LORA_GRADIO_USER).
ENV LORA_GRADIO_HOST=0.0.0.0 LORA_GRADIO_PORT=7860 LORA_GRADIO_WORKSPACE=/workspace \
    HF_HOME=/workspace/.cache/huggingface LORA_GRADIO_USER=1000 HOME=/home/lora
VOLUME ["/workspace"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=5)"]
CMD ["python3", "app.py"]
