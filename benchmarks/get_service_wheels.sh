#!/usr/bin/env bash
# Downloads the wheels `kvbuffer serve` needs on the GPU machine beyond its image (torch, triton, transformers,
# tokenizers, safetensors, numpy) and beyond SGLang's wheel set (../shared/anchors/get_sglang_runtime.sh): gRPC,
# protobuf, pydantic-settings, OpenTelemetry, prometheus-client, PyYAML, einops and fla-core, for its Python 3.12.
# About 11 MiB. Usage: bash benchmarks/get_service_wheels.sh DEST   (then benchmarks/service_sglang_gpu.sh)
set -euo pipefail
dest=$(mkdir -p "$1" && cd "$1" && pwd)
plat="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp"
for p in manylinux_2_28 manylinux_2_17 manylinux2014; do plat="$plat --platform ${p}_x86_64"; done
python3 -m pip download -q $plat -d "$dest" grpcio grpcio-health-checking grpcio-reflection protobuf \
  pydantic-settings python-dotenv pyyaml opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions \
  opentelemetry-proto opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-grpc \
  googleapis-common-protos opentelemetry-exporter-prometheus prometheus-client einops fla-core==0.6.0
du -sh "$dest"
