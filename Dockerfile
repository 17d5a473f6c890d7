# megatron_dsv3 on NGC PyTorch: its CUDA torch, Transformer Engine, NCCL, cuDNN and Apex are kept as shipped.
#
#   docker build -t megatron-dsv3:0.1.0 .
#   enroot import -o megatron-dsv3.sqsh dockerd://megatron-dsv3:0.1.0     # for the examples/*.sbatch (pyxis)
#
# Base: NGC PyTorch 25.11 (Ubuntu 24.04, Python 3.12, CUDA 13.0, PyTorch 2.10 pre-release, Transformer Engine 2.9,
# which megatron-core 0.16.1's [dev] extra asks for: >=2.9,<2.12). megatron-core 0.16.1 publishes a cp312 wheel.
# The host driver must support CUDA 13.0 (R580, or a data-center driver with forward compatibility). Check the
# NGC release notes for these versions when changing the tag; the RUN below fails if torch would be replaced.
FROM nvcr.io/nvidia/pytorch:25.11-py3

# the base image's Python is the system one (Ubuntu 24.04 marks it externally managed)
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Pinned Python dependencies. torch is deliberately absent: pyproject's `torch>=2.4` is met by the base image,
# and the build fails if any install replaces the NGC build.
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-version \
 && pip install --no-cache-dir \
        megatron-core==0.16.1 \
        psutil==7.2.2 \
        wandb==0.31.0 \
        transformers==5.23.0 \
        tokenizers==0.23.3 \
        safetensors==0.8.0 \
        tensorboard==2.21.0 \
 && test "$(python -c 'import torch; print(torch.__version__)')" = "$(cat /tmp/torch-version)"

WORKDIR /opt/megatron_dsv3
COPY pyproject.toml ./
COPY megatron_dsv3 ./megatron_dsv3
COPY pretrain_dsv3.py ./
COPY tools ./tools
COPY benchmarks ./benchmarks
COPY examples ./examples
# --no-deps: the dependencies above (and numpy, tqdm, matplotlib, pyyaml from the base image) are the pinned set.
RUN pip install --no-cache-dir --no-deps . \
 && test "$(python -c 'import torch; print(torch.__version__)')" = "$(cat /tmp/torch-version)" \
 && python -c "import megatron.core, megatron_dsv3, transformers, safetensors, psutil"

# Non-root user with writable home and caches (pyxis/enroot run as the calling user; HOME/caches stay writable).
RUN useradd --create-home --uid 10001 --shell /bin/bash dsv3 \
 && mkdir -p /home/dsv3/.cache /workspace/runs \
 && chown -R dsv3:dsv3 /home/dsv3 /workspace/runs
ENV HOME=/home/dsv3 \
    XDG_CACHE_HOME=/home/dsv3/.cache \
    HF_HOME=/home/dsv3/.cache/huggingface \
    TRITON_CACHE_DIR=/home/dsv3/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/home/dsv3/.cache/inductor \
    WANDB_DIR=/workspace/runs \
    CUDA_DEVICE_MAX_CONNECTIONS=1
USER dsv3
WORKDIR /opt/megatron_dsv3
CMD ["python", "pretrain_dsv3.py", "--help"]
