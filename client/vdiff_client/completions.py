"""POST /v1/completions: prompts (text, texts, token ids) -> choices, as one body or an SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from vdiff_client.calls import Call
from vdiff_client.errors import bad_request
from vdiff_client.generation import Event, Generation, Prompt
from vdiff_client.limits import check_at_most
from vdiff_client.protocol import CompletionRequest
from vdiff_client.responses import (
    CompletionChoice,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    now,
    random_id,
    usage,
)
from vdiff_client.sampling import check_context
from vdiff_client.serving import Serving, StreamUsage, sse_stream

EMPTY_PROMPT = "Either prompt or prompt_embeds must be provided and non-empty."
PromptItem = str | list[int]  # one prompt as sent: a text or token ids


class CompletionServing(Serving):
    def prompt_items(self, request: CompletionRequest) -> list[PromptItem]:
        """The prompts as sent (texts or id lists) within --max-prompts, untokenized."""
        raw = request.prompt
        if raw is None or raw == "" or raw == []:
            raise bad_request(EMPTY_PROMPT, "prompt")
        if isinstance(raw, str):
            items: list[PromptItem] = [raw]
        elif all(isinstance(item, int) for item in raw):
            items = [list(raw)]  # type: ignore[arg-type]
        else:
            items = list(raw)  # type: ignore[arg-type]
        check_at_most("prompt", len(items), self.config.limits.max_prompts, "the number of prompts")
        return items

    async def prompts(self, items: list[PromptItem], request: CompletionRequest) -> list[Prompt]:
        """Every prompt tokenized (or its ids checked) in one job off the event loop."""

        def tokenized() -> list[Prompt]:
            return [self._prompt(item, request) for item in items]

        return await self.tokenizer.run(sum(len(item) for item in items), tokenized)

    def _prompt(self, item: PromptItem, request: CompletionRequest) -> Prompt:
        if not item:
            raise bad_request(EMPTY_PROMPT, "prompt")
        if isinstance(item, str):
            ids = self.tokenizer.encode_prompt(item, request.add_special_tokens, "prompt")
            return Prompt(ids, item)
        check_context(len(item), None, self.tokenizer.max_model_len)  # before the per-id vocabulary check
        self.tokenizer.check_ids(item)
        return Prompt(item, self.tokenizer.decode(item) if request.echo else "")  # the text only serves echo

    async def generation(
        self, request: CompletionRequest, call: Call, request_id: str
    ) -> tuple[Generation, list[Prompt]]:
        self.check_request(request, request.max_tokens)
        items = self.prompt_items(request)
        return await self.start_reserved(
            request,
            call,
            request_id,
            request.max_tokens,
            len(items),
            lambda: self.prompts(items, request),
        )

    async def create(
        self, request: CompletionRequest, call: Call, request_id: str
    ) -> CompletionResponse | AsyncIterator[str]:
        self.check_model(request.model)
        request_id = f"cmpl-{request_id}" if request_id else random_id("cmpl")
        generation, prompts = await self.generation(request, call, request_id)
        if request.stream:
            events = await generation.started()
            return sse_stream(self._chunks(request, request_id, prompts, events))
        results = await generation.collect()
        choices = [
            CompletionChoice(
                index=i,
                text=(prompts[i // request.n].text if request.echo else "") + result.text,
                finish_reason=result.finish_reason,
                stop_reason=result.stop_reason,
                canvas=result.canvas,
            )
            for i, result in enumerate(results)
        ]
        prompt_tokens = sum(len(p.ids) for p in prompts)
        completion_tokens = sum(r.completion_tokens for r in results)
        return CompletionResponse(
            id=request_id, model=self.config.model_name, choices=choices, usage=usage(prompt_tokens, completion_tokens)
        )

    async def _chunks(
        self, request: CompletionRequest, request_id: str, prompts: list[Prompt], events: AsyncIterator[Event]
    ) -> AsyncIterator[str]:
        created = now()
        counts = StreamUsage(
            self.stream_usage_wanted(request), request.stream_options, [len(p.ids) for p in prompts], request.n
        )
        echoed: set[int] = set()
        async for index, delta in events:
            text = delta.text
            if request.echo and index not in echoed:
                echoed.add(index)
                text = prompts[index // request.n].text + text
            counts.add(index, delta)
            chunk = CompletionStreamResponse(
                id=request_id,
                created=created,
                model=self.config.model_name,
                choices=[
                    CompletionStreamChoice(
                        index=index,
                        text=text,
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                        canvas=delta.canvas,
                    )
                ],
                usage=counts.continuous(index),
            )
            yield chunk.model_dump_json()
        final = counts.final()
        if final is not None:
            yield CompletionStreamResponse(
                id=request_id, created=created, model=self.config.model_name, choices=[], usage=final
            ).model_dump_json(exclude_none=True)
