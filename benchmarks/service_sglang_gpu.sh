#!/usr/bin/env bash
# The service with SGLang on the GPU machine, which has no package index: install carried wheel sets, then run
# bench_service_sglang.py (output and server logs into $OUT). The wheels (SGLang's set ~60 MiB, the service's ~11
# MiB) exceed what one device call carries, so they come in two calls on the same warm machine; both install into
# .sglang/site, which stays there between calls (an ignored path that the second call does not carry):
#   call 1, carry .sglang:  bash benchmarks/service_sglang_gpu.sh install .sglang
#   call 2, carry .whl:     bash benchmarks/service_sglang_gpu.sh install .whl && bash benchmarks/service_sglang_gpu.sh bench
# `bench` puts kvbuffer on the path as a package of symlinks to this checkout plus a dist-info that carries its
# entry points from pyproject.toml (SGLang finds the KVBuffer plugin through them, in every process it spawns).
set -euo pipefail
cd "$(dirname "$0")/.."
site="$PWD/.sglang/site"
case "$1" in
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$2"/*.whl
    ;;
  bench)
    pkg=/tmp/kvbuffer-path
    mkdir -p "$pkg/kvbuffer"
    for d in kernels service operator; do ln -sfn "$PWD/$d" "$pkg/kvbuffer/$d"; done
    ln -sfn "$PWD/proto/kvbuffer/v1" "$pkg/kvbuffer/v1"
    python3 - "$pkg" <<'PY'
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path(sys.argv[1]) / f"kvbuffer-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kvbuffer\nVersion: {project['version']}\n")
groups = {**project.get("entry-points", {}), "console_scripts": project.get("scripts", {})}
(info / "entry_points.txt").write_text("".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items())
                                               for group, items in groups.items()))
PY
    export PYTHONPATH="$site:$pkg" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1
    python3 -c "import sglang, grpc, kvbuffer.service.sglang.engine; print('sglang', sglang.__version__)"
    python3 benchmarks/bench_service_sglang.py --out "${OUT:-/tmp/bench-service}" "${@:2}"
    ;;
  *) echo "usage: $0 install DIR | bench [bench_service_sglang.py flags]" >&2; exit 2 ;;
esac
