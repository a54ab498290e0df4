"""Render the model repository for one deployment: a copy whose config parameters are filled in.

The committed repository (model_repository/, also inside the package) serves the shipped model as
is; `vdiff serve` copies it to a work directory and sets the `parameters` entries it is given
(model, dtype, max_num_seqs, ...) in every config.pbtxt that declares them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "model_repository"
MODELS = ("tokenizer", "diffusion_denoise", "detokenizer", "vdiff")

# { key: "max_num_seqs" value: { string_value: "16" } }
_PARAMETER = re.compile(r'(\{\s*key:\s*"(?P<key>[^"]+)"\s*value:\s*\{\s*string_value:\s*)"(?:[^"\\]|\\.)*"')


def render_repository(target: Path, parameters: Mapping[str, str], source: Path = SOURCE) -> Path:
    """Copy `source` to `target` (replaced) with `parameters` set; every key must be declared somewhere."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    unused = set(parameters)
    for config in sorted(target.glob("*/config.pbtxt")):
        text, used = set_parameters(config.read_text(), parameters)
        config.write_text(text)
        unused -= used
    if unused:
        raise ValueError(f"no model of {source} declares the parameters {sorted(unused)}")
    return target


def set_parameters(config: str, parameters: Mapping[str, str]) -> tuple[str, set[str]]:
    """The config text with the declared `parameters` set, and which of them it declares."""
    used: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        key = match["key"]
        if key not in parameters:
            return match.group(0)
        used.add(key)
        return match.group(1) + json.dumps(str(parameters[key]), ensure_ascii=False)  # a valid pbtxt string

    return _PARAMETER.sub(replace, config), used


def read_parameters(config: str) -> dict[str, str]:
    """The `parameters` of a config.pbtxt, as Triton hands them to the model."""
    return {match["key"]: json.loads(match.group(0)[len(match.group(1)) :]) for match in _PARAMETER.finditer(config)}
