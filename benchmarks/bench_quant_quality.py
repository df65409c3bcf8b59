"""Task quality of quantized bases: unquantized, RTN, GPTQ (mixed data / per task), MLGPTQ variants.

One calibration pass through the unquantized base gives every Hessian needed (each task's
calibration split with and without its adapter), so all methods share it; per decoder layer
and quantization setting (bits, sym/asym, act-order, MSE clipping) one batched GPTQ sweep
(`gptq_quantize_many`) quantizes the layer under every method's Hessian at once. Each
quantized base is then scored per task (workload-kit test split, greedy, the task's metric)
with that task's adapter merged into the quantized weights (W_q + s·B·A: the same function
as the served W_q·x + s·B·A·x up to fp32 rounding; much faster than PEFT wrappers).
Configurations are evaluated in priority order until --deadline-s, and the result files are
rewritten after each one, so a run cut short still leaves every finished row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource  # noqa: F401  (imported before scoring threads fork sandboxes that import it)
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.workload.evaluation import generate  # noqa: E402
from services.common.workload.metrics import get_metric  # noqa: E402
from services.common.workload.report import provenance  # noqa: E402
from services.common.workload.task import get_task  # noqa: E402
from services.quantizer.aggregate import make_aggregation  # noqa: E402
from services.quantizer.calibration import TaskSpec, format_example, read_adapter  # noqa: E402
from services.quantizer.config import QuantConfig  # noqa: E402
from services.quantizer.gptq import gptq_quantize_many  # noqa: E402
from services.quantizer.hessian import INPUT_GROUPS  # noqa: E402
from services.quantizer.pipeline import Stream, capture_inputs, run_layer, load_base  # noqa: E402
from services.quantizer.rtn import rtn_quantize  # noqa: E402

AGGREGATIONS = ("mean", "max-inv", "row-max", "max-h")


@dataclass(frozen=True)
class Setting:
    """One quantization grid (bits, sym, act-order, mse) and the Hessian-based methods run on it."""

    label: str
    cfg: QuantConfig
    methods: tuple[str, ...]  # "rtn", "gptq-mixed", "gptq:*", "mlgptq-<agg>", "gptq+adapter:*", ...


def selected_settings(args) -> list[Setting]:
    """settings() filtered by --settings / --methods (comma lists; empty = all)."""
    labels = [x for x in args.settings.split(",") if x]
    methods = [x for x in args.methods.split(",") if x]
    only = [x for x in args.only.split(",") if x]
    out = []
    for s in settings(args.group_size):
        kept = tuple(m for m in s.methods if (not methods or m in methods)
                     and (not only or f"{m}@{s.label}" in only))
        if (not labels or s.label in labels) and kept:
            out.append(Setting(s.label, s.cfg, kept))
    return out


def settings(group_size: int) -> list[Setting]:
    def cfg(bits, sym=True, act=False, mse=False):
        return QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=act, mse=mse)

    core = ("rtn", "gptq-mixed", "gptq:*", "mlgptq-mean")
    return [
        Setting("4", cfg(4), core + ("mlgptq-max-inv", "mlgptq-row-max", "mlgptq-max-h",
                                     "mlgptq-mean-small", "gptq+adapter:*")),
        Setting("3", cfg(3), core + ("mlgptq-max-inv", "mlgptq-row-max")),
        Setting("4-asym", cfg(4, sym=False), ("rtn", "gptq-mixed", "mlgptq-mean")),
        Setting("3-asym", cfg(3, sym=False), ("rtn", "gptq-mixed", "mlgptq-mean")),
        Setting("4-act", cfg(4, act=True), ("gptq-mixed", "mlgptq-mean")),
        Setting("4-asym-act", cfg(4, sym=False, act=True), ("gptq-mixed", "mlgptq-mean", "gptq:*")),
        Setting("3-asym-act", cfg(3, sym=False, act=True), ("gptq-mixed", "mlgptq-mean", "gptq:*")),
        Setting("4-asym-mse", cfg(4, sym=False, mse=True), ("rtn", "gptq-mixed", "mlgptq-mean")),
        Setting("3-asym-mse", cfg(3, sym=False, mse=True), ("rtn", "gptq-mixed", "mlgptq-mean")),
        Setting("4-asym-act-mse", cfg(4, sym=False, act=True, mse=True), ("gptq-mixed", "mlgptq-mean", "gptq:*")),
        Setting("3-asym-act-mse", cfg(3, sym=False, act=True, mse=True), ("gptq-mixed", "mlgptq-mean", "gptq:*")),
    ]


# Evaluation order: the table first (4-bit, then 3-bit), then the ablations.
PRIORITY = [
    "rtn@4", "gptq-mixed@4", "mlgptq-mean@4", "gptq:*@4",
    "rtn@3", "gptq-mixed@3", "mlgptq-mean@3", "gptq:*@3",
    # The best grid on the CPU run (asym + act-order), with its baselines, each followed by
    # its MSE-clipping counterpart so a deadline cuts whole pairs.
    "mlgptq-mean@4-asym-act", "mlgptq-mean@4-asym-act-mse", "rtn@4-asym", "rtn@4-asym-mse",
    "mlgptq-mean@3-asym-act", "mlgptq-mean@3-asym-act-mse", "rtn@3-asym", "rtn@3-asym-mse",
    "gptq-mixed@4-asym-act-mse", "gptq-mixed@4-asym-act", "gptq-mixed@3-asym-act",
    "gptq-mixed@3-asym-act-mse",
    "gptq:*@4-asym-act", "gptq:*@3-asym-act",
    "mlgptq-mean@4-asym", "gptq-mixed@4-asym", "mlgptq-max-inv@4",
    "mlgptq-mean@3-asym", "gptq-mixed@3-asym", "mlgptq-mean@4-act", "gptq-mixed@4-act",
    "mlgptq-row-max@4", "mlgptq-mean-small@4", "gptq+adapter:*@4", "mlgptq-max-inv@3",
    "mlgptq-row-max@3", "mlgptq-max-h@4",
    "gptq:*@4-asym-act-mse", "gptq:*@3-asym-act-mse", "mlgptq-mean@4-asym-mse", "gptq-mixed@4-asym-mse",
    "mlgptq-mean@3-asym-mse", "gptq-mixed@3-asym-mse",
]


def calib_tokens(task: str, tokenizer, num_seqs: int, seq_len: int) -> torch.Tensor:
    """[num_seqs, seq_len] of the task's calib split (disjoint from train and test), chat-formatted."""
    want = num_seqs * seq_len
    ids: list[int] = []
    num = 64
    while len(ids) < want:
        ids = []
        for ex in get_task(task).examples("calib", num):
            ids += tokenizer(format_example(tokenizer, ex.prompt, ex.completion), add_special_tokens=False)["input_ids"]
            if len(ids) >= want:
                break
        num *= 2
    return torch.tensor(ids[:want]).view(num_seqs, seq_len)


