"""The default mode's guarantee, stated as what it is (batch-invariant mode: test_batching.py).

A row's logits in a right-padded batch equal its logits alone within LOGIT_RTOL times the row's
largest |logit|, per dtype. At temperature 0 a request's tokens therefore equal its tokens alone,
except where a decision was a near tie at that tolerance: two proposals whose logits, or two
positions whose confidences, lie within reach of the difference.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import LOGIT_RTOL, EngineFactory
from vdiff import LLM, SamplingParams
from vdiff.models import canvas_logits
from vdiff.request import Request
from vdiff.training.demo_task import held_out_set

# LOGIT_RTOL (tests/conftest.py): measured over 150 random batches of 2-16 canvases of 3-250 tokens
# (tiny LLaDA and Dream, the demo model), at most 8.3e-6 in float32 and 0.10 in bfloat16; the
# bounds keep a margin over that.


def padded_batch(canvases: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids right-padded with id 0 and the (B, L) keep mask: what the runner feeds."""
    longest = max(map(len, canvases))
    ids = torch.zeros(len(canvases), longest, dtype=torch.long)
    keep = torch.zeros(len(canvases), longest, dtype=torch.bool)
    for row, canvas in enumerate(canvases):
        ids[row, : len(canvas)] = torch.tensor(canvas)
        keep[row, : len(canvas)] = True
    return ids, keep


@pytest.mark.parametrize("model", ["llada", "dream", "vdiff-demo"])
def test_batched_logits_equal_alone_logits_within_the_stated_tolerance(
    engines: EngineFactory, dtype: str, model: str
) -> None:
    net = (LLM(model="vdiff-demo", dtype=dtype) if model == "vdiff-demo" else engines(model, dtype)).model
    rng = random.Random(0)
    vocab = 120 if model == "vdiff-demo" else 380
    worst = 0.0
    with torch.inference_mode():
        for _ in range(12):
            canvases = [[rng.randrange(1, vocab) for _ in range(rng.randint(3, 100))] for _ in range(8)]
            ids, keep = padded_batch(canvases)
            together = net(ids, attention_mask=keep).logits.float()
            for row, canvas in enumerate(canvases):
                alone = net(torch.tensor([canvas])).logits.float()[0]  # (L, V)
                scale = alone.abs().amax(-1, keepdim=True)
                worst = max(worst, float(((together[row, : len(canvas)] - alone).abs() / scale).max()))
    assert worst <= LOGIT_RTOL[dtype]


def trace(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> list[list[torch.Tensor]]:
    """Each request's canvas after every step it took part in, with all of them in one batch."""
    engine = llm.engine
    tracked: list[Request] = []
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(prompt, params, request_id=f"t{i}")
        tracked.append(engine._requests[f"t{i}"])
    mask_id = llm.tokenizer.special.mask
    canvases = [[torch.tensor(r.prompt_ids + [mask_id] * r.gen_length)] for r in tracked]
    while engine.has_unfinished():
        engine.step()
        for request, history in zip(tracked, canvases, strict=True):
            if request.slot is None and not request.is_finished:
                continue  # still waiting: no canvas yet
            if not torch.equal(request.canvas, history[-1]):
                history.append(request.canvas.clone())
    return canvases


def near_tie(llm: LLM, before: torch.Tensor, after: torch.Tensor, prompt_len: int, block: int) -> bool:
    """Whether the step from `before` (alone) was a near tie at the stated tolerance: a proposal's
    top two logits, or the last committed and the first passed-over confidence, within reach."""
    mask_id = llm.tokenizer.special.mask
    with torch.inference_mode():
        logits = canvas_logits(llm.model(before[None]).logits, llm.model.logits_shift)[0].float()
    first_mask = int((before == mask_id).nonzero()[0])
    block_end = prompt_len + ((first_mask - prompt_len) // block + 1) * block
    candidates = (before == mask_id).nonzero().squeeze(1)
    candidates = candidates[candidates < block_end]
    rows = logits[candidates]  # (n, V)
    delta = LOGIT_RTOL[str(llm.model.dtype).removeprefix("torch.")] * rows.abs().amax(-1)  # (n,)
    top2 = rows.topk(2, dim=-1).values
    if bool((top2[:, 0] - top2[:, 1] <= 2 * delta).any()):
        return True
    confidence = torch.softmax(rows, dim=-1).amax(-1).sort(descending=True).values
    committed = int((after[candidates] != mask_id).sum())
    if committed >= len(confidence):
        return False
    reach = math.expm1(2 * float(delta.max()))  # how far a probability can move when logits move by delta
    return float(confidence[committed - 1] - confidence[committed]) <= reach


def test_default_mode_tokens_differ_from_alone_only_at_near_ties(dtype: str) -> None:
    """The demo model at temperature 0, blocks of 16, one token per step: 48 held-out questions with
    canvases of 16-64 answer positions in one batch, and each alone; wherever the answers part (in
    bfloat16 one of them did when this was written, in float32 none), the first step at which they
    part was a near tie alone."""
    llm = LLM(model="vdiff-demo", dtype=dtype, max_num_seqs=48)
    tokenizer, block, rng = llm.tokenizer, 16, random.Random(0)
    requests = []
    for problem in held_out_set(10)[:48]:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": problem.question}])
        length = rng.choice([16, 32, 48, 64])
        params = SamplingParams(max_tokens=length, steps=length, block_length=block, temperature=0.0, full_canvas=True)
        requests.append((tokenizer.encode(chat), params))
    together = trace(llm, requests)
    parted = 0
    for (prompt, params), batched in zip(requests, together, strict=True):
        (alone,) = trace(llm, [(prompt, params)])
        step = next((i for i, (a, b) in enumerate(zip(alone, batched, strict=False)) if not torch.equal(a, b)), None)
        if step is None:
            continue
        parted += 1
        assert near_tie(llm, alone[step - 1], alone[step], len(prompt), block), f"parted at step {step}"
    assert parted <= len(requests) // 4  # most answers never part
