"""A run that could not allocate memory is refused as the request's fault (TOO_LARGE) unless the server is
short of memory now (RESOURCE_EXHAUSTED, retryable): a failure of no stated size (``std::bad_alloc``) while
the process cannot map 64 MiB. Outside attack rt56: honest requests were told their input values ask for too
much memory ("std::bad_alloc") while other clients' requests held it, and kept being told so."""

from __future__ import annotations

import subprocess
import sys

import pytest

from onnxserve.core import runtime

BAD_ALLOC = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Add: std::bad_alloc"
)
SIZED = "[ONNXRuntimeError] : 6 : Failed to allocate memory for requested buffer of size 4096"

UNDER_A_FULL_ADDRESS_SPACE = """
import resource, sys
from onnxserve.core import runtime
failure = MemoryError() if sys.argv[1] == "MemoryError" else RuntimeError(sys.argv[1])
mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + 16 * 2**20, resource.RLIM_INFINITY))
print(type(runtime._run_error("m", failure, None)).__name__, runtime._run_error("m", failure, None))
"""


def _kind_when_short(failure: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", UNDER_A_FULL_ADDRESS_SPACE, failure], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("failure", [BAD_ALLOC, "MemoryError"])
def test_a_failure_of_no_stated_size_while_memory_is_short_is_retryable(failure: str) -> None:
    answer = _kind_when_short(failure)
    assert answer.startswith("ResourceExhaustedError model m: the server is short of memory for this run now")
    assert answer.rstrip().endswith("retry later")


def test_a_failure_of_a_stated_size_stays_the_requests_even_when_memory_is_short() -> None:
    assert _kind_when_short(SIZED).startswith("TooLargeError model m could not allocate the memory")


@pytest.mark.parametrize("failure", [BAD_ALLOC, SIZED])
def test_with_memory_to_spare_a_failed_allocation_is_the_requests(failure: str) -> None:
    error = runtime._run_error("m", RuntimeError(failure), None)
    assert type(error).__name__ == "TooLargeError"
    assert "could not allocate the memory these input values ask for" in str(error)
