"""The decoding-strategy interface and the registry that maps algorithm names to strategies.

A strategy owns one family of schedules: it resolves the parameters it reads, sets up a request's
schedule when the request is admitted, names the canvas window whose logits its next step reads
(the whole canvas unless the request caches), and once per engine step chooses the tokens to
commit on the canvases of all its requests from one shared forward pass, returned as `Commits`
that the engine applies. Strategies are stateless: `start` returns the request's own progress as
a typed `StrategyState` that the Request carries (blocks and their plan, diffusion times, APD's
cursor and verifier cache), so one instance serves every request that names it. The engine and
the scheduler only ever call these methods, so new strategies (threshold decoding, cached
forwards, APD) slot in without touching either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, TypeVar

from vdiff.kv_cache import Window

if TYPE_CHECKING:
    from vdiff.canvas import Commits
    from vdiff.request import Request
    from vdiff.runner import StepBatch
    from vdiff.sampling_params import SamplingDefaults, SamplingParams


class StrategyState:
    """One request's progress through its strategy's schedule; each strategy subclasses it."""


ST = TypeVar("ST", bound=StrategyState)


def state_of(request: Request, kind: type[ST]) -> ST:
    """The request's state, as the strategy that started it made it."""
    state = request.state
    assert isinstance(state, kind), f"{request.request_id} carries {type(state).__name__}, not {kind.__name__}"
    return state


class DecodingStrategy(ABC):
    name: ClassVar[str]  # the SamplingParams.algorithm value that selects it
    needs_verifier: ClassVar[bool] = False  # True: the engine must hold an autoregressive verifier

    @abstractmethod
    def resolve(self, params: SamplingParams, defaults: SamplingDefaults) -> SamplingParams:
        """Fill the fields this algorithm reads; raise ValueError for fields it cannot honour."""

    @abstractmethod
    def gen_length(self, params: SamplingParams) -> int:
        """Generated canvas positions for resolved params (max_tokens, rounded up if the schedule needs it)."""

    @abstractmethod
    def start(self, request: Request) -> StrategyState:
        """The schedule of a newly admitted request, at its beginning."""

    def window(self, request: Request) -> Window:
        """The canvas positions the next forward feeds for this request and the keys they attend to."""
        return Window(0, request.canvas_len, request.canvas_len)

    def span(self, request: Request) -> tuple[int, int]:
        """[start, end): the canvas positions the next step may commit (the canvas stream's span)."""
        return request.prompt_len, request.canvas_len

    def drafts(self, request: Request) -> tuple[int, list[int]] | None:
        """The last step's drafted tokens and the position of the first, for strategies that draft
        more than they commit (APD); None for the others."""
        return None

    def keeps_cache(self, params: SamplingParams) -> bool:
        """Whether a request's keys and values outlive a step (a window then reads them)."""
        return params.cache != "none"

    def feeds_windows(self, params: SamplingParams) -> bool:
        """Whether a request's forwards may feed less than its canvas (which needs a native model)."""
        return self.keeps_cache(params)

    @abstractmethod
    def step(self, batch: StepBatch, rows: list[int]) -> Commits:
        """The tokens to commit on the canvases of batch.requests[rows]; advances their schedules.

        The canvases stay as they are until the engine applies the commits of every strategy."""


_REGISTRY: dict[str, DecodingStrategy] = {}
S = TypeVar("S", bound=type[DecodingStrategy])


def register(cls: S) -> S:
    _REGISTRY[cls.name] = cls()
    return cls


def get_strategy(name: str) -> DecodingStrategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"algorithm must be one of {algorithm_names()}, got {name!r}") from None


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)


def refuse_apd_fields(params: SamplingParams, algorithm: str) -> None:
    if params.apd_fields:  # the message starts with one field's name, so that servers can name the input
        name = next(iter(params.apd_fields))
        raise ValueError(f"{name} applies to algorithm 'apd', not to {algorithm!r}")