def expand(methods, tasks) -> list[str]:
    return [m.replace("*", t) for m in methods for t in (tasks if m.endswith("*") else [""])]


def method_hessians(names, tasks, group, base_h, lora_h, small_h) -> list[torch.Tensor]:
    out = []
    for name in names:
        if name == "gptq-mixed":  # pooled data: every task has the same number of tokens
            out.append(sum(h[group] for h in base_h) / len(base_h))
        elif name.startswith("gptq:"):
            out.append(base_h[tasks.index(name[5:])][group])
        elif name.startswith("gptq+adapter:"):
            out.append(lora_h[tasks.index(name[13:])][group])
        else:
            small = name.endswith("-small")
            agg = make_aggregation(name[len("mlgptq-"):].removesuffix("-small"))
            hs = small_h if small else lora_h
            out.append(agg.finalize(agg.reduce([agg.task_state(h[group]) for h in hs])))
    return out


@torch.no_grad()
def quantize_all(hf, tokenizer, tasks, adapters, args, device) -> tuple[dict, dict]:
    """{"<method>@<setting>": {param name: dequantized fp32 weight}} for every configuration."""
    chosen = selected_settings(args)
    wanted = {m for s in chosen for m in s.methods}
    streams = {"base": [], "lora": [], "small": []}
    for t in tasks:
        tokens = calib_tokens(t, tokenizer, args.num_seqs, args.seq_len)
        if wanted & {"gptq-mixed", "gptq:*"}:
            streams["base"].append(Stream(t, tokens, None))
        if any(m.startswith("mlgptq") and m != "mlgptq-mean-small" or m == "gptq+adapter:*" for m in wanted):
            streams["lora"].append(Stream(t, tokens, adapters[t]))
        if "mlgptq-mean-small" in wanted:
            streams["small"].append(Stream(t, tokens[:args.small_seqs], adapters[t]))
    return gptq_sweep(
        hf, streams, chosen, lambda s: [m for m in expand(s.methods, tasks) if m != "rtn"],
        lambda names, group, hs: method_hessians(names, tasks, group, hs["base"], hs["lora"], hs["small"]),
        device, args.max_layers)


