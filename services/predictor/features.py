"""Prompt → model inputs: hashed word n-grams plus a few dense length features (train and serve share it)."""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import numpy as np

# Numbers become shape tokens ("<d3>" for a 3-digit number): output length often
# depends on how big a number is (spelling it out), rarely on its exact digits.
_TOKEN = re.compile(r"\d+|[^\W\d_]+|[^\w\s]")
# ChatML (SmolLM2's template): the last user turn is the request; the system turn is constant.
_LAST_USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", re.DOTALL)


def user_text(text: str) -> str:
    """The user's message inside a chat-templated prompt (the text unchanged when not templated).

    Training rows may hold raw or templated prompts and the gateway sends templated
    ones; reading only the user turn makes both give the same features.
    """
    if "<|im_start|>" not in text:
        return text
    turns = _LAST_USER_TURN.findall(text)
    return turns[-1] if turns else text
NUM_DENSE = 8


@dataclass(frozen=True)
class Featurizer:
    """Deterministic featurizer; its fields are stored in the model's metadata.json.

    crc32, not hash(): Python salts str hashes per process, so bucket ids would
    differ between the trainer and the server.
    """

    num_buckets: int = 1 << 15
    max_ngrams: int = 512
    # Extra tokens per number of <= 6 digits: each digit with its place ("p2=5" in 253).
    # Spelled-out and formatted lengths are close to additive over places.
    digit_places: bool = True

    def __post_init__(self) -> None:
        if self.num_buckets < 2 or self.max_ngrams < 2:
            raise ValueError("num_buckets and max_ngrams must be >= 2")

    def tokens(self, text: str) -> list[str]:
        out = []
        for tok in _TOKEN.findall(text.lower()):
            out.append(f"<d{min(len(tok), 12)}>" if tok[0].isdigit() else tok)
        return out

    def place_tokens(self, text: str) -> list[str]:
        if not self.digit_places:
            return []
        out = []
        for run in re.findall(r"\d+", text):
            if len(run) <= 6:
                out += [f"<p{len(run) - i}={d}>" for i, d in enumerate(run)]
        return out

    def _bucket(self, s: str) -> int:
        # Bucket 0 is padding.
        return 1 + zlib.crc32(s.encode("utf-8", "surrogatepass")) % (self.num_buckets - 1)

    def ngram_ids(self, text: str) -> list[int]:
        toks = self.tokens(text)
        grams = toks + self.place_tokens(text) + [f"{a} {b}" for a, b in zip(toks, toks[1:])]
        ids = [self._bucket(g) for g in grams]
        if len(ids) > self.max_ngrams:
            # Instructions sit at the start of a prompt, the data to transform at
            # the end: keep both ends. (Unigrams come first, so the head is unigrams.)
            half = self.max_ngrams // 2
            ids = ids[:half] + ids[-(self.max_ngrams - half):]
        return ids or [self._bucket("<empty>")]

    @staticmethod
    def dense(text: str) -> list[float]:
        digit_runs = re.findall(r"\d+", text)
        max_run = max((len(r) for r in digit_runs), default=0)
        counts = (
            len(text),
            len(text.split()),
            len(digit_runs),
            sum(len(r) for r in digit_runs),
            text.count(","),
            text.count("\n"),
            max_run,
            sum(text.count(c) for c in "[]{}\"'"),
        )
        # log1p keeps long prompts from dominating; /4 keeps values near [0, 3].
        return [math.log1p(c) / 4.0 for c in counts]

    def batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Padded n-gram ids [B, L] int64 and dense features [B, NUM_DENSE] float32."""
        texts = [user_text(t) for t in texts]
        id_lists = [self.ngram_ids(t) for t in texts]
        width = max(len(ids) for ids in id_lists)
        ids = np.zeros((len(texts), width), dtype=np.int64)  # [B, L]
        for row, seq in enumerate(id_lists):
            ids[row, : len(seq)] = seq
        dense = np.asarray([self.dense(t) for t in texts], dtype=np.float32)  # [B, F]
        return ids, dense.reshape(len(texts), NUM_DENSE)

    def to_dict(self) -> dict:
        return {"num_buckets": self.num_buckets, "max_ngrams": self.max_ngrams,
                "digit_places": self.digit_places}

    @classmethod
    def from_dict(cls, d: dict) -> "Featurizer":
        return cls(num_buckets=int(d["num_buckets"]), max_ngrams=int(d["max_ngrams"]),
                   digit_places=bool(d.get("digit_places", False)))
