"""Incremental MLGPTQ: add tasks to a quantized checkpoint using its cached per-layer aggregates."""
from __future__ import annotations

import json
from pathlib import Path

from services.quantizer.calibration import CalibrationError, TaskSpec
from services.quantizer.checkpoint import CheckpointError, QUANT_CONFIG, resolve, write_version
from services.quantizer.config import QuantConfig
from services.quantizer.pipeline import ProgressFn, load_base, run_pipeline


def add_tasks(checkpoint_root: str | Path, new_tasks: list[TaskSpec], device: str = "cpu",
              progress: ProgressFn | None = None, show_progress: bool = True,
              base: tuple | None = None) -> Path:
    """Publish a new version quantized for old + new tasks, computing statistics of new ones only.

    The result equals a full MLGPTQ run over all tasks bit for bit: each task's Hessians come
    from the unquantized base, and the cached state is the pre-repair elementwise-max
    aggregate, which combines exactly. The current version stays served until the new one is
    complete; a failure leaves it untouched. `base`: a `load_base` result the caller already
    holds; used only when it is the checkpoint's own base model, otherwise that one is loaded.
    """
    old = resolve(checkpoint_root)
    meta = json.loads((old / QUANT_CONFIG).read_text())
    if meta.get("method") != "mlgptq":
        raise CheckpointError(f"{old}: incremental quantization needs an mlgptq checkpoint, "
                              f"this one is {meta.get('method')!r}")
    if not new_tasks:
        raise CalibrationError("add_tasks needs at least one new task")
    old_tasks = [TaskSpec(**t) for t in meta["tasks"]]
    clash = {t.name for t in old_tasks} & {t.name for t in new_tasks}
    if clash or len({t.name for t in new_tasks}) != len(new_tasks):
        raise CalibrationError(f"task names already quantized or repeated: {sorted(clash) or new_tasks}")
    cfg = QuantConfig(**meta["config"])
    if base is None or str(base[2]) != meta["base_model"]:
        base = load_base(meta["base_model"])
    hf, tokenizer, base_dir = base
    timings = {}

    def build(tmp: Path) -> None:
        timings.update(run_pipeline(hf, tokenizer, base_dir, cfg, new_tasks, old_tasks + new_tasks,
                                    tmp, device, cached_version=old, progress=progress,
                                    show_progress=show_progress))
        (tmp / "timings.json").write_text(json.dumps(timings) + "\n")

    # The root is the directory that holds versions, even when given a version directory.
    root = old.parent if (old.parent / "CURRENT").is_file() else Path(checkpoint_root)
    return write_version(root, build)
