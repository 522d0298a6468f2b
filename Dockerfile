# syntax=docker/dockerfile:1
# streamvi: the online VAE daemon.
#   CPU (default):  docker build -t streamvi:0.1.0 .
#   GPU:            docker build --build-arg VARIANT=gpu -t streamvi:0.1.0-gpu .
# The GPU variant starts from tensorflow/tensorflow:${TF_VERSION}-gpu (CUDA and cuDNN included);
# run it with `docker run --gpus all` or a Kubernetes nvidia.com/gpu resource request.

ARG TF_VERSION=2.21.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VARIANT=cpu

# -- base images, one per variant; only the selected one is pulled ------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
FROM tensorflow/tensorflow:${TF_VERSION}-gpu AS base-gpu

# -- builder: a virtualenv with streamvi and its dependencies, no compilers left behind ---------
FROM base-${VARIANT} AS builder
ARG TF_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# --system-site-packages: the GPU base already holds TensorFlow built against its CUDA; reuse it.
RUN python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamvi ./streamvi
COPY configs ./configs
RUN pip install --upgrade pip \
 && echo "tensorflow==${TF_VERSION}" > /tmp/constraints.txt \
 && pip install --constraint /tmp/constraints.txt . \
 && python -c "import streamvi, tensorflow; print('streamvi', streamvi.__version__, 'tensorflow', tensorflow.__version__)"

# -- runtime -------------------------------------------------------------------------------------
FROM base-${VARIANT} AS runtime
ARG TF_VERSION
LABEL org.opencontainers.image.title="streamvi" \
      org.opencontainers.image.description="Online variational autoencoder learned by SGVI from a Kafka stream" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 streamvi \
 && useradd --system --uid 10001 --gid streamvi --home-dir /var/lib/streamvi --create-home streamvi \
 && mkdir -p /var/lib/streamvi/snapshots /etc/streamvi \
 && chown -R streamvi:streamvi /var/lib/streamvi
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /src/configs /etc/streamvi/examples
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLCONFIGDIR=/tmp/matplotlib \
    STREAMVI_METRICS__HOST=0.0.0.0 \
    STREAMVI_METRICS__PORT=9108 \
    STREAMVI_SNAPSHOTS__DIR=/var/lib/streamvi/snapshots
WORKDIR /var/lib/streamvi
VOLUME ["/var/lib/streamvi/snapshots"]
EXPOSE 9108
USER 10001:10001
# /livez answers 200 while the training loop goes round, 503 once it has not for
# metrics.liveness_timeout_seconds (default 120 s); start-period covers TensorFlow start-up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('STREAMVI_METRICS__PORT', '9108'), timeout=4)"
# Exec form: streamvi is PID 1 and receives SIGTERM itself, so it stops after a final checkpoint.
ENTRYPOINT ["streamvi"]
CMD ["run"]
