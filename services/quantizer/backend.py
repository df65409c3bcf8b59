"""QuantizerBackend: the service's view of the library — checks a job's inputs, then runs it.

A job adds tasks to the current MLGPTQ version with `incremental.add_tasks` (cached per-layer
aggregates of the earlier tasks + statistics of the new tasks only). When the checkpoint
directory holds no version yet, the first job quantizes the base fully for the job's tasks:
the task registry keeps no calibration data, so tasks registered earlier without it cannot
take part — they are served on whatever base the engines have. `screen` runs the influence
screen (influence.py) on a job's tasks before it quantizes the ones not quarantined.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoTokenizer

from services.common.adapters import AdapterError
from services.common.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError
from services.common.model_source import resolve_model
from services.common.task_registry import check_task_name
from services.quantizer.calibration import CalibrationError, TaskSpec, calibration_tokens, read_adapter
from services.quantizer.checkpoint import QUANT_CONFIG, CheckpointError, resolve
from services.quantizer.config import SUPPORTED_BITS, QuantConfig, QuantConfigError, \
    QuantizerServiceConfig
from services.quantizer.influence import InfluenceConfig, InfluenceReport, screen_tasks
from services.quantizer.pipeline import ProgressFn, load_base

if TYPE_CHECKING:
    from services.quantizer.jobs import Job

log = logging.getLogger(__name__)
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads")


class QuantizerBackend:
    """Holds the base's config and tokenizer (enough to validate inputs in milliseconds);
    a job loads the weights itself, so an idle quantizer keeps no model in memory (the model
    the influence screen loads is handed on to the same job's `run`, then dropped)."""

    def __init__(self, config: QuantizerServiceConfig,
                 influence: InfluenceConfig = InfluenceConfig()) -> None:
        self.config = config
        self.influence = influence
        self.root = Path(config.resolved_checkpoint_dir())
        self.device = config.resolved_device()
        source = resolve_model(config.model)
        if source.kind != "hf" or source.path is None:
            raise ValueError(f"QUANTIZER_MODEL {config.model!r} resolves to {source.kind}: "
                             "quantization needs real weights (a named model or a HF directory)")
        self.model_dir = Path(source.path)
        self.model_config = AutoConfig.from_pretrained(str(self.model_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self._screened_base: tuple[str, tuple] | None = None   # (job id, load_base result)

    @property
    def num_layers(self) -> int:
        return int(self.model_config.num_hidden_layers)

    def current_version(self) -> Path | None:
        try:
            return resolve(self.root)
        except CheckpointError:
            return None

    def _current_meta(self) -> tuple[QuantConfig, set[str]]:
        """Settings and task names of the current version (the service's settings if none)."""
        version = self.current_version()
        if version is None:
            return self.config.quant, set()
        meta = json.loads((version / QUANT_CONFIG).read_text())
        if meta.get("method") != "mlgptq":
            raise FailedPreconditionError(
                f"current version {version} was quantized with {meta.get('method')!r}; adding "
                "tasks needs an mlgptq version (point QUANTIZER_CHECKPOINT_DIR elsewhere)")
        try:
            cfg = QuantConfig(**meta["config"])
        except (QuantConfigError, TypeError, KeyError) as e:
            raise FailedPreconditionError(f"current version {version} has unsupported "
                                          f"quantization settings: {e}") from None
        stored = json.loads((version / "config.json").read_text())
        mismatch = [f for f in _SHAPE_FIELDS if stored.get(f) != getattr(self.model_config, f, None)]
        if mismatch:
            raise FailedPreconditionError(f"current version {version} belongs to another base "
                                          f"({', '.join(mismatch)} differ from {self.config.model})")
        return cfg, {t["name"] for t in meta.get("tasks", [])}

    def quantized_task_names(self) -> set[str]:
        """Tasks already in the current version (none before the first)."""
        try:
            return self._current_meta()[1]
        except FailedPreconditionError:
            return set()

    def remove_stale_temp_dirs(self) -> list[Path]:
        """Delete half-written version directories a killed job left (call before any job
        runs: write_version publishes a directory only by renaming a complete one)."""
        stale = sorted(self.root.glob(".tmp-v*")) if self.root.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an interrupted quantization job", path)
        return stale

    def resolve_settings(self, bits: int, group_size: int) -> QuantConfig:
        """The settings a job runs with: the current version's (incremental adds must match
        it), or the service's for the first version; `bits`/`group_size` 0 mean "those".
        Unsupported values raise InvalidArgumentError, values that differ from the current
        version's FailedPreconditionError; either way before anything is written."""
        if bits and bits not in SUPPORTED_BITS:
            raise InvalidArgumentError(f"bits={bits} is not supported: use one of "
                                       f"{SUPPORTED_BITS}, or 0 for the current setting")
        max_group = int(self.model_config.intermediate_size)  # the widest linear input
        if group_size < -1 or group_size > max_group:
            raise InvalidArgumentError(f"group_size={group_size} is not supported: use 1.."
                                       f"{max_group} (e.g. 32, 64, 128), -1 for one group per "
                                       "row, or 0 for the current setting")
        cfg, _ = self._current_meta()
        try:
            wanted = dataclasses.replace(cfg, bits=bits or cfg.bits,
                                         group_size=group_size or cfg.group_size)
        except QuantConfigError as e:
            raise InvalidArgumentError(f"unsupported quantization settings: {e}") from None
        if self.current_version() is not None and (wanted.bits, wanted.group_size) != \
                (cfg.bits, cfg.group_size):
            raise FailedPreconditionError(
                f"the current version is {cfg.bits}-bit with group size {cfg.group_size}; tasks "
                f"added to it are quantized with the same settings (asked: {wanted.bits}-bit, "
                f"group size {wanted.group_size}). Send 0 to use them, or quantize into a new "
                "QUANTIZER_CHECKPOINT_DIR to change them")
        return wanted

    def validate(self, tasks: list[TaskSpec], pending: set[str], bits: int = 0,
                 group_size: int = 0) -> QuantConfig:
        """Raise InvalidArgumentError (or AlreadyExists/FailedPrecondition) before anything
        starts; returns the settings the job will use."""
        if not tasks:
            raise InvalidArgumentError("StartJob needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"task names repeat in one job: {names}")
        wanted = self.resolve_settings(bits, group_size)
        cfg, quantized = self._current_meta()
        for spec in tasks:
            check_task_name(spec.name)
            if spec.name in quantized:
                raise AlreadyExistsError(f"task {spec.name!r} is already part of the quantized "
                                         "base; pick another name")
            if spec.name in pending:
                raise AlreadyExistsError(f"task {spec.name!r} is already in a queued or running job")
            if not spec.calibration_path:
                raise InvalidArgumentError(f"task {spec.name!r}: calibration_path is required")
            try:
                calibration_tokens(spec.calibration_path, self.tokenizer, cfg.num_seqs, cfg.seq_len)
                read_adapter(spec, self.model_config)
            except (CalibrationError, AdapterError, OSError) as e:
                raise InvalidArgumentError(f"task {spec.name!r}: {e}") from None
        return wanted

    def screen(self, job: Job) -> dict[str, InfluenceReport]:
        """Influence report of each of the job's tasks (blocking; a job thread). The base it
        loads is kept for this job's `run` when any task is left to quantize."""
        torch.set_num_threads(self.config.num_threads)
        cfg, _ = self._current_meta()
        self._screened_base = None
        base = load_base(str(self.model_dir))
        reports = screen_tasks(base[0], base[1], job.tasks, cfg.seq_len, self.influence, self.device)
        for name, report in reports.items():
            log.info("job %s: task %s %s", job.job_id, name, report.summary())
        if any(not report.should_quarantine for report in reports.values()):
            self._screened_base = (job.job_id, base)
        return reports

    def _take_base(self, job: Job) -> tuple | None:
        """The base `screen` loaded for this job, if any (handed over once)."""
        held, self._screened_base = self._screened_base, None
        return held[1] if held is not None and held[0] == job.job_id else None

    def run(self, job: Job, progress: ProgressFn) -> Path:
        """Quantize the job's kept tasks and publish a new version directory atomically
        (blocking; a job thread)."""
        torch.set_num_threads(self.config.num_threads)
        tasks = job.kept_tasks
        base = self._take_base(job)
        with torch.no_grad():
            if self.current_version() is None:
                from services.quantizer.pipeline import quantize
                cfg = dataclasses.replace(self.config.quant,
                                          bits=job.bits or self.config.quant.bits,
                                          group_size=job.group_size or self.config.quant.group_size)
                log.info("no quantized version in %s: full %d-bit g%d quantization for %s",
                         self.root, cfg.bits, cfg.group_size, [t.name for t in tasks])
                return quantize(str(self.model_dir), tasks, cfg, self.root,
                                self.device, progress=progress, show_progress=False, base=base)
            from services.quantizer.incremental import add_tasks
            return add_tasks(self.root, tasks, self.device, progress=progress, show_progress=False,
                             base=base)
