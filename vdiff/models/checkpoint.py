"""A Hugging Face model directory on disk: where it is, its configs and its weight files.

Every failure names the file (and key) at fault and what to do about it, so that a bad
download never surfaces as a traceback from deep inside torch or safetensors.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vdiff.assets import shipped_model

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# config.json keys that bound the sequence, most specific first; remote code without one gets
# the fallback
LENGTH_KEYS = ("max_sequence_length", "max_position_embeddings", "n_positions", "seq_length")
FALLBACK_MAX_LENGTH = 4096


class ModelLoadError(ValueError):
    """A model directory, config or weight file that vdiff cannot load, and why."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def max_length(self) -> int:
        """The positions config.json names (its first length key), without loading the model.

        Where it names none, remote code's fallback; a native model's own default may be smaller,
        so this is an upper bound for early checks, and the loaded model's length is the rule.
        """
        return config_max_length(self.config)

    @classmethod
    def open(cls, path_or_id: str | os.PathLike[str]) -> Checkpoint:
        path = resolve_model_dir(path_or_id)
        config = read_json(path / CONFIG_FILE)
        if not config.get("model_type"):
            raise ModelLoadError(f"{path / CONFIG_FILE} has no 'model_type'; is this a Hugging Face model directory?")
        generation = path / GENERATION_CONFIG_FILE
        return cls(path, config, read_json(generation) if generation.exists() else {})

    def weight_files(self) -> list[Path]:
        """The safetensors files to read, from the shard index when there is one."""
        index = self.path / WEIGHTS_INDEX_FILE
        if index.exists():
            return self._indexed_shards(index)
        if (self.path / SINGLE_WEIGHTS_FILE).exists():
            return [self.path / SINGLE_WEIGHTS_FILE]
        found = sorted(self.path.glob("*.safetensors"))
        if found:
            return found
        if any(self.path.glob("pytorch_model*.bin")):
            raise ModelLoadError(
                f"{self.path} holds only pytorch_model*.bin weights; vdiff loads safetensors. Convert them "
                "(load with transformers and save_pretrained(safe_serialization=True)) and try again."
            )
        raise ModelLoadError(f"{self.path} has no weights: expected {SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")

    def _indexed_shards(self, index: Path) -> list[Path]:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no 'weight_map'; the shard index is damaged")
        shards = sorted({self.path / name for name in weight_map.values()})
        missing = [shard.name for shard in shards if not shard.exists()]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are not on disk: {', '.join(missing)}")
        return shards

    def checkpoint_dtype(self) -> torch.dtype | None:
        """The dtype the checkpoint declares (`torch_dtype`, or `dtype` in newer exports)."""
        name = self.config.get("torch_dtype") or self.config.get("dtype")
        dtype = getattr(torch, str(name), None) if name else None
        return dtype if isinstance(dtype, torch.dtype) else None

    def tensors(
        self, device: torch.device, dtype: torch.dtype, as_stored: Callable[[str], bool] = lambda name: False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, cast to dtype and placed on device, one at a time;
        those `as_stored` names (quantized layers' data) stay as stored, on the CPU."""
        for file in self.weight_files():
            with _open_safetensors(file) as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    tensor = handle.get_tensor(name)
                    if as_stored(name):
                        yield name, tensor
                        continue
                    cast = dtype if tensor.is_floating_point() else tensor.dtype
                    yield name, tensor.to(device=device, dtype=cast)

    def tensor_shapes(self) -> dict[str, tuple[Path, tuple[int, ...]]]:
        """name -> (file, shape) from the file headers, without reading any tensor data."""
        shapes: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for file in self.weight_files():
            with _open_safetensors(file) as handle:
                for name in handle.keys():  # noqa: SIM118
                    shapes[name] = (file, tuple(handle.get_slice(name).get_shape()))
        return shapes


@contextlib.contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    """safe_open, with a damaged file reported by name instead of as a SafetensorError."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            yield handle
    except SafetensorError as error:
        raise ModelLoadError(f"{file} is not a readable safetensors file ({error}); re-download it") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist; is {path.parent} a Hugging Face model directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def config_max_length(config: dict[str, Any]) -> int:
    return next((int(config[k]) for k in LENGTH_KEYS if config.get(k)), FALLBACK_MAX_LENGTH)


def resolve_model_dir(path_or_id: str | os.PathLike[str]) -> Path:
    """A local directory as is, a model shipped with vdiff by name, else a Hugging Face Hub id."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    shipped = shipped_model(text)
    if shipped is not None:
        return shipped
    if path.exists():
        raise ModelLoadError(f"{text} is a file; pass the model directory that holds config.json")
    if _looks_like_hub_id(text):
        return _download_from_hub(text)
    raise ModelLoadError(f"{text} is not a directory (and not a Hugging Face Hub id of the form 'org/name')")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # the hub client raises many types: offline, 404, gated, ...
        raise ModelLoadError(
            f"{repo_id} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {error}). On a machine without network access, download it "
            f"elsewhere (`huggingface-cli download {repo_id} --local-dir DIR`) and pass DIR."
        ) from None
