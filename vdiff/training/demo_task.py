"""The synthetic instruction task the demo models are trained and judged on.

Six families of one-line questions whose whole answer is a short string, and a seventh, help,
for everything else:

    add      What is {a} + {b}?        -> a+b                  (a, b: operands, below)
    sub      What is {a} - {b}?        -> a-b, maybe negative  (a, b: operands)
    reverse  Reverse: {w}              -> w reversed           (3..8 lowercase letters)
    sort     Sort: {x1} {x2} ...       -> ascending, spaced    (3..6 numbers in 0..50)
    count    Count from {a} to {b}     -> a a+1 ... b          (2..10 numbers, a <= 99)
    spell    Spell: {w}                -> w's letters, spaced  (3..10 lowercase letters)
    help     anything else             -> `HELP_ANSWER`

An operand has one or two digits with equal chance, then a uniform value (0..9 or 10..99), so
the single-digit sums a newcomer asks first are a quarter of all sums, not 1%. Count starts
near 99 a quarter of the time, so runs across 100 are common. Help questions are greetings,
questions, other languages, random words and empty text, made from templates; any text that a
family's pattern (`FORMATS`) matches is never a help question.

Held-out split: a question is held out when a stable hash of its text falls in the held-out
bucket (1 in `HELD_OUT_BUCKETS`). Training draws reject held-out questions and evaluation draws
accept only them, so training never sees an evaluation question whatever the seeds, and no
list of questions has to be stored. The single-digit sets (`single_digit_set`) take all 100
pairs, trained or not: they are what a newcomer asks.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

FAMILIES = ("add", "sub", "reverse", "sort", "count", "spell", "help")
SINGLE_DIGIT = ("add 0-9", "sub 0-9")  # the rows of `single_digit_set`
HELD_OUT_BUCKETS = 10  # 10% of the question space is never trained on
EVAL_SEED = 20_251_126  # the fixed held-out sample of bench_quality.py and the CI test
HELP_ANSWER = "I can add, subtract, sort, reverse, count and spell. Try: What is 2 + 3?"

# What each family's questions look like; a help question matches none of them.
FORMATS = {
    "add": re.compile(r"What is \d+ \+ \d+\?"),
    "sub": re.compile(r"What is \d+ - \d+\?"),
    "reverse": re.compile(r"Reverse: [a-z]+"),
    "sort": re.compile(r"Sort:( \d+)+"),
    "count": re.compile(r"Count from \d+ to \d+"),
    "spell": re.compile(r"Spell: [a-z]+"),
}


@dataclass(frozen=True)
class Problem:
    family: str
    question: str  # the user message
    answer: str  # the whole assistant message

    def is_correct(self, reply: str) -> bool:
        return reply.strip() == self.answer


def _letters(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def operand(rng: random.Random) -> int:
    """One or two digits with equal chance, then uniform: 0..9 or 10..99."""
    return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def _add(rng: random.Random) -> Problem:
    return add_problem(operand(rng), operand(rng))


def add_problem(a: int, b: int) -> Problem:
    return Problem("add", f"What is {a} + {b}?", str(a + b))


def _sub(rng: random.Random) -> Problem:
    return sub_problem(operand(rng), operand(rng))


def sub_problem(a: int, b: int) -> Problem:
    return Problem("sub", f"What is {a} - {b}?", str(a - b))


def _reverse(rng: random.Random) -> Problem:
    word = _letters(rng, 3, 8)
    return Problem("reverse", f"Reverse: {word}", word[::-1])


def _sort(rng: random.Random) -> Problem:
    numbers = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
    question = "Sort: " + " ".join(map(str, numbers))
    return Problem("sort", question, " ".join(map(str, sorted(numbers))))


def _count(rng: random.Random) -> Problem:
    a = rng.randint(90, 99) if rng.random() < 0.25 else operand(rng)
    b = a + rng.randint(1, 9)
    return Problem("count", f"Count from {a} to {b}", " ".join(str(n) for n in range(a, b + 1)))


def _spell(rng: random.Random) -> Problem:
    word = _letters(rng, 3, 10)
    return Problem("spell", f"Spell: {word}", " ".join(word))


# The help family's material: what people type to a model they have just started.
GREETINGS = (
    "hello", "hi", "hey", "hi there", "hello there", "good morning", "good evening",
    "good afternoon", "howdy", "greetings", "yo", "hey you", "hiya", "morning",
)  # fmt: skip
QUESTIONS = (
    "who are you", "what are you", "what can you do", "how are you", "what is your name",
    "can you help me", "help", "how does this work", "tell me a joke", "why is the sky blue",
    "what is love", "what time is it", "what is the weather like", "are you there",
    "what is the capital of france", "write a poem", "explain diffusion models", "thanks",
    "what is this", "do you speak english", "how old are you", "where am i", "test",
    "what is 2 plus 2", "what is two plus two", "count to ten", "sort these numbers",
    "reverse this word", "spell my name", "can you add", "what is the answer", "ok", "yes", "no",
)  # fmt: skip
FOREIGN = (
    "bonjour", "salut", "hola", "buenos dias", "hallo", "guten tag", "ciao", "ola", "hej",
    "comment ca va", "como estas", "wie geht es dir", "come stai", "qui es-tu", "quien eres",
    "wer bist du", "chi sei", "konnichiwa", "ni hao", "privet", "namaste", "merci", "gracias",
    "danke", "?????", "??", "?? ??", "??????",  # scripts the character tokenizer reads as '?'
)  # fmt: skip
WORDS = (
    "the", "cat", "dog", "model", "number", "please", "world", "water", "blue", "house", "what",
    "time", "run", "quick", "brown", "fox", "data", "code", "server", "apple", "tree", "green",
    "book", "music", "light", "city", "river", "small", "big", "happy", "night", "day", "why",
    "how", "train", "phone", "table", "chair", "sun", "moon", "star", "car", "road", "food",
)  # fmt: skip


def _styled(text: str, rng: random.Random) -> str:
    """The same words as people type them: capitalised or not, shouted, with or without punctuation."""
    style = rng.random()
    if style < 0.45:
        text = text[:1].upper() + text[1:]
    elif style < 0.55:
        text = text.upper()
    return text + rng.choice(("", "", "?", "!", ".", " ?", "!!"))


def _help_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        return _styled(rng.choice(GREETINGS), rng)
    if kind < 0.45:
        return _styled(rng.choice(QUESTIONS), rng)
    if kind < 0.55:
        return _styled(f"{rng.choice(GREETINGS)}, {rng.choice(QUESTIONS)}", rng)
    if kind < 0.7:
        return _styled(rng.choice(FOREIGN), rng)
    if kind < 0.85:
        return _styled(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))), rng)
    if kind < 0.97:
        return " ".join(_letters(rng, 1, 8) for _ in range(rng.randint(1, 4)))
    return rng.choice(("", " ", "?", "!", "..."))


def is_task_question(text: str) -> bool:
    return any(pattern.fullmatch(text) for pattern in FORMATS.values())


def _help(rng: random.Random) -> Problem:
    while True:
        text = _help_text(rng)
        if not is_task_question(text):
            return Problem("help", text, HELP_ANSWER)


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "add": _add,
    "sub": _sub,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "spell": _spell,
    "help": _help,
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


def single_digit_set() -> list[Problem]:
    """All 100 sums and all 100 differences of two single digits, as rows "add 0-9", "sub 0-9"."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    sums = [replace(add_problem(a, b), family=SINGLE_DIGIT[0]) for a, b in pairs]
    return sums + [replace(sub_problem(a, b), family=SINGLE_DIGIT[1]) for a, b in pairs]


def accuracy_by_family(problems: Sequence[Problem], replies: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per family, plus "mean" over the task's families present.

    Rows outside `FAMILIES` (the single-digit sets) are reported but left out of the mean, which
    stays the mean of held-out families.
    """
    hits: dict[str, list[bool]] = {}
    for problem, reply in zip(problems, replies, strict=True):
        hits.setdefault(problem.family, []).append(problem.is_correct(reply))
    result = {family: sum(h) / len(h) for family, h in hits.items()}
    in_mean = [value for family, value in result.items() if family in FAMILIES]
    if in_mean:
        result["mean"] = sum(in_mean) / len(in_mean)
    return result


def parse_weights(text: str) -> dict[str, float]:
    """'add=3,sub=3,sort=3' -> weights; families left out get 1."""
    weights = dict.fromkeys(FAMILIES, 1.0)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in weights:
            families = ", ".join(FAMILIES)
            raise ValueError(f"unknown family {name!r} in the data mix (families: {families})")
        weights[name] = float(value)
    return weights
