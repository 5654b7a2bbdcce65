# mmserve: one image for all three processes (vision service, LLM service, gateway).
# docker-compose.yml runs it three times with different commands; on its own it runs the gateway.
#
#   docker build -t mmserve .
#   # smaller CPU-only image (PyPI's Linux x86_64 torch wheel is the CUDA build):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t mmserve .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# In a container the services must listen on all interfaces (the code defaults to 127.0.0.1).
# MMSERVE_HOME: `python -m mmserve.demo` with no argument builds /models/demo-llava.
ENV VISION_HOST=0.0.0.0 \
    LLM_HOST=0.0.0.0 \
    HOST=0.0.0.0 \
    MMSERVE_HOME=/models

# Non-root runtime user; /models is created owned by it so a fresh named volume mounted there is writable.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin mmserve \
    && mkdir -p /models && chown mmserve:mmserve /models

WORKDIR /app

# torch first and pinned exactly (as in pyproject.toml and the Makefile); its own layer so source
# changes don't re-download it. Leave TORCH_INDEX_URL empty to install from the default index.
ARG TORCH_INDEX_URL=
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL}

# The other runtime dependencies, read from pyproject.toml, cached until that file changes.
# The `gpu` extra (flash-attn) is deliberately not installed.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The source tree. Editable install on purpose: mmserve.proto locates protos/ relative to the package
# folder (../protos) and writes the generated stubs next to itself, which only works from /app.
COPY . .
RUN pip install -e . \
    && python -c "from mmserve.proto import generate_stubs; generate_stubs()" \
    && python -c "from mmserve.proto import llm_pb2_grpc, tensor_pb2, vision_pb2_grpc"

USER mmserve

EXPOSE 8000 50051 50052

# Overridden per service in docker-compose.yml: python -m vision_service | python -m llm_service
CMD ["python", "-m", "gateway"]
