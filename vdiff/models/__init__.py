"""Native diffusion-LM architectures and the Hugging Face checkpoint loader."""

from vdiff.models.base import DiffusionLM, DiffusionLMOutput, canvas_logits
from vdiff.models.checkpoint import Checkpoint, ModelLoadError
from vdiff.models.loader import load_model, select_device, select_dtype
from vdiff.models.registry import supported_model_types

__all__ = [
    "Checkpoint",
    "DiffusionLM",
    "DiffusionLMOutput",
    "ModelLoadError",
    "canvas_logits",
    "load_model",
    "select_device",
    "select_dtype",
    "supported_model_types",
]
