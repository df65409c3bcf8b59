"""`inlaid train-predictor` end to end on a small JSONL: trains, reports held-out quality, exports ONNX."""
import argparse
import json

import pytest

from services.predictor import cli
from services.predictor.onnx_predictor import OnnxLengthModel
from services.predictor.train import load_rows

from .conftest import synthetic_rows


def _parse(argv):
    parser = argparse.ArgumentParser(prog="inlaid")
    cli.add_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(argv)


def test_train_predictor_cli(tmp_path, capsys):
    data = tmp_path / "lengths.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(120)))
    out = tmp_path / "model"
    args = _parse(["train-predictor", "--data", str(data), "--out", str(out), "--epochs", "15"])
    assert args.func(args) == 0
    meta = json.loads((out / "metadata.json").read_text())
    report = meta["training"]
    assert report["test"]["kendall_tau"] > 0.6
    assert report["onnx_max_abs_diff"] < 1e-3
    assert OnnxLengthModel(out).tasks == ["short", "spell"]
    assert "kendall_tau" in capsys.readouterr().out


def test_holdout_task_is_not_learned(tmp_path):
    data = tmp_path / "lengths.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(40)))
    out = tmp_path / "model"
    args = _parse(["train-predictor", "--data", str(data), "--out", str(out), "--epochs", "2",
                   "--holdout-task", "short"])
    args.func(args)
    model = OnnxLengthModel(out)
    assert model.knows("spell") and not model.knows("short")


@pytest.mark.parametrize("line, match", [
    ('{"task": "a", "prompt": "p"}', "lengths.jsonl:1"),
    ('{"task": "a", "prompt": "p", "output_tokens": -3}', "must be >= 0"),
    ("not json", "expected JSON"),
])
def test_bad_rows_name_the_line(tmp_path, line, match):
    data = tmp_path / "lengths.jsonl"
    data.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        load_rows(data)


def test_pretraining_skips_unknown_and_held_out_tasks(tmp_path):
    from services.predictor.train import TrainConfig, train_predictor

    rows = synthetic_rows(40)
    pretrain = synthetic_rows(40, seed=5) + [{"task": "elsewhere", "prompt": "x", "output_tokens": 9}]
    report = train_predictor(rows, tmp_path, holdout_task="short", pretrain_rows=pretrain,
                             train_cfg=TrainConfig(epochs=2, show_progress=False))
    assert report["num_pretrain"] == 40  # only "spell": not "short" (held out), not "elsewhere"
    assert OnnxLengthModel(tmp_path).tasks == ["spell"]
