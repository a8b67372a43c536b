"""The gRPC message code is generated from the committed .proto, and its field numbers match the reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import model_config_pb2, service_pb2

from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as ours

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_not_stale() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_grpc.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def fields(descriptor: Descriptor) -> dict[str, tuple[int, int, bool]]:
    return {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}


def reference(name: str) -> Descriptor:
    for module in (service_pb2, model_config_pb2):
        found = module.DESCRIPTOR.message_types_by_name.get(name)
        if found is not None:
            return found
    raise KeyError(name)


def all_messages(descriptor: Descriptor, prefix: str = "") -> list[tuple[str, Descriptor]]:
    found = [(prefix + descriptor.name, descriptor)]
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            found += all_messages(nested, prefix + descriptor.name + ".")
    return found


OUR_MESSAGES = [pair for d in ours.DESCRIPTOR.message_types_by_name.values() for pair in all_messages(d)]


@pytest.mark.parametrize(("path", "descriptor"), OUR_MESSAGES, ids=[p for p, _ in OUR_MESSAGES])
def test_every_field_matches_the_reference_protocol(path: str, descriptor: Descriptor) -> None:
    top, *nested = path.split(".")
    theirs = reference(top)
    for name in nested:
        theirs = theirs.nested_types_by_name[name]
    mine = fields(descriptor)
    reference_fields = fields(theirs)
    for name, spec in mine.items():
        assert reference_fields.get(name) == spec, f"{path}.{name}: ours {spec}, reference {reference_fields.get(name)}"


def test_datatype_enum_matches() -> None:
    mine = {v.name: v.number for v in ours.DESCRIPTOR.enum_types_by_name["DataType"].values}
    theirs = {v.name: v.number for v in model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values}
    assert mine == theirs
