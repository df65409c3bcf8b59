"""Short-answer generators: numbers spelled out in words (en, fr) and one-step word problems."""
from __future__ import annotations

import math
import random

from num2words import num2words

from services.common.workload.vocab import FIRST_NAMES, ITEMS

_EN_TEMPLATES = (
    "Write the number {n} in English words.",
    "Spell out {n} in English words.",
    "How is {n} written in English words?",
    "Convert {n} to English words.",
)
_FR_TEMPLATES = (
    "Write the number {n} in French words.",
    "Spell out {n} in French words.",
    "How is {n} written in French words?",
    "Convert {n} to French words.",
)


def _number(rng: random.Random) -> int:
    # Log-uniform over 0..999,999 so short and long spellings are both common.
    return int(math.exp(rng.uniform(0.0, math.log(1_000_000)))) - 1


def num2words_en(rng: random.Random) -> tuple[str, str, dict]:
    n = _number(rng)
    return rng.choice(_EN_TEMPLATES).format(n=n), num2words(n, lang="en"), {}


def num2words_fr(rng: random.Random) -> tuple[str, str, dict]:
    n = _number(rng)
    return rng.choice(_FR_TEMPLATES).format(n=n), num2words(n, lang="fr"), {}


def arith(rng: random.Random) -> tuple[str, str, dict]:
    """A one-operation word problem; the answer is a bare integer."""
    name, item = rng.choice(FIRST_NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        text, answer = f"{name} has {a} {item}s and buys {b} more. How many {item}s does {name} have now?", a + b
    elif kind == 1:
        a = rng.randint(5, 60)
        b = rng.randint(1, a - 1)
        text, answer = f"{name} has {a} {item}s and gives away {b}. How many {item}s are left?", a - b
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        text, answer = f"{name} fills {a} boxes with {b} {item}s each. How many {item}s are there in total?", a * b
    else:
        b, q = rng.randint(2, 9), rng.randint(2, 10)
        text, answer = (f"{name} shares {b * q} {item}s equally among {b} friends. "
                        f"How many {item}s does each friend get?"), q
    return f"{text} Answer with the number only.", str(answer), {}
