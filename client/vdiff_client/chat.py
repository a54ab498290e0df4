"""POST /v1/chat/completions: messages -> chat template -> choices, as one body or an SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from vdiff_client.calls import Call
from vdiff_client.errors import bad_request
from vdiff_client.generation import Event, Generation, Prompt
from vdiff_client.protocol import ChatCompletionRequest, ChatMessage, TextPart, TokenizeRequest
from vdiff_client.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatStreamChoice,
    DeltaMessage,
    now,
    random_id,
    usage,
)
from vdiff_client.serving import Serving, StreamUsage, sse_stream
from vdiff_client.tokenizer import ProxyTokenizer

MESSAGE_OVERHEAD = 16  # characters a template adds around each message (role, separators)


def message_text(content: str | list[TextPart] | None) -> str:
    """A message's content as one string: text parts are joined with newlines, as vLLM does."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, part in enumerate(content):
        if part.type != "text":
            raise bad_request(f"content part {index} has type '{part.type}'; only text parts are supported", "messages")
        if part.text is None:
            raise bad_request(f"content part {index} has type 'text' but no 'text' field", "messages")
        texts.append(part.text)
    return "\n".join(texts)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [
        {"role": m.role, "content": message_text(m.content)} | ({"name": m.name} if m.name else {}) for m in messages
    ]


def render_messages(
    tokenizer: ProxyTokenizer, request: ChatCompletionRequest | TokenizeRequest, messages: list[ChatMessage]
) -> str:
    """The prompt text of a chat (completions and /tokenize take the same template options)."""
    return tokenizer.render_chat(
        template_messages(messages),
        request.add_generation_prompt,
        request.continue_final_message,
        request.chat_template,
        request.chat_template_kwargs,
    )


def messages_size(messages: list[ChatMessage]) -> int:
    """About the characters a template renders from `messages`, known before rendering them."""
    return sum(content_chars(m.content) + MESSAGE_OVERHEAD for m in messages)


def content_chars(content: str | list[TextPart] | None) -> int:
    """The characters of `message_text(content)`, without building it."""
    if content is None or isinstance(content, str):
        return len(content or "")
    return sum(len(part.text or "") + 1 for part in content)


class ChatServing(Serving):
    async def prompts(self, request: ChatCompletionRequest) -> list[Prompt]:
        """The rendered and tokenized conversation, in one job off the event loop."""
        if not request.messages:
            raise bad_request("messages must hold at least one message", "messages")

        def render_and_encode() -> list[Prompt]:
            text = render_messages(self.tokenizer, request, request.messages)
            return [Prompt(self.tokenizer.encode_prompt(text, request.add_special_tokens), text)]

        return await self.tokenizer.run(messages_size(request.messages), render_and_encode)

    def role(self, request: ChatCompletionRequest) -> str:
        return self.config.response_role if request.add_generation_prompt else request.messages[-1].role

    def echo_text(self, request: ChatCompletionRequest, role: str) -> str:
        """With `echo`, the last message's content when it is the response role's (vLLM's rule)."""
        last = request.messages[-1]
        return message_text(last.content) if request.echo and last.role == role else ""

    async def generation(
        self, request: ChatCompletionRequest, call: Call, request_id: str
    ) -> tuple[Generation, Prompt]:
        max_tokens = request.max_new_tokens()
        self.check_request(request, max_tokens)
        generation, prompts = await self.start_reserved(
            request, call, request_id, max_tokens, 1, lambda: self.prompts(request)
        )
        return generation, prompts[0]

    async def create(
        self, request: ChatCompletionRequest, call: Call, request_id: str
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(request.model)
        request_id = f"chatcmpl-{request_id}" if request_id else random_id("chatcmpl")
        generation, prompt = await self.generation(request, call, request_id)
        role = self.role(request)
        if request.stream:
            events = await generation.started()
            return sse_stream(self._chunks(request, request_id, prompt, role, events))
        results = await generation.collect()
        echo = self.echo_text(request, role)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(role=role, content=echo + r.text),
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
                canvas=r.canvas,
            )
            for i, r in enumerate(results)
        ]
        completion_tokens = sum(r.completion_tokens for r in results)
        return ChatCompletionResponse(
            id=request_id,
            model=self.config.model_name,
            choices=choices,
            usage=usage(len(prompt.ids), completion_tokens),
        )

    async def _chunks(
        self, request: ChatCompletionRequest, request_id: str, prompt: Prompt, role: str, events: AsyncIterator[Event]
    ) -> AsyncIterator[str]:
        created = now()
        counts = StreamUsage(self.stream_usage_wanted(request), request.stream_options, [len(prompt.ids)], request.n)

        def chunk(choice: ChatStreamChoice, index: int | None = None) -> str:
            body = ChatCompletionStreamResponse(
                id=request_id,
                object="chat.completion.chunk",  # set explicitly: unset fields are left out of chat chunks
                created=created,
                model=self.config.model_name,
                choices=[choice],
            )
            stats = counts.continuous(index) if index is not None else None
            if stats is not None:
                body.usage = stats
            return body.model_dump_json(exclude_unset=True)

        echo = self.echo_text(request, role)
        for index in range(request.n):
            first = DeltaMessage(role=role, content=echo)
            yield chunk(ChatStreamChoice(index=index, delta=first, logprobs=None, finish_reason=None))
        async for index, delta in events:
            counts.add(index, delta)
            choice = ChatStreamChoice(index=index, delta=DeltaMessage(content=delta.text))
            if delta.canvas:
                choice.canvas = delta.canvas
            if delta.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            elif not delta.text and not delta.canvas:
                continue  # nothing to say yet
            yield chunk(choice, index)
        final = counts.final()
        if final is not None:
            yield ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.config.model_name, choices=[], usage=final
            ).model_dump_json(exclude_none=True)
