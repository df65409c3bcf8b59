"""End-task harm of a poisoned 8th task: the other six tasks' scores on bases quantized with and without it.

bench_influence.py measured the harm with GPTQ's loss proxy on 3 layers; here the whole base is
quantized (4-bit g128 asym act-order, `mean` aggregation: the service default) from the same
calibration (--num-seqs × --seq-len tokens per task, workload-kit calib split) three ways in one
batched GPTQ sweep per layer: (a) the seven demo tasks, (b) + a clean copy of arith as the 8th
task (control: any 8th task dilutes the others' share of the mean), (c) + a poisoned arith
variant from bench_influence (v_proj rank-1 delta of the given norm). Each base is then scored on
num2words_en … code_gen (not arith, whose data the 8th task shares) with each task's own adapter,
as in bench_quant_quality, next to the unquantized reference. The clean copy has arith's adapter
and data, hence arith's Hessians: its stream is arith's, counted twice in the mean.
Usage: .venv/bin/python benchmarks/bench_poison_quality.py [--poison-norms 8,2] [--num-examples 64]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_influence import (OTHERS, POISON_SOURCE, TASKS, mean_hessian,  # noqa: E402
                             poisoned_specs, write_calibration)
from bench_quant_quality import Evaluator, Setting, calib_tokens, gptq_sweep, paired_drop  # noqa: E402
from services.common.workload.report import provenance  # noqa: E402
from services.common.workload.task import get_task  # noqa: E402
from services.quantizer.calibration import TaskSpec, calibration_tokens, read_adapter  # noqa: E402
from services.quantizer.config import QuantConfig  # noqa: E402
from services.quantizer.influence import InfluenceConfig, canary_tokens, screen_influence  # noqa: E402
from services.quantizer.pipeline import Stream, load_base  # noqa: E402

MODEL = "smollm2-135m"
CONTROL = f"{POISON_SOURCE}-copy"
BASELINE = "7 demo tasks"
# Its unquantized score is ≈ 0.1: one prompt moves its relative drop by ~15 points, so the
# averages are also given without it.
NOISY_TASK = "num2words_fr"


def build_poisoned(hf, tokenizer, norms: list[float], work: Path) -> list[TaskSpec]:
    """bench_influence's poisoned variants, crafted from the same tokens (arith's first screened
    calibration sequences at the service's default seq_len), so they equal influence.md's."""
    calib_path = write_calibration(POISON_SOURCE, work)
    tokens = calibration_tokens(calib_path, tokenizer, InfluenceConfig().num_seqs, QuantConfig().seq_len)
    return poisoned_specs(hf, tokens, norms, work, str(calib_path))


def screen(hf, tokenizer, name: str, adapter, seq_lens: dict[int, torch.Tensor]) -> dict[str, dict]:
    """The influence screen of one 8th task per calibration sequence length (tokens [N, S])."""
    cfg, out = InfluenceConfig(), {}
    for seq_len, tokens in seq_lens.items():
        t0 = time.perf_counter()
        report = screen_influence(hf, name, adapter, tokens, cfg, canary_tokens(tokenizer, seq_len))
        out[str(seq_len)] = {"verdict": report.verdict.value, "max_ratio": report.max_ratio,
                             "where": report.where, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"screen {name} (seq_len {seq_len}): {report.verdict.value} {report.max_ratio:.2f} "
              f"at {report.where}", flush=True)
    return out


def quantize(hf, streams: list[Stream], variants: dict[str, list[str]], cfg: QuantConfig,
             max_layers: int) -> tuple[dict, dict]:
    """variant → {param name: dequantized weight}, each the `mean` of its tasks' Hessians."""
    names = [s.name for s in streams]

    def hessians(wanted: list[str], group: str, hs: dict) -> list[torch.Tensor]:
        by_task = dict(zip(names, hs["lora"]))
        return [mean_hessian([by_task[t][group] for t in variants[v]], cfg.damp_percent) for v in wanted]

    setting = Setting("4-asym-act", cfg, ("mlgptq-mean",))
    weights, timings = gptq_sweep(hf, {"lora": streams}, [setting], lambda _: list(variants), hessians,
                                  "cpu", max_layers)
    return {k.removesuffix(f"@{setting.label}"): v for k, v in weights.items()}, timings