HessiansFn = Callable[[list[str], str, dict[str, list[dict[str, torch.Tensor]]]], list[torch.Tensor]]


@torch.no_grad()
def gptq_sweep(hf, streams: dict[str, list[Stream]], chosen: list[Setting],
               names_of: Callable[[Setting], list[str]], hessians: HessiansFn, device: str,
               max_layers: int = 0) -> tuple[dict, dict]:
    """{"<name>@<setting>": {param name: dequantized fp32 weight}} and timings.

    Per decoder layer, every stream's Hessians once (streams: kind → streams); then per input
    group and setting one batched GPTQ sweep over the Hessians `hessians(names, group, kind →
    per-stream Hessians)` returns for `names_of(setting)`, plus RTN where the setting lists "rtn".
    """
    for s in [s for group in streams.values() for s in group]:
        capture_inputs(hf, s, device)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    timings = {"stats_s": 0.0, "aggregate_s": 0.0, "gptq_s": 0.0}
    failed: set[str] = set()
    for idx, layer in enumerate(hf.model.layers):
        if max_layers and idx >= max_layers:
            break
        layer.to(device)
        t0 = time.perf_counter()
        hs = {k: [run_layer(layer, idx, s) for s in v] for k, v in streams.items()}
        for kind, group_hs in hs.items():
            for stream, h in zip(streams[kind], group_hs):
                bad = [g for g, m in h.items() if not bool(torch.isfinite(m).all())]
                if bad:
                    amax = max(float(x.abs().max()) for x, _ in stream.inputs)
                    print(f"layer {idx} {kind}/{stream.name}: non-finite Hessian in {bad}; "
                          f"max |output| {amax:.3g}", flush=True)
        sync(device)
        t1 = time.perf_counter()
        timings["stats_s"] += t1 - t0
        for group, members in INPUT_GROUPS.items():
            stacked_w = torch.cat([layer.get_submodule(n).weight.detach() for n in members])
            cache: dict[str, torch.Tensor] = {}
            for setting in chosen:
                names = names_of(setting)
                t2 = time.perf_counter()
                missing = [n for n in names if n not in cache]
                for n, h in zip(missing, hessians(missing, group, hs)):
                    cache[n] = h.to(device)
                sync(device)
                t3 = time.perf_counter()
                bad = [n for n in names if not bool(torch.isfinite(cache[n]).all())]
                for n in bad:  # report and drop instead of aborting every configuration
                    if f"{n}@{setting.label}" not in failed:
                        print(f"FAILED {n}@{setting.label}: non-finite Hessian at layer {idx} "
                              f"({group})", flush=True)
                    failed.add(f"{n}@{setting.label}")
                names = [n for n in names if n not in bad]
                results = dict(zip(names, gptq_quantize_many(stacked_w, [cache[n] for n in names], setting.cfg))) if names else {}
                if "rtn" in setting.methods:
                    results["rtn"] = rtn_quantize(stacked_w, setting.cfg)
                sync(device)
                timings["aggregate_s"] += t3 - t2
                timings["gptq_s"] += time.perf_counter() - t3
                for method, res in results.items():
                    start = 0
                    for name in members:
                        rows = layer.get_submodule(name).weight.shape[0]
                        weights.setdefault(f"{method}@{setting.label}", {})[
                            f"model.layers.{idx}.{name}.weight"] = res.dequant[start:start + rows].to(device)
                        start += rows
        layer.to("cpu")
        print(f"layer {idx}: {time.perf_counter() - t0:.1f}s", flush=True)
    for key in failed:  # a configuration missing any layer is not evaluated
        weights.pop(key, None)
    return weights, timings


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Evaluator:
    """Scores one task with its adapter merged into whatever base weights the model holds."""

    def __init__(self, hf, tokenizer, adapters, args, pool: ThreadPoolExecutor):
        self.hf, self.tokenizer, self.adapters, self.args, self.pool = hf, tokenizer, adapters, args, pool
        self.params = dict(hf.named_parameters())
        self.original = {k: v.detach().clone() for k, v in self.params.items() if ".layers." in k}

    def load(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Base weights of a configuration (None: unquantized)."""
        for name, value in self.original.items():
            self.params[name].data.copy_(weights.get(name, value) if weights else value)

    def _merge(self, task: str, sign: float) -> None:
        adapter = self.adapters[task]
        for (idx, module), (a, b) in adapter.weights.items():
            prefix = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            p = self.params[f"model.layers.{idx}.{prefix}.{module}.weight"]
            p.data += sign * adapter.scaling[(idx, module)] * (b.to(p.device) @ a.to(p.device))

    def score(self, task: str, weights: dict[str, torch.Tensor] | None) -> list[float]:
        src = get_task(task)
        examples = src.examples("test", self.args.num_examples)
        self._merge(task, 1.0)
        try:
            outputs = generate(self.hf, self.tokenizer, [e.prompt for e in examples], src.max_new_tokens,
                               batch_size=self.args.batch_size)
        finally:
            # Restore the exact base weights of the adapter's modules (no subtract-rounding drift).
            for (idx, module) in self.adapters[task].weights:
                prefix = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                name = f"model.layers.{idx}.{prefix}.{module}.weight"
                self.params[name].data.copy_(weights.get(name, self.original[name]) if weights else self.original[name])
        metric = get_metric(src.metric)
        return list(self.pool.map(lambda pair: float(metric(pair[0][0], pair[1])), zip(outputs, examples)))


def configs_in_order(weights: dict, tasks: list[str]) -> list[tuple[str, list[str]]]:
    """(config name, tasks to score) in PRIORITY order; per-task methods score their own task."""
    out = []
    for entry in PRIORITY:
        method, setting = entry.split("@")
        if method.endswith("*"):
            out += [(f"{method[:-1]}{t}@{setting}", [t]) for t in tasks if f"{method[:-1]}{t}@{setting}" in weights]
        elif entry in weights:
            out.append((entry, tasks))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="", help="comma list; default: every adapters/<task>/ present")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--num-seqs", type=int, default=64, help="calibration sequences per task")
    ap.add_argument("--small-seqs", type=int, default=16, help="calibration size of the mlgptq-mean-small ablation")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--num-examples", type=int, default=200, help="test examples per task")
    ap.add_argument("--batch-size", type=int, default=200, help="generation batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start no configuration after this")
    ap.add_argument("--settings", default="", help="comma list of setting labels (4,3,4-asym,...); default all")
    ap.add_argument("--methods", default="", help="comma list (rtn,gptq-mixed,gptq:*,mlgptq-mean,...); default all")
    ap.add_argument("--only", default="", help="comma list of configurations method@setting (e.g. rtn@4-asym)")
    ap.add_argument("--max-layers", type=int, default=0, help="smoke tests only: quantize the first K layers")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)

    tasks = ([t for t in args.tasks.split(",") if t] or
             sorted(p.name for p in (ROOT / "adapters").iterdir()
                    if (p / "adapter_model.safetensors").is_file()))
    hf, tokenizer, _ = load_base(args.model)
    load_s = time.perf_counter() - t_start
    adapters = {t: read_adapter(TaskSpec(t, str(ROOT / "adapters" / t), ""), hf.config) for t in tasks}
    t0 = time.perf_counter()
    weights, timings = quantize_all(hf, tokenizer, tasks, adapters, args, args.device)
    quant_s = time.perf_counter() - t0
    print(f"quantized {len(weights)} configurations in {quant_s:.1f}s {timings}", flush=True)
    hf.to(args.device)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "tasks": tasks, "group_size": args.group_size,
              "num_calibration": f"{args.num_seqs}x{args.seq_len} tokens per task (calib split)",
              "num_examples": args.num_examples, "load_s": round(load_s, 1),
              "quantize_all_s": round(quant_s, 1), "quantize_timings_s": {k: round(v, 1) for k, v in timings.items()},
              "num_configs_quantized": len(weights), "max_layers": args.max_layers,
              **provenance(args.device), "command": " ".join(["python"] + sys.argv),
              "eval_seconds": {}, "scores": {}, "per_example": {}, "skipped": []}
    result["git_commit"] = os.environ.get("BENCH_COMMIT", result["git_commit"])

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        ev = Evaluator(hf, tokenizer, adapters, args, pool)
        plan = [("unquantized", tasks)] + configs_in_order(weights, tasks)
        per_task_s: dict[str, float] = {}
        for config, task_list in plan:
            elapsed = time.perf_counter() - t_start
            need = sum(per_task_s.get(t, 0.0) for t in task_list)
            if elapsed + need > args.deadline_s:
                result["skipped"].append(config)
                continue
            ev.load(weights.get(config))
            t1 = time.perf_counter()
            for t in task_list:
                t2 = time.perf_counter()
                per_ex = ev.score(t, weights.get(config))
                per_task_s[t] = max(per_task_s.get(t, 0.0), time.perf_counter() - t2)
                result["scores"].setdefault(config, {})[t] = sum(per_ex) / len(per_ex)
                result["per_example"].setdefault(config, {})[t] = per_ex
            result["eval_seconds"][config] = round(time.perf_counter() - t1, 1)
            print(f"{config:28s} " + " ".join(f"{t}={result['scores'][config][t]:.3f}" for t in task_list)
                  + f" ({result['eval_seconds'][config]}s, t={time.perf_counter() - t_start:.0f}s)", flush=True)
            summarize(result, out)
    ev.load(None)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    summarize(result, out)
    print(out.with_suffix(".md").read_text())
    return 0


def method_label(config: str) -> tuple[str, str]:
    method, setting = config.split("@")
    if method.startswith("gptq:"):
        method = "gptq (per task)"
    elif method.startswith("gptq+adapter:"):
        method = "gptq+adapter (per task)"
    return method, setting


def paired_drop(before: list[float], after: list[float], scale: float) -> tuple[float, float]:
    """(100·mean(before − after)/scale, its paired standard error): both scored on the same prompts."""
    diffs = [b - a for b, a in zip(before, after)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return 100.0 * mean / scale, 100.0 * math.sqrt(var / len(diffs)) / scale


def summarize(result: dict, out: Path) -> None:
    """Relative drop vs unquantized per task, average and worst task, paired standard error."""
    scores, tasks, per_ex = result["scores"], result["tasks"], result["per_example"]
    if "unquantized" not in scores:
        raise SystemExit("no configuration was evaluated before --deadline-s (not even the "
                         "unquantized reference): raise --deadline-s")
    ref, ref_ex = scores["unquantized"], per_ex["unquantized"]
    rows: dict[tuple[str, str], dict] = {}
    for config, per_task in scores.items():
        if config != "unquantized":
            rows.setdefault(method_label(config), {}).update({t: (per_task[t], per_ex[config][t]) for t in per_task})
    summary = []
    for (method, setting), per_task in rows.items():
        drops, ses = {}, {}
        for t, (score, ex) in per_task.items():
            if ref[t] <= 0:
                continue
            drops[t] = 100.0 * (ref[t] - score) / ref[t]
            ses[t] = paired_drop(ref_ex[t], ex, ref[t])[1]
        if not drops:
            continue
        summary.append({"method": method, "setting": setting, "scores": {t: s for t, (s, _) in per_task.items()},
                        "drop_pct": drops, "complete": set(per_task) == set(tasks),
                        "avg_drop_pct": sum(drops.values()) / len(drops),
                        "avg_drop_se_pct": math.sqrt(sum(v * v for v in ses.values())) / len(ses),
                        "worst_drop_pct": max(drops.values()), "worst_task": max(drops, key=drops.get)})
    order = {s: i for i, s in enumerate(["4", "3", "4-asym", "4-asym-mse", "3-asym", "3-asym-mse", "4-act",
                                         "4-asym-act", "4-asym-act-mse", "3-asym-act", "3-asym-act-mse"])}
    summary.sort(key=lambda r: (order.get(r["setting"], 99), r["avg_drop_pct"]))
    result["summary"] = summary
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    head = "| method | setting | " + " | ".join(tasks) + " | avg drop % (± s.e.) | worst drop % |"
    lines = [f"# Quantized base quality per task ({result['model']}, group {result['group_size']})", "",
             f"Score of each task's adapter on the quantized base; N = {result['num_examples']} test "
             f"examples per task (greedy, workload-kit metric); calibration {result['num_calibration']}. "
             "Cells: score (relative drop % vs unquantized). Setting: bits, `asym` = asymmetric grid "
             "(default symmetric), `act` = act-order, `mse` = MSE clipping search of each group's range "
             f"(grid {QuantConfig.mse_grid}, max shrink {QuantConfig.mse_max_shrink}, norm "
             f"{QuantConfig.mse_norm}; otherwise AutoGPTQ's min/max rule). `gptq (per task)` quantizes one base per task "
             "with that task's data only (not shareable); `gptq+adapter (per task)` the same with the "
             "task's adapter active during calibration (= mlgptq with one task). s.e. = paired standard "
             "error of the average drop over the same test prompts.", "",
             head, "|---|---|" + "---:|" * (len(tasks) + 2),
             "| unquantized | fp32 | " + " | ".join(f"{ref[t]:.3f}" for t in tasks if t in ref) + " | 0 | 0 |"]
    for row in summary:
        cells = " | ".join(f"{row['scores'][t]:.3f} ({row['drop_pct'].get(t, 0.0):+.1f})" if t in row["scores"]
                           else "–" for t in tasks)
        mark = "" if row["complete"] else " (partial)"
        lines.append(f"| {row['method']}{mark} | {row['setting']} | {cells} | {row['avg_drop_pct']:.2f} "
                     f"(± {row['avg_drop_se_pct']:.2f}) | {row['worst_drop_pct']:.2f} ({row['worst_task']}) |")
    if result["skipped"]:
        lines += ["", f"Not evaluated (deadline): {', '.join(result['skipped'])}."]
    lines += ["", f"Device {result['device']}, commit {result['git_commit']}, {result['date_utc']}; model load "
              f"{result['load_s']} s, quantization of all {result['num_configs_quantized']} configurations "
              f"{result['quantize_all_s']} s ({result['quantize_timings_s']}), total {result.get('total_s', '–')} s.",
              f"Command: `{result['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
