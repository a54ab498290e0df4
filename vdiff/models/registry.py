"""model_type -> native implementation, as a declarative table.

Native modules use the checkpoint's own parameter names, so loading is an identity mapping;
what differs per architecture is declared here: where the class and its config live, and which
checkpoint keys carry no parameter (buffers older exports saved).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json "model_type", matched exactly
    module: str
    class_name: str
    config_class: str
    ignored_keys: tuple[str, ...] = ()  # regexes of checkpoint keys that hold no parameter
    head_modules: tuple[str, ...] = ()  # the LM head's module; quantization leaves it as it is

    def build(self, raw_config: dict[str, Any]) -> nn.Module:
        module = importlib.import_module(self.module)
        configs = importlib.import_module("vdiff.models.configs")
        config = getattr(configs, self.config_class).from_hf(raw_config)
        model: nn.Module = getattr(module, self.class_name)(config)
        return model


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture(
            "llada", "vdiff.models.llada", "LLaDAModelLM", "LLaDAConfig", head_modules=("model.transformer.ff_out",)
        ),
        Architecture(
            "Dream",
            "vdiff.models.dream",
            "DreamModel",
            "DreamConfig",
            ignored_keys=(r"\.rotary_emb\.inv_freq$",),
            head_modules=("lm_head",),
        ),
    )
}


def native_architecture(model_type: str) -> Architecture | None:
    return ARCHITECTURES.get(model_type)


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)
