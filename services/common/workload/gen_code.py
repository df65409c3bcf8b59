"""Long-output generator: small Python functions from one-line specifications, checked by tests."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

_VERBS = ("compute", "get", "make", "find", "calc", "build")
_NOUNS = ("value", "total", "result", "score", "answer", "output", "amount", "data")
_LETTERS = "abcdeilmnorst"
_SAMPLE_WORDS = ("banana", "tree", "monster", "idea", "lemonade", "strawberry", "", "a", "test")


@dataclass(frozen=True)
class _Family:
    """One kind of function: spec text, canonical code, reference semantics and test inputs."""

    spec: str
    code: str
    reference: Callable[..., object]
    inputs: Callable[[random.Random], list]


def _int_lists(rng: random.Random) -> list:
    return [[[rng.randint(-20, 30) for _ in range(rng.randint(0, 8))]] for _ in range(5)]


def _families(p: dict) -> list[_Family]:
    a, b, k, c = p["a"], p["b"], p["k"], p["c"]
    return [
        _Family(f"returns {a} times x plus {b}",
                f"def {{f}}(x):\n    \"\"\"Return {a} * x + {b}.\"\"\"\n    return {a} * x + {b}",
                lambda x: a * x + b, lambda r: [[r.randint(-50, 50)] for _ in range(5)]),
        _Family(f"returns the sum of the elements of xs that are greater than {k}",
                f"def {{f}}(xs):\n    \"\"\"Return the sum of the elements of xs greater than {k}.\"\"\"\n"
                f"    total = 0\n    for x in xs:\n        if x > {k}:\n            total += x\n    return total",
                lambda xs: sum(x for x in xs if x > k), _int_lists),
        _Family(f"returns a list with every element of xs multiplied by {k}",
                f"def {{f}}(xs):\n    \"\"\"Return xs with every element multiplied by {k}.\"\"\"\n"
                f"    result = []\n    for x in xs:\n        result.append(x * {k})\n    return result",
                lambda xs: [x * k for x in xs], _int_lists),
        _Family(f"returns the number of times the letter '{c}' appears in the string s",
                f"def {{f}}(s):\n    \"\"\"Return how many times '{c}' appears in s.\"\"\"\n"
                f"    count = 0\n    for ch in s:\n        if ch == '{c}':\n            count += 1\n    return count",
                lambda s: s.count(c), lambda r: [[w] for w in r.sample(_SAMPLE_WORDS, 5)]),
        _Family(f"returns the sum of the integers from 1 to n that are divisible by {k}",
                f"def {{f}}(n):\n    \"\"\"Return the sum of the integers in 1..n divisible by {k}.\"\"\"\n"
                f"    total = 0\n    for i in range(1, n + 1):\n        if i % {k} == 0:\n            total += i\n"
                f"    return total",
                lambda n: sum(i for i in range(1, n + 1) if i % k == 0),
                lambda r: [[r.randint(0, 60)] for _ in range(5)]),
        _Family(f"returns the list of the first n multiples of {k}, starting at {k}",
                f"def {{f}}(n):\n    \"\"\"Return the first n multiples of {k}.\"\"\"\n"
                f"    result = []\n    for i in range(1, n + 1):\n        result.append(i * {k})\n    return result",
                lambda n: [i * k for i in range(1, n + 1)], lambda r: [[r.randint(0, 9)] for _ in range(5)]),
        _Family(f"returns the largest element of xs minus the smallest, or {b} if xs is empty",
                f"def {{f}}(xs):\n    \"\"\"Return max(xs) - min(xs), or {b} for an empty list.\"\"\"\n"
                f"    if not xs:\n        return {b}\n    return max(xs) - min(xs)",
                lambda xs: max(xs) - min(xs) if xs else b, _int_lists),
        _Family(f"returns the larger of a and b plus {k}",
                f"def {{f}}(a, b):\n    \"\"\"Return the larger of a and b, plus {k}.\"\"\"\n"
                f"    if a > b:\n        return a + {k}\n    return b + {k}",
                lambda x, y: max(x, y) + k, lambda r: [[r.randint(-30, 30), r.randint(-30, 30)] for _ in range(5)]),
        _Family(f"returns the strings in words that are longer than {k} characters",
                f"def {{f}}(words):\n    \"\"\"Return the words longer than {k} characters.\"\"\"\n"
                f"    result = []\n    for w in words:\n        if len(w) > {k}:\n            result.append(w)\n"
                f"    return result",
                lambda ws: [w for w in ws if len(w) > k],
                lambda r: [[r.sample(_SAMPLE_WORDS, r.randint(0, 6))] for _ in range(5)]),
        _Family(f"returns the string s repeated {k} times, separated by '-'",
                f"def {{f}}(s):\n    \"\"\"Return s repeated {k} times, joined by '-'.\"\"\"\n"
                f"    return '-'.join([s] * {k})",
                lambda s: "-".join([s] * k), lambda r: [[w] for w in r.sample(_SAMPLE_WORDS, 5)]),
    ]


def code_gen(rng: random.Random) -> tuple[str, str, dict]:
    """Spec → canonical function; meta["tests"] holds (args, expected) pairs from the reference."""
    params = {"a": rng.randint(2, 9), "b": rng.randint(1, 20), "k": rng.randint(2, 7),
              "c": rng.choice(_LETTERS)}
    family = rng.choice(_families(params))
    name = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
    prompt = (f"Write a Python function `{name}` that {family.spec}. "
              "Reply with the code only.")
    tests = [[args, family.reference(*args)] for args in family.inputs(rng)]
    return prompt, family.code.format(f=name), {"function": name, "tests": tests}
