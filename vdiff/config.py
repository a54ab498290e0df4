"""Engine configuration: frozen, typed, validated where it is built."""

from __future__ import annotations

from dataclasses import dataclass

from vdiff.models.quantization import QuantizationFlags

DEFAULT_MAX_STOP_STRINGS = 64  # the proxy's --max-stop-sequences default
BATCH_INVARIANT_QUANTIZED = (
    "batch_invariant cannot be combined with bitsandbytes quantization: its kernels choose their "
    "path by the number of rows, which batch-invariant mode exists to rule out"
)


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None  # a separate tokenizer directory or hub id; the model's by default
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    chat_template: str | None = None  # a Jinja template or a file holding one, replacing the model's
    max_num_seqs: int = 16  # requests that share one forward pass
    max_num_batched_tokens: int | None = None  # cap on (rows x longest canvas) of one forward
    seed: int = 0  # seeds the per-request RNG of requests that bring no seed
    verifier: str | None = None  # APD's autoregressive verifier: a causal LM sharing the tokenizer
    # a request's tokens do not depend on its neighbours (vdiff/models/invariant.py), at some speed
    batch_invariant: bool = False
    # stop strings one request may bring (vdiff serve --max-stop-sequences)
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    # bitsandbytes at load, as vLLM's --quantization: bitsandbytes (4-bit NF4), bitsandbytes-8bit,
    # bitsandbytes-4bit; a checkpoint quantized with bitsandbytes needs none of these
    quantization: str | None = None
    bnb_4bit_quant_type: str | None = None  # nf4 (default) or fp4
    bnb_4bit_compute_dtype: str = "auto"  # auto: the model's dtype

    @property
    def quantization_flags(self) -> QuantizationFlags | None:
        return QuantizationFlags.parse(self.quantization, self.bnb_4bit_quant_type, self.bnb_4bit_compute_dtype)

    def __post_init__(self) -> None:
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        if self.max_num_batched_tokens is not None and (
            not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1
        ):
            raise ValueError(f"max_num_batched_tokens must be an integer >= 1, got {self.max_num_batched_tokens!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant must be true or false, got {self.batch_invariant!r}")
        stops = self.max_stop_strings
        if isinstance(stops, bool) or not isinstance(stops, int) or stops < 1:
            raise ValueError(f"max_stop_strings must be an integer >= 1, got {stops!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.quantization_flags is not None and self.batch_invariant:
            raise ValueError(BATCH_INVARIANT_QUANTIZED)
