#!/bin/sh
# Install onnxserve into a fresh virtual environment: the image's only build step, also run by the tests
# (tests/integration/test_deploy_image.py) outside a container.
#
#   install.sh PREFIX SOURCE [EXTRAS]
#
# PREFIX  the virtual environment to create (the image uses /opt/onnxserve)
# SOURCE  a folder holding pyproject.toml, README.md and src/ (what the Dockerfile copies in)
# EXTRAS  optional extras, comma separated; empty (the default) is the serving-only install, without
#         torch or transformers. "export" adds the export tools (onnxserve export ...).
set -eu

if [ "$#" -lt 2 ] || [ "$#" -gt 3 ]; then
    echo "usage: install.sh PREFIX SOURCE [EXTRAS]" >&2
    exit 2
fi
prefix=$1
source=$2
extras=${3:-}
python=${PYTHON:-python3}

if [ -e "$prefix/bin/python" ]; then
    echo "install.sh: $prefix already holds an environment; give a fresh prefix" >&2
    exit 2
fi

"$python" -m venv "$prefix"
"$prefix/bin/python" -m pip install --no-cache-dir --quiet --upgrade pip
if [ -n "$extras" ]; then
    target="$source[$extras]"
else
    target="$source"
fi
# A regular (non-editable) install: the image keeps the environment, not the source.
"$prefix/bin/python" -m pip install --no-cache-dir --quiet "$target"
# Bytecode is compiled at install time so a read-only root filesystem costs nothing at start-up.
"$prefix/bin/python" -m compileall -q "$prefix/lib" >/dev/null || true
"$prefix/bin/onnxserve" --version