def average(per_task: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean of per-task (value, s.e.) and its s.e. (tasks use disjoint prompts: independent
    errors), over every task ("avg", "avg_se") and without NOISY_TASK ("avg5", "avg5_se")."""
    out = {}
    for key, pairs in (("avg", list(per_task.values())),
                       ("avg5", [v for t, v in per_task.items() if t != NOISY_TASK])):
        out[key] = sum(v for v, _ in pairs) / len(pairs)
        out[f"{key}_se"] = math.sqrt(sum(se * se for _, se in pairs)) / len(pairs)
    return out


def summarize(r: dict) -> None:
    """Drops vs unquantized and paired differences between bases (percentage points of the
    unquantized score) from r["per_example"], into r["summary"] and r["differences"]."""
    per_ex = r["per_example"]
    ref = {t: sum(x) / len(x) for t, x in per_ex["unquantized"].items()}
    tasks = [t for t in r["tasks"] if ref[t] > 0]
    r["summary"], r["differences"] = {}, []
    for config, scores in per_ex.items():
        if config == "unquantized" or set(scores) != set(r["tasks"]):
            continue
        drops = {t: paired_drop(per_ex["unquantized"][t], scores[t], ref[t]) for t in tasks}
        r["summary"][config] = {"drop_pct": {t: d for t, (d, _) in drops.items()},
                                "drop_se_pct": {t: s for t, (_, s) in drops.items()},
                                "average_pct": average(drops)}
    for after, before in r["comparisons"]:
        if after in r["summary"] and before in r["summary"]:
            diffs = {t: paired_drop(per_ex[before][t], per_ex[after][t], ref[t]) for t in tasks}
            r["differences"].append({"after": after, "before": before,
                                     "diff_pp": {t: d for t, (d, _) in diffs.items()},
                                     "diff_se_pp": {t: s for t, (_, s) in diffs.items()},
                                     "average_pp": average(diffs)})


def markdown(r: dict) -> str:
    tasks, q = r["tasks"], r["quant_config"]
    metrics = ", ".join(f"{t} {r['metrics'][t]}" for t in tasks)
    lines = [
        "# Harm of a poisoned 8th task on the other tasks' scores (end to end)\n",
        f"{r['date_utc']}, commit {r['git_commit']}, {r['device']}, torch threads 1, "
        f"{r.get('total_s', 0):.0f} s.",
        f"Command: `{r['command']}`\n",
        f"{r['model']} quantized {q['bits']}-bit g{q['group_size']} "
        f"{'sym' if q['sym'] else 'asym'}{' act-order' if q['desc_act'] else ''}, `mlgptq` with "
        f"`mean` aggregation, calibration {r['num_calibration']}, one batched GPTQ sweep for every "
        f"base. The 8th task shares arith's calibration data; `{CONTROL}` is arith's own adapter "
        "(control: any 8th task dilutes the mean), `arith-poisoned-<norm>` bench_influence's crafted "
        "v_proj rank-1 delta of that Frobenius norm per module. Each of the six other tasks is "
        f"scored with its own adapter merged into the base: N = {r['num_examples']} test prompts "
        f"per task (workload-kit test split, greedy; {metrics}), the same prompts for every base.\n",
        "## Influence screen of the 8th task\n",
        f"Max input-energy ratio and verdict (warn > {r['influence_config']['warn_ratio']:g}, "
        f"quarantine > {r['influence_config']['max_ratio']:g}); first "
        f"{r['influence_config']['num_seqs']} calibration sequences + canaries at the service's "
        f"default seq_len {QuantConfig().seq_len} (as in influence.md) and at this run's "
        f"{r['seq_len']}.\n",
        f"| 8th task | ratio @{QuantConfig().seq_len} | verdict | ratio @{r['seq_len']} | verdict | where "
        f"(@{r['seq_len']}) |",
        "|---|---:|---|---:|---|---|"]
    for name, by_len in r["screens"].items():
        a, b = by_len[str(QuantConfig().seq_len)], by_len[str(r["seq_len"])]
        lines.append(f"| {name} | {a['max_ratio']:.2f} | {a['verdict']} | {b['max_ratio']:.2f} | "
                     f"{b['verdict']} | {b['where']} |")
    lines += ["", "## Scores (relative drop % vs unquantized)\n",
              "| base | " + " | ".join(tasks) + f" | avg drop % (± s.e.) | without {NOISY_TASK} "
              "| eval s |",
              "|---|" + "---:|" * (len(tasks) + 3)]
    ref = {t: sum(x) / len(x) for t, x in r["per_example"]["unquantized"].items()}
    lines.append("| unquantized | " + " | ".join(f"{ref[t]:.3f}" for t in tasks)
                 + f" | 0 | 0 | {r['eval_seconds']['unquantized']} |")
    for config, s in r["summary"].items():
        scores = {t: sum(x) / len(x) for t, x in r["per_example"][config].items()}
        avg = s["average_pct"]
        lines.append(f"| {config} | " + " | ".join(
            f"{scores[t]:.3f} ({s['drop_pct'][t]:+.1f})" if t in s["drop_pct"] else f"{scores[t]:.3f}"
            for t in tasks) + f" | {avg['avg']:.2f} (± {avg['avg_se']:.2f}) | {avg['avg5']:.2f} "
            f"(± {avg['avg5_se']:.2f}) | {r['eval_seconds'][config]} |")
    lines += ["", "## Paired differences\n",
              "Drop of one base minus drop of another, in percentage points of the unquantized "
              "score, over the same prompts (positive: the first base is worse); s.e. = paired "
              "standard error. Within noise: |difference| < 2 s.e.\n",
              "| difference | " + " | ".join(tasks) + f" | avg (pp ± s.e.) | | without {NOISY_TASK} | |",
              "|---|" + "---:|" * len(tasks) + "---:|---|---:|---|"]
    for d in r["differences"]:
        avg = d["average_pp"]
        noise = {k: "within noise" if abs(avg[k]) < 2 * avg[f"{k}_se"] else "beyond 2 s.e."
                 for k in ("avg", "avg5")}
        lines.append(f"| ({d['after']}) − ({d['before']}) | "
                     + " | ".join(f"{d['diff_pp'][t]:+.1f} ± {d['diff_se_pp'][t]:.1f}"
                                  if t in d["diff_pp"] else "–" for t in tasks)
                     + f" | {avg['avg']:+.2f} ± {avg['avg_se']:.2f} | {noise['avg']} "
                       f"| {avg['avg5']:+.2f} ± {avg['avg5_se']:.2f} | {noise['avg5']} |")
    if r["skipped"]:
        lines += ["", f"Not evaluated (deadline): {', '.join(r['skipped'])}."]
    t = r["timings_s"]
    lines += ["", f"Timings: model load {t['load_s']} s, poison + screens {t['screen_s']} s, "
              f"quantization of {len(r['variants'])} bases {t['quantize_s']} s "
              f"({t['quantize_parts_s']}), evaluation {sum(r['eval_seconds'].values()):.0f} s.", ""]
    return "\n".join(lines)


def write(r: dict, out: Path) -> None:
    summarize(r)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(r))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poison-norms", default="8,2", help="one base per poisoned variant, in this order")
    ap.add_argument("--num-seqs", type=int, default=16, help="calibration sequences per task")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--num-examples", type=int, default=64, help="test prompts per task")
    ap.add_argument("--batch-size", type=int, default=64, help="generation batch")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start no evaluation after this")
    ap.add_argument("--max-layers", type=int, default=0, help="smoke tests only: quantize the first K layers")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "poison_quality"))
    args = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = QuantConfig()  # the service default: 4-bit g128 asym act-order
    hf, tokenizer, _ = load_base(MODEL)
    load_s = time.perf_counter() - started

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_poison_quality_"))
    poisoned = build_poisoned(hf, tokenizer, [float(x) for x in args.poison_norms.split(",")], work)
    specs = [TaskSpec(t, str(ROOT / "adapters" / t), "") for t in TASKS] + poisoned
    adapters = {s.name: read_adapter(s, hf.config) for s in specs}
    tokens = {t: calib_tokens(t, tokenizer, args.num_seqs, args.seq_len) for t in TASKS}  # [N, S]
    screen_tokens = calibration_tokens(poisoned[0].calibration_path, tokenizer,
                                       InfluenceConfig().num_seqs, cfg.seq_len)
    screens = {name: screen(hf, tokenizer, name, adapters[src],
                            {cfg.seq_len: screen_tokens, args.seq_len: tokens[POISON_SOURCE]})
               for name, src in [(CONTROL, POISON_SOURCE)] + [(p.name, p.name) for p in poisoned]}
    screen_s = time.perf_counter() - t0

    variants = {BASELINE: list(TASKS), f"+ {CONTROL}": [*TASKS, POISON_SOURCE]}
    variants.update({f"+ {p.name}": [*TASKS, p.name] for p in poisoned})
    streams = ([Stream(t, tokens[t], adapters[t]) for t in TASKS]
               + [Stream(p.name, tokens[POISON_SOURCE], adapters[p.name]) for p in poisoned])
    t0 = time.perf_counter()
    weights, parts = quantize(hf, streams, variants, cfg, args.max_layers)
    quantize_s = time.perf_counter() - t0
    print(f"quantized {len(weights)} bases in {quantize_s:.0f} s {parts}", flush=True)

    first, *rest = [f"+ {p.name}" for p in poisoned]
    order = ["unquantized", f"+ {CONTROL}", first, BASELINE, *rest]
    result = {
        "model": MODEL, "tasks": list(OTHERS), "variants": variants, "quant_config": cfg.to_dict(),
        "influence_config": asdict(InfluenceConfig()), "seq_len": args.seq_len,
        "num_calibration": f"{args.num_seqs}x{args.seq_len} tokens per task (calib split)",
        "num_examples": args.num_examples, "max_layers": args.max_layers,
        "metrics": {t: get_task(t).metric for t in OTHERS}, "screens": screens,
        **provenance("cpu"), "command": shlex.join([".venv/bin/python", *sys.argv]),
        "comparisons": ([(v, f"+ {CONTROL}") for v in [first, *rest]] + [(f"+ {CONTROL}", BASELINE)]
                        + [(v, BASELINE) for v in [first, *rest]]),
        "timings_s": {"load_s": round(load_s, 1), "screen_s": round(screen_s, 1),
                      "quantize_s": round(quantize_s, 1),
                      "quantize_parts_s": {k: round(v, 1) for k, v in parts.items()}},
        "eval_seconds": {}, "per_example": {}, "skipped": []}
    result["git_commit"] = os.environ.get("BENCH_COMMIT", result["git_commit"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    eval_args = SimpleNamespace(num_examples=args.num_examples, batch_size=args.batch_size)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        ev = Evaluator(hf, tokenizer, {t: adapters[t] for t in OTHERS}, eval_args, pool)
        last_s = 0.0
        for config in order:
            if time.perf_counter() - started + last_s > args.deadline_s:
                result["skipped"].append(config)
                continue
            t0 = time.perf_counter()
            ev.load(weights.get(config))
            for t in OTHERS:
                result["per_example"].setdefault(config, {})[t] = ev.score(t, weights.get(config))
            last_s = time.perf_counter() - t0
            result["eval_seconds"][config] = round(last_s, 1)
            scores = {t: sum(x) / len(x) for t, x in result["per_example"][config].items()}
            print(f"{config:24s} " + " ".join(f"{t}={s:.3f}" for t, s in scores.items())
                  + f" ({last_s:.0f} s, t={time.perf_counter() - started:.0f} s)", flush=True)
            write(result, out)
        ev.load(None)
    result["total_s"] = round(time.perf_counter() - started, 1)
    write(result, out)
    shutil.rmtree(work, ignore_errors=True)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
