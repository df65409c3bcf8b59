"""Reading and writing benchmark result files (benchmarks/results/)."""
from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(short: bool = True) -> str:
    """The checkout's HEAD commit (abbreviated unless short is False); "unknown" outside a git checkout."""
    try:
        return subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", *(["--short"] if short else []), "HEAD"],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def python_loop_ms(reps: int = 5) -> float:
    """Best of `reps` timings (ms) of a fixed pure-Python workload (dict and sort churn, as a scheduler
    step does): a reference of the host's single-thread speed, which a serving run's scheduler and
    its eager, launch-bound prefill steps depend on. Two runs' absolute times compare only on hosts
    whose references agree."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        counts: dict[int, int] = {}
        for i in range(200_000):
            counts[i % 997] = counts.get(i % 997, 0) + i
        sorted(counts.items(), key=lambda kv: kv[1])
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def read_steps(path: str | Path) -> list[dict]:
    """A bench_serve_gpu steps CSV: every column a float but `run` (the replay's name)."""
    with open(path) as f:
        return [{**{k: float(v) for k, v in r.items() if k != "run"}, "run": r["run"]} for r in csv.DictReader(f)]


def write_result(out: str | Path, res: dict, markdown: str) -> None:
    """<out>.json (the data) and <out>.md (its report), announced on stdout."""
    out = Path(out)
    if out.suffix in (".json", ".md"):   # a name with a dot elsewhere keeps it (with_suffix would cut it)
        out = out.with_suffix("")
    out.with_name(out.name + ".json").write_text(json.dumps(res, indent=1))
    md = out.with_name(out.name + ".md")
    md.write_text(markdown)
    print(f"wrote {md}")


def gpu_run_header(script: str, commit: str, **extra) -> dict:
    """The opening fields of a GPU probe's result: device, torch and triton versions, commit, the
    given extras and the command line (python benchmarks/<script> ...)."""
    import torch
    import triton
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit, **extra, "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:])}


def probe_title(title: str, res: dict) -> str:
    """A GPU probe report's heading: '# <title> (<device>, commit <commit>)' (gpu_run_header's fields)."""
    return f"# {title} ({res['device']}, commit {res['commit']})"


def probe_command(res: dict) -> str:
    """The opening of a GPU probe report's method line: the command and the torch / triton versions."""
    return f"Command: `{res['command']}`; torch {res['torch']}, triton {res['triton']}."


def write_probe(out: str | Path, stem: str, res: dict, write_markdown) -> None:
    """<out>/<stem>.json and <out>/<stem>.md (write_markdown(res, path)), the report echoed to stdout
    with the run's wall time (res["wall_s"])."""
    _echo_probe(_write_probe_files(out, stem, res, write_markdown), res)


def _echo_probe(md: Path, res: dict) -> None:
    print(md.read_text())
    print(f"done in {res['wall_s']:.0f} s")


def _write_probe_files(out: str | Path, stem: str, res: dict, write_markdown) -> Path:
    """<out>/<stem>.json and <out>/<stem>.md, silently; returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out / f"{stem}.md")
    return out / f"{stem}.md"


def probe_parser(doc: str, reps: int, ms: str) -> argparse.ArgumentParser:
    """The GPU probes' shared arguments: --out, --commit, --reps and --ms (row counts, comma-separated,
    parsed to a list of ints); the probe adds its own."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--ms", type=lambda v: [int(m) for m in v.split(",")], default=ms)
    return ap


def run_probe(script: str, stem: str, args: argparse.Namespace, rows, write_markdown, **extra) -> None:
    """A GPU probe's run: torch seeded 0, the header (gpu_run_header, with args.reps and extra),
    res["rows"] = rows(), the wall time, and <args.out>/<stem>.{json,md} (write_probe)."""
    run_probe_parts(script, stem, args, (rows() for _ in range(1)), write_markdown, **extra)


def run_probe_parts(script: str, stem: str, args: argparse.Namespace, parts, write_markdown, **extra) -> None:
    """run_probe over an iterable of row lists (e.g. one per shape, produced lazily): the files are
    rewritten after each part, so a run cut by its timeout keeps the rows it measured."""
    import torch
    torch.manual_seed(0)
    t0 = time.time()
    res = gpu_run_header(script, args.commit, reps=args.reps, **extra)
    res["rows"], res["wall_s"] = [], 0.0
    md = None
    for part in parts:
        res["rows"] += part
        res["wall_s"] = time.time() - t0
        md = _write_probe_files(args.out, stem, res, write_markdown)
    _echo_probe(md or _write_probe_files(args.out, stem, res, write_markdown), res)
