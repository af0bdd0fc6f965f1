"""`pipeline.model_file`: a model file loaded from its bytes (as Ray tasks get it) equals the file loaded from disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fpn import build_detector
from pipeline.model_file import ModelFileError, load_model_bytes, load_model_file, save_model_file
from tests.detection_samples import TINY_PROFILE_CONFIG as TINY


def test_bytes_load_like_the_file_and_errors_name_where_they_came_from(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_model_file(path, build_detector(TINY), TINY, [{"label": 1, "id": 1, "name": "a"}], {"run_name": "x"})
    from_file, from_bytes = load_model_file(path), load_model_bytes(path.read_bytes(), "sent bytes")
    assert from_bytes.config == from_file.config and from_bytes.extra == {"run_name": "x"}
    for (name, a), (_, b) in zip(
        from_file.model.state_dict().items(), from_bytes.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(ModelFileError, match=r"^sent bytes: not a loadable checkpoint"):
        load_model_bytes(b"not a torch file", "sent bytes")
