"""``onnxserve env``'s facts: providers from ONNX Runtime, CPU features from py-cpuinfo's flags."""

from __future__ import annotations

import cpuinfo
import onnxruntime as ort

from onnxserve.toolkit.hardware import detect, features_from_flags
from onnxserve.toolkit.quantize import settings_for


def test_features_from_flags() -> None:
    assert features_from_flags({"avx2"}) == features_from_flags({"avx2", "sse4_2"})
    plain = features_from_flags({"avx", "avx2"})
    assert (plain.avx2, plain.avx512, plain.vnni, plain.amx) == (True, False, False, False)
    server = features_from_flags({"avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"})
    assert (server.avx2, server.avx512, server.vnni, server.amx) == (True, True, True, True)
    assert features_from_flags({"avx2", "avx_vnni"}).vnni  # client CPUs: VNNI without AVX-512


def test_detect_reports_this_machine() -> None:
    hw = detect()
    assert hw.providers == tuple(ort.get_available_providers())
    assert "CPUExecutionProvider" in hw.local_providers
    assert "AzureExecutionProvider" not in hw.local_providers
    flags = set(cpuinfo.get_cpu_info().get("flags", []))
    assert hw.features.avx2 == ("avx2" in flags)
    assert hw.cpus >= 1


def test_reduce_range_only_without_vnni() -> None:
    assert settings_for("int8").reduce_range == (not detect().features.vnni)
    assert settings_for("int8", reduce_range=True).reduce_range is True
