"""The trained model that ships with vdiff answers its task: the CI guard on the demo model's quality.

60 held-out problems (10 per family, never trained on) decoded the way a user gets them:
`LLM()` with no model, the checkpoint's own defaults (one token per step, low-confidence
remasking, temperature 0), float32 so that every CPU computes the same tokens.

The floors are the targets (98% on reverse, spell and count, 85% on add, sub and sort) minus 5
points. Count is the one family below its target (94% on 300 problems, 9 of 10 here), so its
floor is its own accuracy on this sample minus 5 points. perf/results/quality_vdiff-demo.md has
the 300-problem figures.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vdiff import LLM
from vdiff.assets import DEFAULT_MODEL, shipped_model
from vdiff.models import ModelLoadError
from vdiff.training.demo_task import Problem, accuracy_by_family, held_out_set
from vdiff.training.evaluate import ar_replies

TARGETS = {"add": 0.85, "sub": 0.85, "reverse": 0.98, "sort": 0.85, "count": 0.98, "spell": 0.98}
MEASURED = {"add": 1.0, "sub": 1.0, "reverse": 1.0, "sort": 0.9, "count": 0.9, "spell": 1.0}  # this sample
FLOORS = {family: min(TARGETS[family], MEASURED[family]) for family in TARGETS}
VERIFIER_MEASURED_MEAN = 0.87
MARGIN = 0.05


@pytest.fixture(scope="module")
def sample() -> list[Problem]:
    return held_out_set(per_family=10)


def test_the_default_model_is_the_trained_demo_model() -> None:
    llm = LLM(dtype="float32")
    assert DEFAULT_MODEL == llm.engine.config.model == "vdiff-demo"
    assert type(llm.model).__name__ == "LLaDAModelLM"
    (output,) = llm.chat([{"role": "user", "content": "Sort: 14 7 26 50"}])
    assert output.text == "7 14 26 50" and output.finish_reason == "stop"


def test_demo_model_accuracy_per_family_under_default_decoding(sample: list[Problem]) -> None:
    llm = LLM(dtype="float32", max_num_seqs=len(sample))
    outputs = llm.chat([[{"role": "user", "content": p.question}] for p in sample])
    accuracy = accuracy_by_family(sample, [o.text for o in outputs])
    below = {f: a for f, a in accuracy.items() if f in FLOORS and a < FLOORS[f] - MARGIN}
    assert not below, f"below the target (or the shipped accuracy) - {MARGIN:.0%}: {below} (all: {accuracy})"


def test_demo_tokenizer_is_one_token_per_character_and_normalises_non_ascii() -> None:
    tokenizer = LLM(dtype="float32").tokenizer
    text = "What is 47 + 85? Reverse: héllo ☃"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text) and tokenizer.decode(ids) == "What is 47 + 85? Reverse: hello ?"


def test_the_shipped_verifier_alone_answers_most_problems(sample: list[Problem]) -> None:
    path = shipped_model("vdiff-demo-ar")
    assert path is not None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    replies = ar_replies(model, AutoTokenizer.from_pretrained(path), [p.question for p in sample], max_new_tokens=40)
    accuracy = accuracy_by_family(sample, replies)
    assert accuracy["mean"] >= VERIFIER_MEASURED_MEAN - MARGIN, accuracy


def test_the_verifier_shares_the_demo_models_tokenizer() -> None:
    demo, verifier = (AutoTokenizer.from_pretrained(shipped_model(name)) for name in ("vdiff-demo", "vdiff-demo-ar"))
    assert demo.get_vocab() == verifier.get_vocab()
    assert demo.chat_template == verifier.chat_template
    assert (demo.eos_token_id, demo.bos_token_id) == (verifier.eos_token_id, verifier.bos_token_id)
    message = [{"role": "user", "content": "Spell: zebra"}]
    assert demo.apply_chat_template(message, add_generation_prompt=True) == verifier.apply_chat_template(
        message, add_generation_prompt=True
    )


def test_the_verifier_is_refused_as_a_diffusion_model_with_the_reason() -> None:
    with pytest.raises(ModelLoadError, match="model_type 'llama' is not supported"):
        LLM(model="vdiff-demo-ar")
