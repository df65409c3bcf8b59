"""User JSONL tasks: valid files work like built-ins; bad files fail with clear, located errors."""
from __future__ import annotations

import json

import pytest

from services.common.workload.jsonl import load_jsonl_task
from services.common.workload.metrics import get_metric
from services.common.workload.task import TaskError, get_task


def write(tmp_path, lines, name="mytask.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(n, **extra):
    return [json.dumps({"prompt": f"Say {i}", "completion": f"{i}", **extra}) for i in range(n)]


def test_valid_file_behaves_like_a_task(tmp_path):
    path = write(tmp_path, rows(200, metric="exact") + [""])
    task = get_task(str(path))
    assert task.name == "mytask" and task.metric == "exact"
    splits = {s: task.examples(s, 1000) for s in ("train", "calib", "test")}
    assert sum(len(v) for v in splits.values()) == 200
    assert all(splits.values())
    seen = [e.prompt for v in splits.values() for e in v]
    assert len(seen) == len(set(seen))
    example = splits["test"][0]
    assert get_metric(task.metric)(example.completion, example) == 1.0
    assert task.examples("test", 3) == splits["test"][:3]


def test_explicit_split_field(tmp_path):
    lines = [json.dumps({"prompt": "a", "completion": "b", "split": "test"})]
    assert load_jsonl_task(write(tmp_path, lines)).examples("test", 5)[0].prompt == "a"


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "c", "completion": '], r"mytask.jsonl:2: not valid JSON"),
    (['["a", "b"]'], r":1: expected a JSON object"),
    (['{"prompt": "a"}'], r":1: missing or empty string field 'completion'"),
    (['{"prompt": "", "completion": "b"}'], r"missing or empty string field 'prompt'"),
    (['{"prompt": "a", "completion": "b", "metric": "bleu"}'], r":1: unknown metric 'bleu'"),
    (['{"prompt": "a", "completion": "b", "metric": "code_tests"}'], r"not usable for user tasks"),
    (['{"prompt": "a", "completion": "b", "split": "dev"}'], r"unknown split 'dev'"),
    (['{"prompt": "a", "completion": "b", "metric": "exact"}',
      '{"prompt": "c", "completion": "d", "metric": "token_f1"}'], r"different metrics"),
    ([""], r"holds no examples"),
])
def test_bad_files(tmp_path, lines, match):
    with pytest.raises(TaskError, match=match):
        load_jsonl_task(write(tmp_path, lines))


def test_missing_file_and_empty_split(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        get_task(str(tmp_path / "nope.jsonl"))
    task = load_jsonl_task(write(tmp_path, [json.dumps({"prompt": "a", "completion": "b", "split": "train"})]))
    with pytest.raises(TaskError, match="no test examples"):
        task.examples("test", 1)


def test_user_task_trains_on_tiny_llama(tmp_path, tokenizer, tiny_llama):
    from services.common.workload.training import TrainConfig, train_adapter

    task = get_task(str(write(tmp_path, rows(50))))
    summary = train_adapter(tiny_llama, tokenizer, task, tmp_path / "a",
                            TrainConfig(rank=2, alpha=4, steps=2, batch_size=4, max_len=64),
                            show_progress=False)
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert summary["num_train_examples"] <= 50
