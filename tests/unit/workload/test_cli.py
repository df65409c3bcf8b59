"""The workload subcommands through the `inlaid` dispatcher: a trace end to end, bad input as errors."""
from __future__ import annotations

import json

from services.cli import main


def test_trace_subcommand_writes_jsonl(tmp_path):
    out = tmp_path / "trace.jsonl"
    assert main(["trace", "--rate", "3", "--duration", "4", "--num-tasks", "12", "--arrival", "gamma",
                 "--cv", "2", "--popularity", "zipf", "--zipf-a", "1.1", "--seed", "5",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {r["task"].split("#")[0] for r in rows} <= {
        "arith", "num2words_en", "num2words_fr", "json_extract", "table_summary", "sort_list", "code_gen"}


def test_bad_input_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["trace", "--rate", "1", "--duration", "1", "--num-tasks", "5000",
                 "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "num_tasks must be in 1..1000" in capsys.readouterr().err
    assert main(["eval", "--task", "no_such_task"]) == 2
    assert "unknown task 'no_such_task'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    assert main(["train-adapter", "--task", str(bad), "--out", str(tmp_path / "a")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
