"""The demo task: the issue's exact formats and ranges, a held-out split training never draws, determinism."""

from __future__ import annotations

import random
import re

import pytest

from vdiff.training.demo_task import (
    FAMILIES,
    GENERATORS,
    TrainingStream,
    accuracy_by_family,
    held_out_set,
    is_held_out,
    parse_weights,
)

FORMATS = {
    "add": r"What is (\d+) \+ (\d+)\?",
    "sub": r"What is (\d+) - (\d+)\?",
    "reverse": r"Reverse: ([a-z]+)",
    "sort": r"Sort: ((?:\d+ )*\d+)",
    "count": r"Count from (\d+) to (\d+)",
    "spell": r"Spell: ([a-z]+)",
}


def expected_answer(family: str, groups: tuple[str, ...]) -> str:
    if family in ("add", "sub", "count"):
        a, b = map(int, groups)
        assert 0 <= a <= 99 and 0 <= b <= 99 + 9
        if family == "add":
            return str(a + b)
        if family == "sub":
            assert b <= a
            return str(a - b)
        assert a < b <= a + 9
        return " ".join(str(n) for n in range(a, b + 1))
    (text,) = groups
    if family == "sort":
        numbers = [int(n) for n in text.split()]
        assert 3 <= len(numbers) <= 6 and all(0 <= n <= 50 for n in numbers)
        return " ".join(map(str, sorted(numbers)))
    low, high = (3, 8) if family == "reverse" else (3, 10)
    assert low <= len(text) <= high
    return text[::-1] if family == "reverse" else " ".join(text)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_keeps_the_issues_format_and_ranges(family: str) -> None:
    rng = random.Random(family)
    for _ in range(500):
        problem = GENERATORS[family](rng)
        match = re.fullmatch(FORMATS[family], problem.question)
        assert match, problem.question
        assert problem.family == family and problem.answer == expected_answer(family, match.groups())


def test_training_never_draws_a_held_out_question() -> None:
    stream = TrainingStream(seed=3, weights=parse_weights(""))
    drawn = [p.question for _ in range(40) for p in stream.batch(64)]
    assert not any(is_held_out(q) for q in drawn)
    held = held_out_set(per_family=20)
    assert all(is_held_out(p.question) for p in held) and not set(drawn) & {p.question for p in held}


def test_held_out_set_is_fixed_distinct_and_family_by_family() -> None:
    first, again = held_out_set(per_family=10), held_out_set(per_family=10)
    assert first == again
    assert [p.family for p in first] == [f for f in FAMILIES for _ in range(10)]
    assert len({p.question for p in first}) == 60


def test_stream_is_deterministic_for_a_seed_and_follows_the_weights() -> None:
    one, two = TrainingStream(7, parse_weights("add=3")), TrainingStream(7, parse_weights("add=3"))
    assert one.batch(32) == two.batch(32)
    families = [p.family for p in TrainingStream(1, parse_weights("add=8,sub=0")).batch(2000)]
    assert "sub" not in families and 0.5 < families.count("add") / len(families) < 0.75


def test_data_mix_refuses_unknown_families() -> None:
    with pytest.raises(ValueError, match="unknown family 'mul'"):
        parse_weights("mul=2")
    with pytest.raises(ValueError, match="unknown families"):
        TrainingStream(0, {"mul": 1.0})


def test_accuracy_is_exact_match_per_family_after_trimming_whitespace() -> None:
    problems = held_out_set(per_family=1)
    replies = [f" {p.answer}\n" if p.family != "add" else p.answer + "0" for p in problems]
    accuracy = accuracy_by_family(problems, replies)
    assert accuracy["add"] == 0.0 and all(accuracy[f] == 1.0 for f in FAMILIES if f != "add")
    assert accuracy["mean"] == pytest.approx(5 / 6)
