# Torpor on a CUDA PyTorch image.
#
#   docker build -t torpor .
#   docker run --gpus all -p 8000-8002:8000-8002 -v $PWD/models:/models torpor [extra torpor serve flags]
#
# The base brings CUDA, cuDNN and a CUDA build of torch (2.11.0 + CUDA 13.0, the pairing the
# GPU checks ran on; it needs an NVIDIA driver >= 580). Another base: --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

# Stage 1 builds the project into a wheel, so the runtime stage carries neither the source tree
# nor the build backend (setuptools is fetched into pip's isolated build environment only).
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY torpor ./torpor
COPY api ./api
COPY adapters ./adapters
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
# Recent bases may run the distribution's Python, which refuses pip installs without the first
# variable (PEP 668); this image is single-purpose, so installing into it is what we want.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
# Same steps as the Makefile, with torch from the base instead of `pip install torch==2.13.0`:
# the project does not list torch (pyproject.toml says why), and the constraint pins the base's
# build so that no dependency can make pip swap in a different (CPU or other CUDA) torch.
RUN python3 -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/keep-torch.txt \
 && python3 -m pip install --no-cache-dir --constraint /tmp/keep-torch.txt /wheels/torpor-*.whl \
 && rm -rf /wheels /tmp/keep-torch.txt \
 && python3 -c "import torch, torpor.cli, torpor.api.http, torpor.adapters.eager; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# uid 10001: clear of the base's own users (Ubuntu 24.04 images already have uid 1000).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin torpor \
 && mkdir -p /models \
 && chown torpor:torpor /models
USER 10001:10001
WORKDIR /home/torpor

EXPOSE 8000 8001 8002
# Python rather than curl: runtime bases need not have curl. Ready = every model loaded (strict
# readiness), which for a large repository can take minutes, hence the long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["torpor", "serve", "--model-repository", "/models"]
