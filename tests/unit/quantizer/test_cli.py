"""`inlaid quantize` end to end on the tiny model: full, --add, and clear errors."""
from __future__ import annotations

from services.cli import main
from services.quantizer.checkpoint import load_checkpoint


def _task_args(specs):
    out = []
    for s in specs:
        out += ["--task", f"{s.name}={s.adapter_path}:{s.calibration_path}"]
    return out


def test_quantize_then_add(tiny_model, tiny_tasks, tmp_path, capsys):
    out = tmp_path / "ckpt"
    common = ["--num-seqs", "2", "--seq-len", "32", "--device", "cpu"]
    assert main(["quantize", "--model", str(tiny_model), *_task_args(tiny_tasks[:1]), "--bits", "3",
                 "--group-size", "32", *common, "--out", str(out)]) == 0
    assert main(["quantize", "--add", *_task_args(tiny_tasks[1:2]), "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.path.name == "v2" and ckpt.bits == 3
    assert [t["name"] for t in ckpt.quant_config["tasks"]] == ["alpha", "beta"]


def test_errors_are_clear(tiny_model, tiny_tasks, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["quantize", "--model", str(tiny_model), *_task_args(tiny_tasks[:1]), "--bits", "5",
                 "--out", str(out)]) == 2
    assert "bits=5 is not supported" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_model), "--task", "broken", "--out", str(out)]) == 2
    assert "NAME=ADAPTER_DIR:CALIB.jsonl" in capsys.readouterr().err
    assert main(["quantize", "--add", *_task_args(tiny_tasks[:1]), "--out", str(tmp_path / "none")]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_mse_flag_is_recorded(tiny_model, tiny_tasks, tmp_path):
    out = tmp_path / "ckpt"
    assert main(["quantize", "--model", str(tiny_model), *_task_args(tiny_tasks[:1]), "--mse",
                 "--group-size", "32", "--num-seqs", "2", "--seq-len", "32", "--device", "cpu",
                 "--out", str(out)]) == 0
    meta = load_checkpoint(out).quant_config
    assert meta["mse"] is True and meta["config"]["mse_grid"] == 100
    assert meta["config"]["mse_max_shrink"] == 0.8 and meta["config"]["mse_norm"] == 2.4
