"""Result files for benchmarks/results: markdown + JSON stamped with device, commit, date, command."""
from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path


def provenance(device: str) -> dict:
    """Where and when a result was produced, and by which command."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    if device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()})"
    return {"device": device_name, "git_commit": commit,
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join(["inlaid"] + sys.argv[1:])}


def comparison_table(rows: list[dict]) -> str:
    """Markdown table of base vs adapter per task (rows from evaluation pairs)."""
    lines = ["| task | metric | N | base | adapter | gain | base tokens | adapter tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['num_examples']} | {r['base_score']:.3f} | "
                     f"{r['adapter_score']:.3f} | {r['adapter_score'] - r['base_score']:+.3f} | "
                     f"{r['base_mean_output_tokens']:.1f} | {r['adapter_mean_output_tokens']:.1f} |")
    return "\n".join(lines)


def write_results(md_path: str | Path, json_path: str | Path, title: str, body_md: str,
                  payload: dict, meta: dict) -> None:
    md_path, json_path = Path(md_path), Path(json_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {title}\n\nDevice: {meta['device']} · commit {meta['git_commit']} · "
              f"{meta['date_utc']}\n\nCommand: `{meta['command']}`\n\n")
    md_path.write_text(header + body_md + "\n")
    json_path.write_text(json.dumps({**meta, **payload}, indent=2) + "\n")
