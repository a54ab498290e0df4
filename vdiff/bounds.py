"""The most one request may ask for, derived from the model and the engine's configuration.

Every field that sizes memory or time is checked here before anything is allocated for it:
the engine applies these bounds when it admits a request (`Engine.check_request`), and the
Triton models apply the input-size ones before they turn tensors into Python values, so the
bound holds whoever calls (the OpenAI proxy, the ensemble over gRPC, `diffusion_denoise`
directly). A request inside them can run: its canvas fits the model, and its steps are at most
the model's positions (the cost of the longest request the model admits).
"""

from __future__ import annotations

from dataclasses import dataclass

from vdiff.config import DEFAULT_MAX_STOP_STRINGS
from vdiff.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestBounds:
    max_sequence_length: int  # prompt plus canvas positions the model takes
    vocab_size: int  # token ids run from 0 to vocab_size - 1
    longest_token_chars: int  # no token stands for more characters than its vocabulary entry
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS  # EngineConfig checked it

    def __post_init__(self) -> None:
        for name in ("max_sequence_length", "vocab_size", "longest_token_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_sequence_length - 1  # diffusion needs at least one canvas position

    @property
    def max_prompt_chars(self) -> int:
        """A longer text holds more tokens than a prompt may have: refused before tokenizing."""
        return self.max_prompt_tokens * self.longest_token_chars

    @property
    def max_stop_chars(self) -> int:
        """A longer stop string can never match: no answer has that many characters."""
        return self.max_sequence_length * self.longest_token_chars

    def check_params(self, params: SamplingParams) -> None:
        """Refuse, naming the field, any value that sizes work beyond what the model can hold."""
        positions = self.max_sequence_length  # max_tokens: the engine checks prompt plus canvas
        for name in ("steps", "block_length", "apd_kv_window", "apd_max_lookahead"):
            value = getattr(params, name)
            if value is not None and value > positions:
                raise ValueError(f"{name} must be at most the model's max_sequence_length ({positions}), got {value}")
        self.check_stop_counts(len(params.stop), len(params.stop_token_ids))
        for text in params.stop:
            if len(text) > self.max_stop_chars:
                raise ValueError(
                    f"stop strings must be at most {self.max_stop_chars} characters (the longest "
                    f"answer this model can write), got one of {len(text)}"
                )
        for token in params.stop_token_ids:
            if token >= self.vocab_size:
                raise ValueError(f"stop_token_ids must be token ids in [0, {self.vocab_size}), got {token}")

    def check_stop_counts(self, strings: int, token_ids: int) -> None:
        if strings > self.max_stop_strings:
            raise ValueError(f"stop holds {strings} strings; this server takes at most {self.max_stop_strings}")
        if token_ids > self.vocab_size:
            raise ValueError(f"stop_token_ids holds {token_ids} ids, more than the vocabulary's {self.vocab_size}")

    def check_prompt_length(self, tokens: int) -> None:
        if tokens > self.max_prompt_tokens:
            raise ValueError(
                f"prompt_token_ids holds {tokens} tokens; the model's max_sequence_length "
                f"({self.max_sequence_length}) leaves room for at most {self.max_prompt_tokens}"
            )

    def check_prompt_text(self, chars: int) -> None:
        """Before tokenizing: a text this long holds more tokens than a prompt may have."""
        if chars > self.max_prompt_chars:
            raise ValueError(
                f"prompt is {chars} characters: at {self.longest_token_chars} characters per token "
                f"at most, more than the {self.max_prompt_tokens} tokens the model's "
                f"max_sequence_length ({self.max_sequence_length}) leaves for a prompt"
            )
