"""The canvas pool: one buffer row per running request, commits applied once, slots reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vdiff import LLM, SamplingParams
from vdiff.canvas import MIN_WIDTH, CanvasPool, Commits
from vdiff.decoding import get_strategy
from vdiff.request import Request
from vdiff.tokenizer import SpecialTokens

MASK, PAD = 9, 0
SPECIAL = SpecialTokens(mask=MASK, eos=1, pad=PAD, eot=None)


def request(name: str, prompt: list[int], generated: int) -> Request:
    params = SamplingParams(max_tokens=generated)
    canvas_len = len(prompt) + generated
    return Request(name, prompt, params, get_strategy("low_confidence"), canvas_len, torch.Generator(),
                   frozenset(), MASK)  # fmt: skip


def test_a_placed_canvas_is_a_row_of_the_buffer_and_rows_are_right_padded() -> None:
    pool = CanvasPool(3, SPECIAL, torch.device("cpu"))
    short, long = request("a", [5, 6], 3), request("b", [7], 6)
    pool.place(short)
    pool.place(long)
    assert short.canvas.tolist() == [5, 6, MASK, MASK, MASK]
    assert short.canvas.untyped_storage().data_ptr() == pool.buffer.untyped_storage().data_ptr()
    ids, slots = pool.rows([short, long])
    assert ids.tolist() == [[5, 6, MASK, MASK, MASK, PAD, PAD], [7] + [MASK] * 6]
    assert slots.tolist() == [0, 1]
    alone, _ = pool.rows([long])
    assert alone.data_ptr() == long.canvas.data_ptr()  # a lone request's row is used in place


def test_commits_are_written_once_and_mirrored_on_the_answer_lists() -> None:
    pool = CanvasPool(2, SPECIAL, torch.device("cpu"))
    first, second = request("a", [5, 6], 3), request("b", [7], 4)
    pool.place(first)
    pool.place(second)
    _, slots = pool.rows([second, first])  # batch rows need not follow slots
    commits = Commits(torch.tensor([0, 1, 0]), torch.tensor([2, 3, 4]), torch.tensor([40, 41, 42]))
    pool.apply([second, first], slots, commits)
    assert second.canvas.tolist() == [7, MASK, 40, MASK, 42]
    assert first.canvas.tolist() == [5, 6, MASK, 41, MASK]
    assert (second.answer, first.answer) == ([MASK, 40, MASK, 42], [MASK, 41, MASK])


def test_released_slots_are_reset_and_reused_and_the_request_keeps_its_canvas() -> None:
    pool = CanvasPool(1, SPECIAL, torch.device("cpu"))
    done, after = request("a", [5], 3), request("b", [8, 8], 1)
    pool.place(done)
    pool.apply([done], pool.rows([done])[1], Commits(torch.tensor([0]), torch.tensor([1]), torch.tensor([30])))
    pool.release(done)
    assert done.slot is None and done.canvas.tolist() == [5, 30, MASK, MASK]
    assert pool.buffer[0].eq(PAD).all()
    pool.place(after)
    assert after.slot == 0 and after.canvas.tolist() == [8, 8, MASK]
    assert done.canvas.tolist() == [5, 30, MASK, MASK]  # a copy, not the reused row


def test_the_buffer_widens_for_a_longer_canvas_and_keeps_what_it_holds() -> None:
    pool = CanvasPool(2, SPECIAL, torch.device("cpu"))
    small, big = request("a", [5], 3), request("b", [6], MIN_WIDTH * 3)
    pool.place(small)
    pool.apply([small], pool.rows([small])[1], Commits(torch.tensor([0]), torch.tensor([2]), torch.tensor([31])))
    pool.place(big)
    assert pool.buffer.shape[1] >= big.canvas_len
    assert small.canvas.tolist() == [5, MASK, 31, MASK]
    assert small.canvas.data_ptr() == pool.buffer[0].data_ptr()  # re-pointed at the new buffer
    assert big.canvas.shape == (big.canvas_len,)


def test_the_engine_gives_slots_to_running_requests_only_and_frees_them(tiny_llada: Path) -> None:
    llm = LLM(model=tiny_llada, max_num_seqs=2)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, steps=8, full_canvas=True, temperature=0.0)
    for i in range(3):
        engine.add_request([5 + i, 9, 13], params, request_id=f"r{i}")
    held = []
    while engine.has_unfinished():
        engine.step()
        running = engine.scheduler.running
        held.append(sorted(r.slot for r in running if r.slot is not None))
        assert all(r.slot is None for r in engine.scheduler.waiting)
        assert all(r.canvas.data_ptr() == engine.canvases.buffer[r.slot].data_ptr() for r in running)
    assert held[0] == [0, 1] and [] in held[-1:]
    assert engine.canvases.buffer.eq(engine.canvases.pad_id).all()


def test_an_abort_after_the_buffer_widened_in_a_step_frees_the_slot(tiny_llada: Path) -> None:
    """The engine steps in inference mode (so the widened buffer is an inference tensor) and
    servers abort from outside it."""
    engine = LLM(model=tiny_llada, max_num_seqs=2).engine
    long = SamplingParams(max_tokens=3 * MIN_WIDTH, steps=3 * MIN_WIDTH, full_canvas=True)
    engine.add_request([5, 9, 13], long, request_id="long")
    engine.add_request([6, 9, 13], SamplingParams(max_tokens=8, steps=8), request_id="short")
    engine.step()
    assert engine.canvases.buffer.shape[1] > MIN_WIDTH and torch.is_inference(engine.canvases.buffer)
    assert engine.abort("long")
    assert engine.canvases.buffer[0].eq(engine.canvases.pad_id).all()
    while engine.has_unfinished():
        engine.step()


def test_a_step_that_fails_mid_decision_ends_its_requests_and_the_engine_serves_on(
    tiny_llada: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A strategy that raises (an out-of-memory, say) after another advanced its schedules: the
    running requests end as aborted, their slots free, and later requests run normally."""
    llm = LLM(model=tiny_llada, max_num_seqs=4)
    engine = llm.engine
    engine.add_request([5, 9, 13], SamplingParams(max_tokens=8, steps=8), request_id="schedule")
    engine.add_request([6, 9, 13], SamplingParams(algorithm="entropy", max_tokens=8, steps=8), request_id="dream-like")
    engine.step()

    def fail(batch: object, rows: list[int]) -> None:
        raise MemoryError("out of memory in a strategy")

    monkeypatch.setattr(get_strategy("entropy"), "step", fail)
    with pytest.raises(MemoryError):
        engine.step()
    monkeypatch.undo()
    assert not engine.scheduler.running and engine.canvases.buffer.eq(engine.canvases.pad_id).all()
    assert {o.finish_reason for o in engine.step()} == {"abort"}
    out = llm.generate([[7, 9, 13]], SamplingParams(max_tokens=8, steps=8))[0]
    assert out.finish_reason in ("stop", "length") and out.token_ids
