"""glibc malloc arenas are capped at server start, so that worker threads cannot reserve the address
space an ordinary request needs later (each arena reserves 64 to 128 MiB and keeps it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from onnxserve.core.memory import ARENA_ENVIRONMENT, _glibc, default_arena_count

glibc_only = pytest.mark.skipif(_glibc("mallopt") is None, reason="the C library is not glibc")

_PROGRAM = textwrap.dedent(
    """
    import ctypes, ctypes.util, sys, tempfile, threading
    from onnxserve.core.memory import limit_malloc_arenas
    print(limit_malloc_arenas(int(sys.argv[1])) if sys.argv[1] != "0" else False)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    start = threading.Barrier(16)
    def churn():  # ctypes calls release the GIL: these threads contend for the allocator
        start.wait()
        for _ in range(20000):
            libc.free(libc.malloc(4096))
    threads = [threading.Thread(target=churn) for _ in range(16)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as out:
        stream = libc.fopen(out.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        print(open(out.name).read().count("<heap nr="))
    """
)


def _arenas(limit: int) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != ARENA_ENVIRONMENT}
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, str(limit)], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    capped, heaps = done.stdout.split()
    return capped == "True", int(heaps)


@glibc_only
def test_the_arena_cap_bounds_the_arenas_threads_make() -> None:
    capped, heaps = _arenas(2)
    assert capped
    assert 1 <= heaps <= 2


@glibc_only
def test_the_environment_setting_wins() -> None:
    env = dict(os.environ, **{ARENA_ENVIRONMENT: "3"})
    program = "from onnxserve.core.memory import limit_malloc_arenas; print(limit_malloc_arenas())"
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_default_is_two_per_cpu_and_at_most_eight() -> None:
    assert 2 <= default_arena_count() <= 8


_THRESHOLD_PROGRAM = textwrap.dedent(
    """
    import ctypes, ctypes.util, sys
    from onnxserve.core.memory import fix_mmap_threshold
    print(fix_mmap_threshold() if sys.argv[1] == "fixed" else False)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    def touched(size):
        block = libc.malloc(size)
        libc.memset(block, 1, size)
        return block
    libc.free(touched(24 << 20))  # a large block freed: glibc's dynamic threshold rises to 24 MiB
    keep = touched(64)  # something after it on the heap, so that a freed block is not just trimmed
    before = rss()
    block = touched(8 << 20)
    after_keep = touched(64)
    libc.free(block)  # 8 MiB: from the heap (kept resident) with the dynamic threshold, mapped and returned if fixed
    print(rss() - before)
    """
)


def _kept_after_free(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", _THRESHOLD_PROGRAM, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    fixed, kept = done.stdout.split()
    return fixed == "True", int(kept)


@glibc_only
def test_a_fixed_mmap_threshold_returns_large_blocks_when_freed() -> None:
    # A text model's attention scores of up to 32 MiB came from the heaps once glibc had raised its threshold,
    # and fragmented them: one execution of 8 x 256 tokens of the demo MiniLM peaked at 450-650 MB, now 171 MB.
    fixed, kept = _kept_after_free("fixed")
    assert fixed
    assert kept < 2 << 20
    _, kept_dynamic = _kept_after_free("dynamic")
    assert kept_dynamic >= 6 << 20  # the behaviour it fixes (glibc's default)
