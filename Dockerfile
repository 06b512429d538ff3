# Torpor on a PyTorch image, serving the bundled example models unless given others.
#
#   docker build -t torpor .
#   docker run --gpus all -p 8000-8002:8000-8002 torpor --devices cuda:0
#   docker run --gpus all -p 8000-8002:8000-8002 -v /path/to/your/models:/models torpor --devices cuda:0
#
# The default base brings CUDA, cuDNN and a CUDA build of torch (2.11.0 + CUDA 13.0, the pairing
# the GPU checks ran on; it needs an NVIDIA driver >= 580). A CPU image is built on a base
# without torch, e.g. --build-arg BASE_IMAGE=python:3.11-slim: torch then comes from PyTorch's
# CPU wheel index as in the Makefile (TORCH_VERSION, TORCH_INDEX); run it with --devices cpu.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

# Stage 1 builds the project into a wheel, so the runtime stage carries neither the source tree
# nor the build backend (setuptools is fetched into pip's isolated build environment only).
FROM ${BASE_IMAGE} AS build
# Distribution Pythons (a CPU base may be one) refuse pip installs without it (PEP 668).
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY torpor ./torpor
COPY api ./api
COPY adapters ./adapters
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
# Only for a base without torch; the pin's +cpu names PyTorch's CPU build, which only that index
# (or a wheel folder pip is pointed at, PIP_FIND_LINKS) has.
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
# This image is single-purpose, so installing into the base's Python is what we want.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
# torch first, as the Makefile does: the base's own (the CUDA build) where it has one, else the
# CPU build (from a configured wheel folder, else PyTorch's CPU index). The project does not list
# torch (pyproject.toml says why), and the constraint pins the torch now present so that no
# dependency can make pip swap in another build.
RUN if ! python3 -c "import torch" 2>/dev/null; then \
        python3 -m pip install --no-cache-dir "torch==${TORCH_VERSION}" 2>/dev/null \
        || python3 -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"; \
    fi \
 && python3 -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/keep-torch.txt \
 && python3 -m pip install --no-cache-dir --constraint /tmp/keep-torch.txt /wheels/torpor-*.whl \
 && rm -rf /wheels /tmp/keep-torch.txt \
 && python3 -c "import torch, torpor.cli, torpor.api.http, torpor.adapters.eager; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# uid 10001: clear of the base's own users (Ubuntu 24.04 images already have uid 1000).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin torpor
# The bundled examples are the default repository; theirs to write, since resnet50 and bert
# generate their weights into it on first load. A mount at /models replaces them.
COPY --chown=10001:10001 examples/models /models
USER 10001:10001
WORKDIR /home/torpor

EXPOSE 8000 8001 8002
# Python rather than curl: runtime bases need not have curl. Healthy = ready (every model
# loaded, which for a large repository can take minutes, hence the long start period) and at
# least one model ready: a server with an empty repository is ready in Triton's sense, but an
# image that serves nothing is not healthy (a mount of an empty or wrong folder at /models).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import json, urllib.request as r; r.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4); ready = json.load(r.urlopen(r.Request('http://127.0.0.1:8000/v2/repository/index', data=b'{\"ready\": true}'), timeout=4)); raise SystemExit(0 if ready else 'no model is ready')"]
ENTRYPOINT ["torpor", "serve", "--model-repository", "/models"]
