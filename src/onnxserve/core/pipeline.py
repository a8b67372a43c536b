"""The pipeline spec (``onnxserve.json``) that makes an exported version folder self-describing.

It records the task, the graph's input names, labels, pooling and the tokenizer's max length, so
that the folder needs nothing else to be served as a text model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from onnxserve.errors import ConfigError

PIPELINE_FILENAME = "onnxserve.json"


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    inputs: list[str]
    outputs: list[str]
    max_length: int
    pooling: Literal["mean", "cls", "none"] = "none"
    normalize: bool = False
    labels: dict[int, str] = {}
    source: str = ""

    def write(self, folder: Path) -> Path:
        path = folder / PIPELINE_FILENAME
        path.write_bytes(orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
        return path

    @classmethod
    def read(cls, folder: Path) -> PipelineSpec | None:
        path = folder / PIPELINE_FILENAME
        if not path.is_file():
            return None
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as e:
            raise ConfigError(f"{path}: not a valid pipeline spec: {e.errors()[0]['msg']}") from None
