# mmserve: one image for all three processes (vision service, LLM service, gateway).
# docker-compose.yml runs it three times with different commands; on its own it runs the gateway.
# No model is baked in: the checkpoint comes from a volume (see README "Run with Docker Compose").
#
#   docker build -t mmserve .     # CPU: torch's CPU wheel from PyTorch's CPU index (no CUDA libraries)
#   # GPU image: PyPI's CUDA torch + flash-attn (the `gpu` extra); docker-compose.gpu.yml sets these:
#   docker build --build-arg TORCH_SPEC=torch==2.13.0 --build-arg TORCH_INDEX_URL= \
#     --build-arg INSTALL_GPU_EXTRA=true -t mmserve:gpu .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1: forwards SIGTERM to the service (which drains and exits) and reaps zombies; a Python
# PID 1 would ignore SIGTERM until its own handler is installed (i.e. while a model is still loading).
# g++ and Python's headers: what torch.compile's CPU backend (inductor) builds its kernels with. It compiles
# the LLM service's decode step at start-up (LLM_COMPILE=auto; ~15-25% less time per decode step on CPU)
# and the vision tower with VISION_COMPILE=1; without them the services run eagerly. (The python images
# carry the headers; a base whose Python is Debian's gets them from its -dev package.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini g++ \
    && if ! python -c "import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))"; then \
        apt-get install -y --no-install-recommends "libpython$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev"; \
    fi \
    && rm -rf /var/lib/apt/lists/*

# In a container the services must listen on all interfaces (the code defaults to 127.0.0.1).
# MMSERVE_HOME: `python -m tools.demo` with no argument builds /models/demo-llava.
# TORCHINDUCTOR_CACHE_DIR: what torch.compile builds, kept where docker-compose.yml mounts the
# `compile-cache` volume, so that a restarted container loads it instead of compiling again (~80 s -> ~15 s
# for a 7B model's decode step on 2 cores).
ENV VISION_HOST=0.0.0.0 \
    LLM_HOST=0.0.0.0 \
    HOST=0.0.0.0 \
    MMSERVE_HOME=/models \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/mmserve/inductor

# Non-root runtime user; /models and /var/cache/mmserve are created owned by it so that fresh named volumes
# mounted there are writable.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin mmserve \
    && mkdir -p /models /var/cache/mmserve && chown mmserve:mmserve /models /var/cache/mmserve

WORKDIR /app

# The README's install, in the same order: torch first and pinned exactly, then the project (its
# runtime dependencies from pyproject.toml; the `test` extra is left out of the image). torch gets its
# own layer so that source changes don't reinstall it. PyPI's Linux x86_64 torch wheel is the CUDA build
# (several GB with its nvidia-* dependencies), so the CPU image takes the +cpu build from PyTorch's CPU
# index by default (also found in a pip find-links folder); pyproject's torch==2.13.0 accepts it.
# TORCH_INDEX_URL empty = pip's configured indexes only.
ARG TORCH_SPEC=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "$TORCH_SPEC" ${TORCH_INDEX_URL:+--extra-index-url $TORCH_INDEX_URL}

# The other runtime dependencies, read from pyproject.toml, cached until that file changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The `gpu` extra (flash-attn) only in the GPU image. flash-attn's setup downloads a prebuilt wheel that
# matches torch/CUDA/Python from its GitHub releases, and compiles with nvcc otherwise (not in slim).
ARG INSTALL_GPU_EXTRA=false
RUN if [ "$INSTALL_GPU_EXTRA" = true ]; then \
        python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['gpu']))" \
            > /tmp/gpu.txt \
        && pip install packaging psutil ninja einops wheel setuptools \
        && pip install --no-build-isolation -r /tmp/gpu.txt \
        && rm /tmp/gpu.txt; \
    fi

# The source tree. Editable install on purpose: the stubs are generated into the package folder
# (mmserve/proto/, next to ../protos), and tools/ (the demo checkpoint builder) runs from /app.
COPY . .
RUN pip install -e . \
    && python -m tools.protos \
    && python -c "from mmserve.proto import llm_pb2_grpc, tensor_pb2, vision_pb2_grpc"

USER mmserve

EXPOSE 8000 50051 50052

# -e 143: uvicorn re-raises SIGTERM after its graceful shutdown; count that as the clean exit it is.
ENTRYPOINT ["/usr/bin/tini", "-e", "143", "--"]
# Overridden per service in docker-compose.yml: python -m vision_service | python -m llm_service
CMD ["python", "-m", "gateway"]
