"""Long-output generator: sort a list of words into a numbered list."""
from __future__ import annotations

import random

from services.common.workload.vocab import WORDS


def sort_list(rng: random.Random) -> tuple[str, str, dict]:
    """4-20 distinct words, sorted alphabetically, one numbered line each (output grows with the list)."""
    words = rng.sample(WORDS, rng.randint(4, 20))
    prompt = ("Sort these words alphabetically and write them as a numbered list, one per line:\n"
              + ", ".join(words))
    completion = "\n".join(f"{i}. {w}" for i, w in enumerate(sorted(words), 1))
    return prompt, completion, {}
