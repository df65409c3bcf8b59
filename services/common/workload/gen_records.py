"""Medium-length generators: field extraction to JSON and one-sentence table summaries."""
from __future__ import annotations

import json
import random

from services.common.workload.vocab import CITIES, FIRST_NAMES, JOBS, LAST_NAMES, PRODUCTS

_SENTENCES = (
    "{name}, aged {age}, lives in {city} and works as {a_job}.",
    "{name} is {a_age}-year-old {job} from {city}.",
    "Meet {name}: {a_job} based in {city}, {age} years old.",
    "At {age}, {name} works as {a_job} in {city}.",
    "The {job} {name} ({age}) has lived in {city} for years.",
    "{name} moved to {city} to work as {a_job} at the age of {age}.",
)


def _article(word: str) -> str:
    # "an" before vowel sounds: vowels, and ages 18, 80-89 ("an eighty-year-old").
    vowel = word[0] in "aeiou" or word == "18" or word.startswith("8")
    return ("an " if vowel else "a ") + word


def json_extract(rng: random.Random) -> tuple[str, str, dict]:
    record = {"name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
              "age": rng.randint(18, 90), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    text = rng.choice(_SENTENCES).format(**record, a_job=_article(record["job"]),
                                         a_age=_article(str(record["age"])))
    prompt = ("Extract the person's name, age, city and job from the text below. Reply with a "
              f"JSON object with keys name, age, city, job.\nText: {text}")
    return prompt, json.dumps(record), {}


def table_summary(rng: random.Random) -> tuple[str, str, dict]:
    """A sales table of 3-6 rows; the summary names the best and worst seller with their counts."""
    num_rows = rng.randint(3, 6)
    products = rng.sample(PRODUCTS, num_rows)
    units = rng.sample(range(10, 1000), num_rows)  # distinct, so best and worst are unique
    store = rng.choice(CITIES)
    rows = "\n".join(f"| {p} | {u} |" for p, u in zip(products, units))
    prompt = (f"Summarize this table of weekly sales at the {store} store in one sentence, naming the "
              f"best and the worst seller with their units.\n| product | units |\n|---|---|\n{rows}")
    hi = max(range(num_rows), key=units.__getitem__)
    lo = min(range(num_rows), key=units.__getitem__)
    completion = (f"At the {store} store, {products[hi]} sold best with {units[hi]} units and "
                  f"{products[lo]} sold worst with {units[lo]} units.")
    facts = [products[hi], str(units[hi]), products[lo], str(units[lo])]
    distractors = [x for i in range(num_rows) if i not in (hi, lo) for x in (products[i], str(units[i]))]
    return prompt, completion, {"facts": facts, "distractors": distractors}
