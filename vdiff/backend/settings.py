"""The `parameters` of the vdiff models' config.pbtxt, typed and validated once at load.

Triton hands every parameter over as a string. An empty value, or a `${...}` placeholder that a
template left unfilled, means the default below, so the repository as committed serves the model
that ships with vdiff.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from vdiff.assets import DEFAULT_MODEL
from vdiff.config import DEFAULT_MAX_STOP_STRINGS, EngineConfig

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


@dataclass(frozen=True)
class BackendSettings:
    model: str = DEFAULT_MODEL  # a model directory, a Hub id, or the name of a shipped model
    tokenizer: str | None = None  # a separate tokenizer; the model's by default
    verifier: str | None = None  # APD's autoregressive verifier (a causal LM with the same tokenizer)
    batch_invariant: bool = False  # a request's tokens do not depend on its neighbours
    dtype: str = "auto"
    device: str = "auto"  # auto: cuda, then mps, then cpu
    trust_remote_code: bool = False
    quantization: str | None = None  # bitsandbytes, bitsandbytes-8bit or bitsandbytes-4bit
    bnb_4bit_quant_type: str | None = None  # nf4 (default) or fp4
    bnb_4bit_compute_dtype: str = "auto"
    max_num_seqs: int = 16  # requests denoised together in one forward
    max_queue_size: int = 32  # requests waiting for a slot before new ones get UNAVAILABLE
    max_num_batched_tokens: int | None = None
    torch_num_threads: int = 0  # 0: torch's default (one per core)
    seed: int = 0
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS  # stop strings one request may bring
    shutdown_timeout_s: float = 30.0  # how long unloading waits for requests in flight
    denoiser_model: str = "diffusion_denoise"  # where the detokenizer sends stop orders

    def __post_init__(self) -> None:
        for name in ("max_queue_size", "torch_num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"parameter {name} must be >= 0, got {getattr(self, name)}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"parameter shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any]) -> BackendSettings:
        """Settings from the parsed config.pbtxt (`json.loads(args["model_config"])`)."""
        raw = {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}
        hints = get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        # Upper-case keys are Triton's own (EXECUTION_ENV_PATH, FORCE_CPU_ONLY_INPUT_TENSORS, ...).
        unknown = sorted(key for key in raw if key not in names and not key.isupper())
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; known: {sorted(names)}")
        values = {}
        for name, text in raw.items():
            text = text.strip()
            if name in names and text and not text.startswith("${"):
                values[name] = _convert(name, text, hints[name])
        return cls(**values)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            tokenizer=self.tokenizer,
            dtype=self.dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            seed=self.seed,
            verifier=self.verifier,
            batch_invariant=self.batch_invariant,
            max_stop_strings=self.max_stop_strings,
            quantization=self.quantization,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype,
        )


def _convert(name: str, text: str, kind: Any) -> Any:
    if kind in (bool, bool | None):
        lowered = text.lower()
        if lowered not in _TRUE | _FALSE:
            raise ValueError(f"parameter {name} must be true or false, got {text!r}")
        return lowered in _TRUE
    for number in (int, float):
        if kind in (number, number | None):
            try:
                return number(text)
            except ValueError:
                raise ValueError(
                    f"parameter {name} must be {'an integer' if number is int else 'a number'}, got {text!r}"
                ) from None
    return text
