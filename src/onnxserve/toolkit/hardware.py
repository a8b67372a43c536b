"""What this machine offers a model: ONNX Runtime's execution providers and the CPU's vector features.

``onnxserve env`` prints it; the int8 quantizer uses it (``reduce_range`` on CPUs without VNNI, whose
8-bit multiply-add can saturate); ``onnxserve tune`` tries every provider listed here.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import onnxruntime as ort

from onnxserve.core.cpu import cpu_budget

UNTESTED_PROVIDERS = {
    "CUDAExecutionProvider": "untested by onnxserve's test suite on this machine (no GPU was available)",
    "TensorrtExecutionProvider": "untested by onnxserve's test suite on this machine (no GPU was available)",
}
"""Providers whose results onnxserve has not measured; ``env`` says so beside them."""

SKIPPED_PROVIDERS = ("AzureExecutionProvider",)
"""Providers that run no local kernels (the Azure one calls a remote endpoint): never tuned for."""


@dataclass(frozen=True)
class CpuFeatures:
    avx2: bool
    avx512: bool
    vnni: bool  # AVX-512 VNNI or AVX-VNNI: fast int8 dot products without saturation
    amx: bool  # Advanced Matrix Extensions (int8 / bf16 tiles)


@dataclass(frozen=True)
class Hardware:
    cpu: str
    architecture: str
    cpus: int  # CPUs this process may use (affinity and cgroup quota)
    features: CpuFeatures
    providers: tuple[str, ...]
    onnxruntime: str

    @property
    def local_providers(self) -> tuple[str, ...]:
        """Providers that run on this machine (what ``tune`` tries)."""
        return tuple(p for p in self.providers if p not in SKIPPED_PROVIDERS)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "providers": list(self.providers)}


def features_from_flags(flags: set[str]) -> CpuFeatures:
    """CPU features from py-cpuinfo's flag names (which vary a little between kernels and versions)."""
    return CpuFeatures(
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni=bool(flags & {"avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni"}),
        amx=bool(flags & {"amx_int8", "amx_tile", "amx_bf16", "amxint8", "amxtile", "amxbf16"}),
    )


@lru_cache(maxsize=1)
def detect() -> Hardware:
    """This machine (cached: py-cpuinfo takes a moment)."""
    import cpuinfo  # type: ignore[import-untyped]  # py-cpuinfo ships no type hints

    info = cpuinfo.get_cpu_info()
    flags = {str(f).lower() for f in info.get("flags", [])}
    return Hardware(
        cpu=str(info.get("brand_raw") or platform.processor() or "unknown"),
        architecture=str(info.get("arch_string_raw") or platform.machine()),
        cpus=cpu_budget(),
        features=features_from_flags(flags),
        providers=tuple(ort.get_available_providers()),
        onnxruntime=ort.__version__,
    )
