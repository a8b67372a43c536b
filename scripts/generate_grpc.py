"""Generate the Python protobuf code for the KServe V2 gRPC messages from their .proto file.

    python scripts/generate_grpc.py            # write src/onnxserve/protocols/v2_grpc/generated/grpc_service_pb2.py[i]
    python scripts/generate_grpc.py --check    # exit 1 if the committed code is stale

The output is deterministic for a given grpcio-tools version (pinned in pyproject.toml's dev extra);
a test runs --check so CI fails when the .proto changed without regenerating.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1] / "src"
PROTO = Path("onnxserve/protocols/v2_grpc/generated/grpc_service.proto")
OUTPUTS = ("grpc_service_pb2.py", "grpc_service_pb2.pyi")


def generate(into: Path) -> None:
    shutil.copytree(ROOT / PROTO.parent, into / PROTO.parent, dirs_exist_ok=True)
    code = protoc.main(
        [
            "protoc",
            f"-I{into}",
            f"--python_out={into}",
            f"--pyi_out={into}",
            f"--grpc_python_out={into}",
            str(into / PROTO),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with status {code}")


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in OUTPUTS
            if not (ROOT / PROTO.parent / name).is_file()
            or not filecmp.cmp(Path(tmp) / PROTO.parent / name, ROOT / PROTO.parent / name, shallow=False)
        ]
        if "--check" in argv:
            if stale:
                print(f"stale generated gRPC code: {', '.join(stale)}; run python scripts/generate_grpc.py")
                return 1
            print("generated gRPC code is up to date")
            return 0
        for name in OUTPUTS:
            shutil.copyfile(Path(tmp) / PROTO.parent / name, ROOT / PROTO.parent / name)
        print(f"wrote {', '.join(OUTPUTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
