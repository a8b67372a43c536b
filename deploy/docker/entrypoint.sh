#!/bin/sh
# The image's entrypoint (also run by tests/integration/test_deploy_image.py outside a container).
#
#   entrypoint.sh                  onnxserve serve --model-repository /models --host 0.0.0.0
#                                  (--http-port 8000 --grpc-port 8001); with ONNXSERVE_CONFIG or
#                                  ONNX_SERVER_CONFIG set (the old tutorial's name): --config FILE
#                                  instead of --model-repository
#   entrypoint.sh healthcheck      exit 0 when GET /v2/health/live answers 200 (the HEALTHCHECK)
#   entrypoint.sh ARGS...          onnxserve ARGS... (e.g. serve --config /etc/onnxserve/config.json)
#
# Environment: ONNXSERVE_PREFIX (/opt/onnxserve, the virtual environment), ONNXSERVE_MODEL_REPOSITORY
# (/models), ONNXSERVE_HOST (0.0.0.0), ONNXSERVE_HTTP_PORT (8000), ONNXSERVE_GRPC_PORT (8001),
# ONNXSERVE_INFERENCE_THREADS (unset: the server's default; Kubernetes sets it from the CPU limit).
# onnxserve is exec'd, so it is PID 1 in the container and receives SIGTERM itself (it drains, exits 0).
set -eu

prefix=${ONNXSERVE_PREFIX:-/opt/onnxserve}
http_port=${ONNXSERVE_HTTP_PORT:-8000}

if [ "$#" -eq 1 ] && [ "$1" = healthcheck ]; then
    exec "$prefix/bin/python" -c '
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as e:
    print(f"unhealthy: {e}", file=sys.stderr)
    sys.exit(1)
' "http://127.0.0.1:${http_port}/v2/health/live"
fi

config=${ONNXSERVE_CONFIG:-${ONNX_SERVER_CONFIG:-}}
if [ "$#" -eq 0 ]; then
    if [ -n "$config" ]; then
        set -- --config "$config"
    else
        set -- --model-repository "${ONNXSERVE_MODEL_REPOSITORY:-/models}"
    fi
    set -- serve "$@" \
        --host "${ONNXSERVE_HOST:-0.0.0.0}" \
        --http-port "$http_port" \
        --grpc-port "${ONNXSERVE_GRPC_PORT:-8001}"
fi
if [ "$1" = serve ] && [ -n "${ONNXSERVE_INFERENCE_THREADS:-}" ]; then
    set -- "$@" --inference-threads "$ONNXSERVE_INFERENCE_THREADS"
fi
exec "$prefix/bin/onnxserve" "$@"
