#!/usr/bin/env bash
# Regenerate the committed Python stubs from protos/qlora_serve/v1/*.proto.
# Reproducible: grpcio-tools is pinned in pyproject's `dev` extra, and
# tests/test_protos.py fails when the committed stubs differ from fresh ones.
# Usage: bash protos/generate.sh [OUT_DIR]   (default: protos/, beside the .proto files)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
python -m grpc_tools.protoc -I "$here" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$here"/qlora_serve/v1/*.proto
