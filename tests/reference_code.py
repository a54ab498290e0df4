"""The official modeling code beside a tiny checkpoint, for the `reference` tests.

VDIFF_REFERENCE_CODE points to the official files as published with the models (see
tests/models/test_reference_equivalence.py); VDIFF_REFERENCE_CODE_PER_ROW optionally to a Dream
generation_utils.py with the later per-row `_sample`. Dtype is explicit on both sides.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from vdiff import LLM

REFERENCE = os.environ.get("VDIFF_REFERENCE_CODE")
PER_ROW = os.environ.get("VDIFF_REFERENCE_CODE_PER_ROW")
DTYPES = ["float32", "bfloat16"]


def with_reference_code(
    model_dir: Path, family: str, tmp_path: Path, source: str | None = REFERENCE, name: str | None = None
) -> Path:
    """A copy of the checkpoint with `source`/family/*.py beside it. transformers caches remote code by
    the directory's name, so a copy with other code (per-row, APD settings) needs a name of its own."""
    target = tmp_path / (name or model_dir.name)
    shutil.copytree(model_dir, target)
    for file in (Path(str(source)) / family).glob("*.py"):
        shutil.copy(file, target / file.name)
    return target


def official_model(path: Path, dtype: str = "float32") -> Any:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), trust_remote_code=True, torch_dtype=getattr(torch, dtype))
    return model.eval()


def engine(model: Path, dtype: str, **kwargs: Any) -> LLM:
    return LLM(model=model, dtype=dtype, device="cpu", **kwargs)


REQUIRES_REFERENCE = [
    pytest.mark.reference,
    pytest.mark.skipif(not REFERENCE, reason="set VDIFF_REFERENCE_CODE to the official modeling files"),
]
