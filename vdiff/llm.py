"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, params)` and `.chat(...)`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from torch import nn

from vdiff.assets import DEFAULT_MODEL
from vdiff.canvas_stream import CanvasEvent
from vdiff.config import EngineConfig
from vdiff.engine import Engine
from vdiff.outputs import GenerationOutput, RequestOutput
from vdiff.sampling_params import SamplingParams, as_params_list
from vdiff.tokenizer import Tokenizer

Prompt: TypeAlias = str | Sequence[int] | Mapping[str, Any]  # text, token ids, or {"prompt_token_ids": [...]}
Message: TypeAlias = Mapping[str, Any]


class LLM:
    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int | None = None,
        seed: int = 0,
        verifier: str | os.PathLike[str] | None = None,
        batch_invariant: bool = False,
        quantization: str | None = None,
        bnb_4bit_quant_type: str | None = None,
        bnb_4bit_compute_dtype: str = "auto",
    ) -> None:
        config = EngineConfig(
            str(model), tokenizer, dtype, device, trust_remote_code, chat_template,
            max_num_seqs, max_num_batched_tokens, seed, None if verifier is None else str(verifier),
            batch_invariant, quantization=quantization, bnb_4bit_quant_type=bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
        )  # fmt: skip
        self.engine = Engine(config)

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """One finished output per prompt, in order. No chat template is applied."""
        batch: list[Prompt] = [prompts] if _is_single_prompt(prompts) else list(prompts)  # type: ignore[list-item,arg-type]
        params = as_params_list(sampling_params, len(batch))
        ids, texts = zip(*(self._prompt_ids(p) for p in batch), strict=True) if batch else ((), ())
        request_ids = self._add_all(ids, params)
        finals, canvases = self._run_to_completion(set(request_ids))
        return [
            _generation_output(finals[r], t, list(i), tuple(canvases.get(r, ())))
            for r, t, i in zip(request_ids, texts, ids, strict=True)
        ]

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """Generate replies to one conversation or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else messages
        prompts = [self.tokenizer.apply_chat_template(list(c)) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def _add_all(self, prompt_ids: Sequence[list[int]], params: list[SamplingParams]) -> list[str]:
        """Queue every prompt, or none: a bad prompt or parameter withdraws the ones already queued."""
        added: list[str] = []
        try:
            for ids, p in zip(prompt_ids, params, strict=True):
                added.append(self.engine.add_request(ids, p))
        except ValueError:
            for request_id in added:
                self.engine.abort(request_id)
            raise
        return added

    def _prompt_ids(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" not in prompt:
                raise ValueError(f"a dict prompt needs 'prompt_token_ids', got keys {sorted(prompt)}")
            return list(prompt["prompt_token_ids"]), None
        return list(prompt), None

    def _run_to_completion(
        self, request_ids: set[str]
    ) -> tuple[dict[str, RequestOutput], dict[str, list[CanvasEvent]]]:
        """Each request's final output, and the canvas events of those that stream them."""
        finals: dict[str, RequestOutput] = {}
        canvases: dict[str, list[CanvasEvent]] = {}
        while len(finals) < len(request_ids):
            for output in self.engine.step():
                if output.request_id not in request_ids:
                    continue
                if output.canvas:
                    canvases.setdefault(output.request_id, []).extend(output.canvas)
                if output.finished:
                    finals[output.request_id] = output
        return finals, canvases


def _is_single_prompt(prompts: object) -> bool:
    if isinstance(prompts, str | Mapping):
        return True
    return isinstance(prompts, Sequence) and bool(prompts) and isinstance(prompts[0], int)


def _generation_output(
    final: RequestOutput, prompt: str | None, prompt_ids: list[int], canvas: tuple[CanvasEvent, ...]
) -> GenerationOutput:
    assert final.finish_reason is not None
    return GenerationOutput(
        final.request_id,
        prompt,
        prompt_ids,
        final.text,
        final.token_ids,
        final.finish_reason,
        final.nfe,
        final.stop_reason,
        canvas,
    )
