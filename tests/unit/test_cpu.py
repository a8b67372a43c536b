"""Thread budgets: instances share the CPUs this process may use, a container's limit included."""

from __future__ import annotations

import os
from pathlib import Path

from onnxserve.config import ModelConfig, SessionOptions
from onnxserve.core.cpu import CGROUP_CPU_MAX, cpu_budget
from onnxserve.core.registry import instance_options


def test_budget_is_within_what_the_machine_has() -> None:
    budget = cpu_budget()
    assert 1 <= budget <= (os.cpu_count() or 1)
    assert budget <= len(os.sched_getaffinity(0))
    if CGROUP_CPU_MAX.is_file():
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            assert budget <= -(-int(quota) // int(period))


def test_instances_divide_the_budget(tmp_path: Path) -> None:
    two = instance_options(ModelConfig(name="m", base_path=tmp_path, instance_count=2))
    assert two.intra_op_num_threads == max(1, cpu_budget() // 2)
    many = instance_options(ModelConfig(name="m", base_path=tmp_path, instance_count=64))
    assert many.intra_op_num_threads == 1


def test_explicit_threads_are_kept(tmp_path: Path) -> None:
    config = ModelConfig(
        name="m", base_path=tmp_path, instance_count=2, session_options=SessionOptions(intra_op_num_threads=3)
    )
    assert instance_options(config).intra_op_num_threads == 3
