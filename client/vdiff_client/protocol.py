"""OpenAI / vLLM request bodies, as vLLM's server accepts them.

Unknown fields are accepted and ignored (with a log line), as vLLM does, so clients written for
vLLM or OpenAI keep working. vLLM's sampling extras that the diffusion sampler has no use for are
declared, so that a request that *sets* one gets a 400 naming it (see `sampling.unsupported`)
instead of a silent ignore. The diffusion options carry the names of `vdiff.SamplingParams`.
What Python's json accepts but JSON has not (NaN, Infinity, lone surrogates) is refused anywhere
in a body, unknown fields included, before any field is read (`limits.refuse_non_json_values`).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vdiff_client.limits import refuse_non_json_values

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_extra_fields(self) -> OpenAIBaseModel:
        if self.model_extra:
            log.warning("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self


class RequestBody(OpenAIBaseModel):
    """A whole request body: NaN, Infinity and lone surrogates are refused before any field is read."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_non_json_values(cls, data: Any) -> Any:
        refuse_non_json_values(data)
        return data


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(OpenAIBaseModel):
    type: str = "text"


class DiffusionFields(RequestBody):
    """vdiff's sampler options (SamplingParams names), sent as extra body fields."""

    steps: int | None = None
    block_length: int | None = None
    algorithm: str | None = None
    cfg_scale: float | None = None
    alg_temp: float | None = None
    threshold: float | None = None  # Fast-dLLM's parallel decoding: commit what reaches this confidence
    factor: float | None = None  # or its factor rule
    cache: str | None = None  # Fast-dLLM's approximate KV cache: none, prefix or dual
    apd_mixture_weight: float | None = None  # APD (algorithm "apd"): R, W and M, the APD code's flags
    apd_kv_window: int | None = None
    apd_max_lookahead: int | None = None
    # the whole canvas, EOS padding included, as the published samplers decode it (not ignore_eos,
    # which bans the end tokens so that max_tokens real tokens come back, as vLLM's does)
    full_canvas: bool = False
    # every denoising step's commits, as a `canvas` list in each choice (vdiff/canvas_stream.py)
    stream_canvas: bool = False


class SamplingFields(DiffusionFields):
    """The sampling fields that completions and chat share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    n: int = 1
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's sampling extras
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    bad_words: list[str] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: int = 0
    request_id: str | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True


class TextPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None  # deprecated by OpenAI for max_completion_tokens, still honoured
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


FinishReason = Literal["stop", "length", "abort"]
