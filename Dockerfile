# qlora-serve on an NVIDIA GPU. Build: docker build -t qlora-serve .
# Run:   docker run --gpus all -p 50051:50051 -p 8000:8000 -p 9090:9090 -v qlora-data:/data qlora-serve --base <hub id or /models/dir>
# With no --base it serves the embedded tiny demo model.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv $VIRTUAL_ENV

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY adapters ./adapters
COPY training ./training
# The default PyPI torch wheel for Linux x86-64 is the CUDA build.
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 10001 qlora && mkdir -p /data && chown qlora /data
USER qlora
ENV QLORA_SERVE_DATA=/data QLORA_SERVE_CACHE=/data/cache HF_HOME=/data/hf
WORKDIR /home/qlora

EXPOSE 50051 8000 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["qlora-serve", "health", "--address", "localhost:50051"]
ENTRYPOINT ["qlora-serve", "serve", "--host", "0.0.0.0", "--metrics-address", "0.0.0.0"]
