"""An Inflater that runs out of memory refuses its body as retryable (protocols/inflation.py): zlib's
MemoryError ("Unable to allocate output buffer") reached gRPC clients as UNKNOWN with a traceback in the log,
and HTTP clients as a 500 (outside attack rt57)."""

from __future__ import annotations

import subprocess
import sys
import zlib

import pytest

from onnxserve.errors import InvalidInputError
from onnxserve.protocols.inflation import Inflater

UNDER_A_FULL_ADDRESS_SPACE = """
import resource, zlib
from onnxserve.protocols.inflation import Inflater
packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
bomb = b"".join(packer.compress(bytes(1 << 20)) for _ in range(256)) + packer.flush()  # 256 MiB of zeros
mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + 64 * 2**20, resource.RLIM_INFINITY))
try:
    Inflater("gzip", "request body").feed(bomb, 200 * 2**20)
except Exception as e:
    print(type(e).__name__, e)
"""


def test_an_inflater_short_of_memory_refuses_as_retryable() -> None:
    done = subprocess.run(
        [sys.executable, "-c", UNDER_A_FULL_ADDRESS_SPACE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "ResourceExhaustedError the server has no memory to inflate this request body now; retry later"
    )


def test_an_inflater_makes_at_most_what_it_is_asked_for_and_refuses_bad_data() -> None:
    data = zlib.compress(b"x" * 1000)
    inflater = Inflater("deflate", "gRPC message")
    assert inflater.feed(data, 600) == b"x" * 600
    assert inflater.feed(b"", 1000) == b"x" * 400
    inflater.finish()
    with pytest.raises(InvalidInputError, match="the gRPC message is not valid gzip data"):
        Inflater("gzip", "gRPC message").feed(b"not gzip at all", 100)
