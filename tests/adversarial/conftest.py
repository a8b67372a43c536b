from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.append(str(Path(__file__).parents[2]))  # the repository root: bench/ (its process tools)


@pytest.fixture(scope="session")
def wide_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT whose attention is wide (one layer, 8 heads, 512 positions), so that its attention,
    not its weights, takes the memory, as in a real encoder: ``repository/wide/1``, the only model of
    its repository folder, exported for feature-extraction with mean pooling. Exported once for the
    session: its users only read it."""
    import tiny_text_models

    root = tmp_path_factory.mktemp("wide")
    return tiny_text_models.tiny_bert_version(root, "repository/wide/1", layers=1, heads=8, positions=512)
