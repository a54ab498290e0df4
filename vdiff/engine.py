"""The diffusion engine: continuous batching at the granularity of one denoising step.

`step()` is the whole algorithm: the scheduler picks the running set, the runner runs one forward
over all their canvases, each request's decoding strategy chooses the tokens to commit, the engine
writes them into the canvas pool at once, and every request whose stable prefix (the generated
tokens before the first masked position) grew reports it. Requests join and leave between steps,
at different blocks and steps of their own schedules. A request finishes as soon as its answer
is settled: a stop token, stop string or max_tokens inside the stable prefix. Committed tokens
never change, so this early exit gives the same answer, up to and including the first stop
token, as running the schedule to its end.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from vdiff.bounds import RequestBounds
from vdiff.canvas import CanvasPool, Commits
from vdiff.canvas_stream import CanvasRecorder
from vdiff.config import BATCH_INVARIANT_QUANTIZED, EngineConfig
from vdiff.decoding import DecodingStrategy, get_strategy
from vdiff.models import Checkpoint, DiffusionLM, load_model
from vdiff.models.quantization import is_quantized
from vdiff.outputs import RequestOutput
from vdiff.request import Request
from vdiff.runner import ModelRunner, StepBatch
from vdiff.sampling_params import SamplingDefaults, SamplingParams
from vdiff.scheduler import Scheduler
from vdiff.stopping import settle
from vdiff.tokenizer import Tokenizer
from vdiff.verifier import Verifier


class Engine:
    def __init__(
        self, config: EngineConfig, model: nn.Module | None = None, tokenizer: Tokenizer | None = None
    ) -> None:
        checkpoint = Checkpoint.open(config.model)
        self.config = config
        self.model = model or load_model(
            checkpoint, config.dtype, config.device, config.trust_remote_code, config.quantization_flags
        )
        if config.batch_invariant and is_quantized(self.model):
            raise ValueError(BATCH_INVARIANT_QUANTIZED)
        self.tokenizer = tokenizer or Tokenizer.load(
            checkpoint, config.tokenizer, config.trust_remote_code, config.chat_template
        )
        self.defaults = SamplingDefaults.for_model(checkpoint.model_type, checkpoint.generation_config)
        self.vocab_size = int(checkpoint.config.get("embedding_size") or checkpoint.config["vocab_size"])
        self.max_sequence_length = cast(DiffusionLM, self.model).max_sequence_length
        self.bounds = RequestBounds(
            self.max_sequence_length, self.vocab_size, self.tokenizer.longest_token_chars, config.max_stop_strings
        )
        self.verifier = self._load_verifier(config)
        device = next(self.model.parameters()).device
        self.canvases = CanvasPool(config.max_num_seqs, self.tokenizer.special, device)
        self.runner = ModelRunner(
            self.model, self.tokenizer.special, self.canvases, self.verifier, config.batch_invariant
        )
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens)
        self.recorder = CanvasRecorder(self.tokenizer)
        self._requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []  # abort notices, returned by the next step()
        self._seeds = random.Random(config.seed)
        self._ids = itertools.count()

    @torch.inference_mode()
    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a prompt (text, tokenised without special tokens, or token ids); returns its id.

        `arrival_time` (time.perf_counter()) is when the request reached the server, if before now:
        queue time counts from it.
        """
        return self.add_admitted(self.check_request(prompt, params), request_id, arrival_time)

    def check_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Admitted:
        """Raise the ValueError `add_request` would, without queueing or allocating anything;
        else the request as admitted, every field resolved, for `add_admitted`.

        Reads only what is fixed at load, so another thread may call it while the engine steps:
        a server refuses a bad request at once instead of after the step in flight, and the
        engine's thread does not check it again.
        """
        prompt_ids = self._prompt_ids(prompt)
        return self._admit(prompt_ids, params or SamplingParams())

    @torch.inference_mode()
    def add_admitted(self, admitted: Admitted, request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request that `check_request` admitted; returns its id."""
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = self._new_request(request_id, admitted)
        request.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One denoising step for every running request; outputs for those with news."""
        outputs, self._pending = self._pending, []
        running = self.scheduler.schedule()
        if not running:
            return outputs
        for request in running:
            if request.slot is None:  # admitted by this schedule
                self.canvases.place(request)
        batch = self.runner.forward(running)
        spans = self.recorder.spans(batch.requests)  # empty unless a request streams its canvas
        try:
            commits = self._decide(batch, running)
            self.canvases.apply(batch.requests, batch.slots, commits)
            self.recorder.record(batch, spans, commits)
        except BaseException:  # schedules may have moved without their commits: end those requests
            for request in list(running):
                self.abort(request.request_id)
            raise
        outputs += self._report(batch)
        self.scheduler.retire_finished()
        return outputs

    def _decide(self, batch: StepBatch, running: list[Request]) -> Commits:
        """Every strategy's commits for this step, from the one forward."""
        commits = []
        for strategy, rows in _rows_by_strategy(running).items():
            if self.config.batch_invariant:  # each request's decisions on the shapes it has alone
                commits += [strategy.step(batch, [row]) for row in rows]
            else:
                commits.append(strategy.step(batch, rows))
        return Commits.join(commits)

    def abort(self, request_id: str) -> bool:
        """Drop a request, waiting or running; its final output (finish reason abort) comes with the next step."""
        request = self.scheduler.remove(request_id)
        if request is None:
            return False
        request.finish("abort")
        self.canvases.release(request)
        del self._requests[request_id]
        self._pending.append(_output(request, []))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    def _report(self, batch: StepBatch) -> list[RequestOutput]:
        outputs = []
        for request in batch.requests:
            settled = settle(request, request.final_length(), self.tokenizer)
            if settled is None:
                if not request.canvas_events:
                    continue
                settled = [], ""  # no new text, but the step's canvas event
            outputs.append(_output(request, *settled))
            if request.is_finished:
                self.canvases.release(request)
                del self._requests[request.request_id]
        return outputs

    def _admit(self, prompt_ids: list[int], params: SamplingParams) -> Admitted:
        """The request's resolved params, strategy and canvas size, or a ValueError naming the field."""
        self.bounds.check_params(params)  # before anything is sized by them
        params = self.defaults.apply(params, len(prompt_ids), self.max_sequence_length)
        assert params.algorithm is not None
        strategy = get_strategy(params.algorithm)
        params = strategy.resolve(params, self.defaults)
        if strategy.feeds_windows(params) and not cast(DiffusionLM, self.model).supports_kv_cache:
            what = f"cache {params.cache!r}" if params.cache != "none" else "apd_kv_window and apd_max_lookahead"
            raise ValueError(f"{what} needs a native model; this one runs the checkpoint's own code")
        gen_length = strategy.gen_length(params)
        if strategy.needs_verifier:
            self._check_verifier_fits(params.algorithm, len(prompt_ids), gen_length)
        if len(prompt_ids) + gen_length > self.max_sequence_length:
            raise ValueError(
                f"max_tokens ({params.max_tokens}, {gen_length} canvas positions) plus the prompt "
                f"({len(prompt_ids)} tokens) exceeds the model's max_sequence_length ({self.max_sequence_length})"
            )
        self.bounds.check_params(params)  # the defaults filled in are bounded too
        return Admitted(prompt_ids, params, strategy, gen_length)

    def _new_request(self, request_id: str, admitted: Admitted) -> Request:
        prompt_ids, params, strategy = admitted.prompt_ids, admitted.params, admitted.strategy
        device = self.runner.device
        special = self.tokenizer.special
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        # ignore_eos bans the end tokens (none can appear); full_canvas keeps them as padding
        ends = frozenset() if params.ignore_eos or params.full_canvas else special.stop_ids
        stop_ids = frozenset(params.stop_token_ids) | ends
        generator = torch.Generator(device=device).manual_seed(seed)
        canvas_len = len(prompt_ids) + admitted.gen_length
        return Request(request_id, prompt_ids, params, strategy, canvas_len, generator, stop_ids, special.mask)

    def _check_verifier_fits(self, algorithm: str | None, prompt_len: int, gen_length: int) -> None:
        if self.verifier is None:
            raise ValueError(
                f"algorithm {algorithm!r} needs an autoregressive verifier: start the engine with "
                "verifier=PATH (vdiff serve --verifier PATH)"
            )
        if self.verifier.max_length is not None and prompt_len + gen_length > self.verifier.max_length:
            raise ValueError(
                f"max_tokens ({gen_length}) plus the prompt ({prompt_len} tokens) exceeds the verifier's "
                f"max_position_embeddings ({self.verifier.max_length})"
            )

    def _load_verifier(self, config: EngineConfig) -> Verifier | None:
        if config.verifier is None:
            return None
        weight = next(self.model.parameters())  # the verifier runs in the diffusion model's dtype, on its device
        return Verifier.load(config.verifier, self.tokenizer, weight.dtype, weight.device)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            self.bounds.check_prompt_text(len(prompt))  # tokenizing megabytes takes seconds
        else:
            self.bounds.check_prompt_length(len(prompt))  # before a Python check per id
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.bounds.check_prompt_length(len(ids))
        if not ids:
            raise ValueError("prompt is empty; diffusion decoding needs at least one prompt token")
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"prompt_token_ids[{position}] = {token!r} is not a token id in [0, {self.vocab_size})"
                )
            if token == self.tokenizer.special.mask:
                raise ValueError(f"prompt_token_ids[{position}] is the mask token id {token}; prompts cannot hold it")
        return ids


@dataclass(frozen=True)
class Admitted:
    """What admission settled for one request: every field resolved, and its canvas positions."""

    prompt_ids: list[int]
    params: SamplingParams
    strategy: DecodingStrategy
    gen_length: int


def _rows_by_strategy(running: list[Request]) -> dict[DecodingStrategy, list[int]]:
    rows: dict[DecodingStrategy, list[int]] = {}
    for row, request in enumerate(running):
        rows.setdefault(request.strategy, []).append(row)
    return rows


def _output(request: Request, new_token_ids: list[int], new_text: str = "") -> RequestOutput:
    events, request.canvas_events = tuple(request.canvas_events), []
    return RequestOutput(
        request.request_id,
        new_token_ids,
        new_text,
        list(request.output_ids),
        request.text,
        request.nfe,
        request.finish_reason,
        request.stop_reason,
        None if request.scheduled_time is None else request.scheduled_time - request.arrival_time,
        events,
    )
