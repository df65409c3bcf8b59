"""Featurizer: chat-template stripping, number shapes, head+tail truncation, cross-process determinism."""
import subprocess
import sys
from pathlib import Path

import numpy as np

from services.predictor.features import NUM_DENSE, Featurizer, user_text

TEMPLATED = ("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
             "<|im_start|>user\nSort: b, a<|im_end|>\n<|im_start|>assistant\n")


def test_user_text_reads_the_last_user_turn():
    assert user_text(TEMPLATED) == "Sort: b, a"
    assert user_text("plain prompt") == "plain prompt"


def test_templated_and_raw_prompts_get_the_same_features():
    f = Featurizer()
    ids_a, dense_a = f.batch([TEMPLATED])
    ids_b, dense_b = f.batch(["Sort: b, a"])
    assert np.array_equal(ids_a, ids_b) and np.array_equal(dense_a, dense_b)


def test_numbers_become_digit_count_shapes():
    f = Featurizer(digit_places=False)
    assert f.tokens("Write 123 and 7") == ["write", "<d3>", "and", "<d1>"]
    assert f.ngram_ids("Write 123") == f.ngram_ids("Write 456")
    assert f.ngram_ids("Write 123") != f.ngram_ids("Write 4567")


def test_digit_places():
    f = Featurizer()
    assert f.place_tokens("253 and 1234567") == ["<p3=2>", "<p2=5>", "<p1=3>"]  # 7 digits: none
    assert f.ngram_ids("Write 200") != f.ngram_ids("Write 253")
    # Models saved before digit places existed load with them off.
    assert Featurizer.from_dict({"num_buckets": 8, "max_ngrams": 8}).digit_places is False


def test_truncation_keeps_head_and_tail():
    f = Featurizer(max_ngrams=8)
    ids = f.ngram_ids(" ".join(f"w{i}" for i in range(100)))
    assert len(ids) == 8
    assert ids[:4] == f.ngram_ids("w0 w1 w2 w3")[:4]


def test_batch_shapes_and_padding():
    ids, dense = Featurizer().batch(["a b c", "", "one"])
    assert ids.shape[0] == 3 and dense.shape == (3, NUM_DENSE)
    assert ids.dtype == np.int64 and dense.dtype == np.float32
    assert (ids[2, 1:] == 0).all() and ids[1, 0] != 0  # empty prompt still has one id


def test_bucket_ids_do_not_depend_on_the_process():
    code = "from services.predictor.features import Featurizer; print(Featurizer().ngram_ids('hash me 42'))"
    outs = {subprocess.check_output([sys.executable, "-c", code], text=True,
                                    cwd=Path(__file__).resolve().parents[3],
                                    env={"PYTHONHASHSEED": seed, "PATH": ""}) for seed in ("1", "2")}
    assert len(outs) == 1
