"""What completions and chat share: the model check, request checks, starting the choices, stream usage, SSE."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from vdiff_client.calls import Call
from vdiff_client.capacity import CapacityGate, Reservation
from vdiff_client.config import ProxyConfig
from vdiff_client.errors import APIError, model_not_found
from vdiff_client.generation import Generation, Prompt, make_jobs
from vdiff_client.limits import check_limits
from vdiff_client.metrics import ProxyMetrics
from vdiff_client.protocol import SamplingFields, StreamOptions
from vdiff_client.ratelimit import RateLimiter, TokenCharge
from vdiff_client.responses import UsageInfo, usage
from vdiff_client.sampling import check_context, check_sampling, check_supported, ensemble_values
from vdiff_client.tokenizer import ProxyTokenizer
from vdiff_client.triton import Delta, TritonBackend

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


class Serving:
    def __init__(
        self,
        config: ProxyConfig,
        backend: TritonBackend,
        tokenizer: ProxyTokenizer,
        metrics: ProxyMetrics,
        limiter: RateLimiter | None = None,
        capacity: CapacityGate | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.limiter = limiter
        self.capacity = capacity or CapacityGate(backend)  # the server passes one for all servings

    def check_model(self, name: str | None) -> None:
        """An empty or missing model means the served one, as in vLLM."""
        if name and name not in self.config.served_model_names:
            raise model_not_found(name)

    def check_request(self, request: SamplingFields, max_tokens: int | None) -> None:
        """Refused features, vLLM's sampling rules and this server's limits, before any tokenizing."""
        check_supported(request)
        check_sampling(request, max_tokens, self.config.sampling_defaults)
        check_limits(request, max_tokens, self.config.limits, self.tokenizer.max_model_len)
        self.tokenizer.check_ids(request.stop_token_ids or [], "stop_token_ids")  # the ensemble input is INT32

    async def start_reserved(
        self,
        request: SamplingFields,
        call: Call,
        request_id: str,
        max_tokens: int | None,
        count: int,
        tokenize: Callable[[], Awaitable[list[Prompt]]],
    ) -> tuple[Generation, list[Prompt]]:
        """Engine slots for n choices of `count` prompts, then the prompts, then the generation.

        The generation releases the slots when it ends; a refusal on the way releases them at once.
        """
        reservation = await self.reserve(request.n, count)
        try:
            prompts = await tokenize()
            return self.start(request, call, request_id, prompts, max_tokens, reservation), prompts
        except BaseException:
            reservation.release()
            raise

    async def reserve(self, n: int, prompts: int) -> Reservation:
        try:
            return await self.capacity.reserve(n, prompts)
        except APIError as error:
            if error.status == 503:
                self.metrics.rejected("capacity")
            raise

    def start(
        self,
        request: SamplingFields,
        call: Call,
        request_id: str,
        prompts: list[Prompt],
        max_tokens: int | None,
        reservation: Reservation,
    ) -> Generation:
        """The n choices of each prompt, after the context check and the token budget, ready to run on Triton."""
        for prompt in prompts:
            check_context(len(prompt.ids), max_tokens, self.tokenizer.max_model_len)
        charge = self.charge_tokens(call, prompts, request.n, max_tokens)
        jobs = make_jobs(
            request_id, prompts, request.n, lambda p, i: ensemble_values(request, p.ids, max_tokens, i, self.config)
        )
        tracker = self.metrics.track(request.n, len(jobs), max_tokens)
        return Generation(self.backend, jobs, tracker, call, charge, reservation)

    def charge_tokens(self, call: Call, prompts: list[Prompt], n: int, max_tokens: int | None) -> TokenCharge:
        """The client's token budget pays for the prompts and, per choice, the most it may generate."""
        default = max_tokens or self.config.sampling_defaults.get("max_tokens")
        room = [self.tokenizer.max_model_len - len(p.ids) for p in prompts]
        max_generated = n * sum(min(default, r) if default else r for r in room)
        prompt_tokens = sum(len(p.ids) for p in prompts)
        if self.limiter is None:
            return TokenCharge(None, prompt_tokens, max_generated)
        try:
            return self.limiter.charge_tokens(call.client, prompt_tokens, max_generated)
        except APIError:
            self.metrics.rejected("rate_limit_tokens")
            raise

    def stream_usage_wanted(self, request: SamplingFields) -> bool:
        options = request.stream_options
        return self.config.enable_force_include_usage or bool(options and options.include_usage)


class StreamUsage:
    """Token counts of a streamed answer: per-chunk usage (continuous_usage_stats) and the final chunk."""

    def __init__(self, include: bool, options: StreamOptions | None, prompt_lengths: list[int], n: int) -> None:
        self.include = include
        self.continuous_stats = bool(options and options.continuous_usage_stats)
        self.prompt_lengths = prompt_lengths
        self.n = n
        self.completion = [0] * (len(prompt_lengths) * n)

    def add(self, index: int, delta: Delta) -> None:
        self.completion[index] += delta.new_tokens

    def continuous(self, index: int) -> UsageInfo | None:
        if not (self.include and self.continuous_stats):
            return None
        return usage(self.prompt_lengths[index // self.n], self.completion[index])

    def final(self) -> UsageInfo | None:
        return usage(sum(self.prompt_lengths), sum(self.completion)) if self.include else None


async def sse_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """`data: {json}` events ending with `data: [DONE]`; an error after the start becomes an event too."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk}\n\n"
    except APIError as error:
        yield f"data: {error.body().model_dump_json()}\n\n"
    except Exception as error:  # the stream has started: report in-band, keep serving
        log.exception("stream failed")
        yield f"data: {APIError(500, f'internal server error: {type(error).__name__}').body().model_dump_json()}\n\n"
    yield DONE
