"""The demo task: the issue's exact formats and ranges, a held-out split training never draws, determinism."""

from __future__ import annotations

import random
import re

import pytest

from vdiff.training.demo_task import (
    FAMILIES,
    GENERATORS,
    HELP_ANSWER,
    SINGLE_DIGIT,
    TrainingStream,
    accuracy_by_family,
    held_out_set,
    is_held_out,
    is_task_question,
    parse_weights,
    single_digit_set,
)

FORMATS = {  # the formats as the issues state them, written out again here
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


@pytest.mark.parametrize("family", FORMATS)
def test_every_family_keeps_the_issues_format_and_ranges(family: str) -> None:
    rng = random.Random(family)
    for _ in range(500):
        problem = GENERATORS[family](rng)
        match = re.fullmatch(FORMATS[family], problem.question)
        assert match, problem.question
        assert problem.family == family and problem.answer == expected_answer(family, match.groups())


def test_operands_are_single_digit_as_often_as_two_digit() -> None:
    rng = random.Random(5)
    for family in ("add", "sub"):
        operands = [int(n) for _ in range(4000) for n in re.findall(r"\d+", GENERATORS[family](rng).question)]
        share = sum(n <= 9 for n in operands) / len(operands)
        assert 0.45 < share < 0.55, (family, share)
        assert set(range(100)) <= set(operands)  # every value of both sizes occurs
    differences = [int(GENERATORS["sub"](rng).answer) for _ in range(2000)]
    assert min(differences) < 0 < max(differences)  # a smaller minus a larger is asked too


def test_count_runs_are_short_and_long_and_cross_100() -> None:
    rng = random.Random(6)
    runs = [[int(n) for n in GENERATORS["count"](rng).answer.split()] for _ in range(4000)]
    assert {len(run) for run in runs} == set(range(2, 11))
    crossing = [run for run in runs if run[0] <= 99 < run[-1]]
    assert len(crossing) / len(runs) > 0.1
    assert [95, 96, 97, 98, 99, 100, 101, 102, 103, 104] in runs


def test_help_questions_are_varied_and_never_a_task_question() -> None:
    rng = random.Random(7)
    problems = [GENERATORS["help"](rng) for _ in range(3000)]
    questions = {p.question for p in problems}
    assert len(questions) > 1500 and "" in questions and "Hello" in questions
    assert {p.answer for p in problems} == {HELP_ANSWER} and len(HELP_ANSWER) <= 72
    assert not any(is_task_question(q) for q in questions)
    assert any("?" in q for q in questions) and any(q.isupper() for q in questions)
    samples = [GENERATORS[f](rng).question for f in FAMILIES if f != "help" for _ in range(50)]
    assert all(is_task_question(q) for q in samples)


def test_single_digit_set_is_every_pair_once() -> None:
    problems = single_digit_set()
    sums = [p for p in problems if p.family == SINGLE_DIGIT[0]]
    diffs = [p for p in problems if p.family == SINGLE_DIGIT[1]]
    assert len(sums) == len(diffs) == 100 and len({p.question for p in problems}) == 200
    assert {p.answer for p in sums} == {str(n) for n in range(19)}
    assert {p.answer for p in diffs} == {str(n) for n in range(-9, 10)}
    by_question = {p.question: p.answer for p in problems}
    assert by_question["What is 2 + 2?"] == "4" and by_question["What is 3 - 7?"] == "-4"


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
    assert len({p.question for p in first}) == 10 * len(FAMILIES)


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
    assert accuracy["mean"] == pytest.approx(1 - 1 / len(FAMILIES))


def test_the_single_digit_rows_are_reported_but_not_in_the_mean() -> None:
    problems = held_out_set(per_family=1) + single_digit_set()
    replies = [p.answer if p.family in FAMILIES else "" for p in problems]
    accuracy = accuracy_by_family(problems, replies)
    assert accuracy[SINGLE_DIGIT[0]] == accuracy[SINGLE_DIGIT[1]] == 0.0 and accuracy["mean"] == 1.0
