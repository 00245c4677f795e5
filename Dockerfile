# syntax=docker/dockerfile:1
# kvbuffer images (BuildKit). Two targets:
#   gpu (default): SGLang's release image of the version kvbuffer pins (its CUDA libraries, kernels and
#                  SGLang itself, for `engine: sglang`), kvbuffer with its sglang extra on top.
#   cpu:           a slim Python image with CPU torch: the embedded default model and the operator.
#   docker build -t kvbuffer:0.1.0 .                      # GPU
#   docker build --target cpu -t kvbuffer:0.1.0-cpu .     # CPU
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.17-cu129-runtime
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The kvbuffer wheel (pure Python: the Triton kernels compile at run time), and pip requirement files naming it.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && for wheel in /dist/kvbuffer-*.whl; do \
         echo "kvbuffer[operator] @ file://${wheel}" > /dist/cpu.txt; \
         echo "kvbuffer[sglang] @ file://${wheel}" > /dist/gpu.txt; \
       done

# CPU: kvbuffer (with the operator's extra) and CPU torch in a virtual environment the final stage copies whole.
FROM ${PYTHON_IMAGE} AS cpu-venv
ARG TORCH_VERSION=2.13.0
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    python -m venv /opt/kvbuffer \
    && /opt/kvbuffer/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
         "torch==${TORCH_VERSION}" -r /dist/cpu.txt

FROM ${PYTHON_IMAGE} AS cpu
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kvbuffer" \
      org.opencontainers.image.description="KVBuffer inference service for hybrid linear-attention models (CPU)" \
      org.opencontainers.image.source="https://github.com/kvbuffer/kvbuffer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin kvbuffer
COPY --from=cpu-venv /opt/kvbuffer /opt/kvbuffer
ENV PATH=/opt/kvbuffer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/kvbuffer
EXPOSE 50051 9464
ENTRYPOINT ["kvbuffer"]
CMD ["serve"]

# GPU: SGLang's image with kvbuffer installed into its Python; its torch and SGLang are held as they are.
FROM ${SGLANG_IMAGE} AS gpu
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kvbuffer" \
      org.opencontainers.image.description="KVBuffer inference service for hybrid linear-attention models (CUDA, SGLang)" \
      org.opencontainers.image.source="https://github.com/kvbuffer/kvbuffer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    python3 -m pip freeze | grep -iE '^(torch|triton|sglang|sgl-kernel|sglang-kernel|flashinfer-python)==' \
         > /tmp/base-constraints.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -c /tmp/base-constraints.txt -r /dist/gpu.txt \
    && rm /tmp/base-constraints.txt \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin kvbuffer
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/kvbuffer
EXPOSE 50051 9464
ENTRYPOINT ["kvbuffer"]
CMD ["serve"]
