"""The synthetic instruction task the demo models are trained and judged on.

Six families of one-line questions whose whole answer is a short string:

    add      What is {a} + {b}?        -> a+b                  (a, b in 0..99)
    sub      What is {a} - {b}?        -> a-b                  (0 <= b <= a <= 99)
    reverse  Reverse: {w}              -> w reversed           (3..8 lowercase letters)
    sort     Sort: {x1} {x2} ...       -> ascending, spaced    (3..6 numbers in 0..50)
    count    Count from {a} to {b}     -> a a+1 ... b          (0 <= a <= 99, a < b <= a+9)
    spell    Spell: {w}                -> w's letters, spaced  (3..10 lowercase letters)

Held-out split: a question is held out when a stable hash of its text falls in the held-out
bucket (1 in `HELD_OUT_BUCKETS`). Training draws reject held-out questions and evaluation draws
accept only them, so training never sees an evaluation question whatever the seeds, and no
list of questions has to be stored.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

FAMILIES = ("add", "sub", "reverse", "sort", "count", "spell")
HELD_OUT_BUCKETS = 10  # 10% of the question space is never trained on
EVAL_SEED = 20_251_126  # the fixed held-out sample of bench_quality.py and the CI test


@dataclass(frozen=True)
class Problem:
    family: str
    question: str  # the user message
    answer: str  # the whole assistant message

    def is_correct(self, reply: str) -> bool:
        return reply.strip() == self.answer


def _letters(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def _add(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Problem("add", f"What is {a} + {b}?", str(a + b))


def _sub(rng: random.Random) -> Problem:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return Problem("sub", f"What is {a} - {b}?", str(a - b))


def _reverse(rng: random.Random) -> Problem:
    word = _letters(rng, 3, 8)
    return Problem("reverse", f"Reverse: {word}", word[::-1])


def _sort(rng: random.Random) -> Problem:
    numbers = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
    return Problem("sort", "Sort: " + " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers))))


def _count(rng: random.Random) -> Problem:
    a = rng.randint(0, 99)
    b = rng.randint(a + 1, a + 9)
    return Problem("count", f"Count from {a} to {b}", " ".join(str(n) for n in range(a, b + 1)))


def _spell(rng: random.Random) -> Problem:
    word = _letters(rng, 3, 10)
    return Problem("spell", f"Spell: {word}", " ".join(word))


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "add": _add,
    "sub": _sub,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "spell": _spell,
}


def is_held_out(question: str) -> bool:
    digest = hashlib.blake2b(question.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_BUCKETS == 0


def draw(family: str, rng: random.Random, held_out: bool) -> Problem:
    """One question of `family` from the training side or the held-out side of the split."""
    while True:
        problem = GENERATORS[family](rng)
        if is_held_out(problem.question) == held_out:
            return problem


class TrainingStream:
    """An endless, seeded stream of training problems, families drawn by `weights`."""

    def __init__(self, seed: int, weights: Mapping[str, float]) -> None:
        unknown = set(weights) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown families in the data mix: {sorted(unknown)}")
        self.rng = random.Random(seed)
        self.families = [f for f in FAMILIES if weights.get(f, 0) > 0]
        self.weights = [weights[f] for f in self.families]

    def batch(self, size: int) -> list[Problem]:
        families = self.rng.choices(self.families, self.weights, k=size)
        return [draw(f, self.rng, held_out=False) for f in families]


def held_out_set(per_family: int, seed: int = EVAL_SEED) -> list[Problem]:
    """A fixed held-out sample: `per_family` distinct questions of each family, family by family."""
    rng = random.Random(seed)
    problems: list[Problem] = []
    for family in FAMILIES:
        seen: set[str] = set()
        while len(seen) < per_family:
            problem = draw(family, rng, held_out=True)
            if problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
    return problems


def accuracy_by_family(problems: Sequence[Problem], replies: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per family, plus "mean" over the families present."""
    hits: dict[str, list[bool]] = {}
    for problem, reply in zip(problems, replies, strict=True):
        hits.setdefault(problem.family, []).append(problem.is_correct(reply))
    result = {family: sum(h) / len(h) for family, h in hits.items()}
    result["mean"] = sum(result.values()) / len(result)
    return result


def parse_weights(text: str) -> dict[str, float]:
    """'add=3,sub=3,sort=3' -> weights; families left out get 1."""
    weights = dict.fromkeys(FAMILIES, 1.0)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in weights:
            raise ValueError(f"unknown family {name!r} in the data mix (families: {', '.join(FAMILIES)})")
        weights[name] = float(value)
    return weights
