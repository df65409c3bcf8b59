"""QuantizerBackend: the service's view of the library — checks a job's inputs, then runs it.

A job adds tasks to the current MLGPTQ version with `incremental.add_tasks` (cached per-layer
aggregates of the earlier tasks + statistics of the new tasks only). When the checkpoint
directory holds no version yet, the first job quantizes the base fully for the job's tasks:
the task registry keeps no calibration data, so tasks registered earlier without it cannot
take part — they are served on whatever base the engines have.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from services.common.adapters import AdapterError
from services.common.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError
from services.common.model_source import resolve_model
from services.common.task_registry import check_task_name
from services.quantizer.calibration import CalibrationError, TaskSpec, calibration_tokens, read_adapter
from services.quantizer.checkpoint import QUANT_CONFIG, CheckpointError, resolve
from services.quantizer.config import QuantConfig, QuantConfigError, QuantizerServiceConfig
from services.quantizer.pipeline import ProgressFn

log = logging.getLogger(__name__)
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads")


class QuantizerBackend:
    """Holds the base's config and tokenizer (enough to validate inputs in milliseconds);
    a job loads the weights itself, so an idle quantizer keeps no model in memory."""

    def __init__(self, config: QuantizerServiceConfig) -> None:
        self.config = config
        self.root = Path(config.resolved_checkpoint_dir())
        self.device = config.resolved_device()
        source = resolve_model(config.model)
        if source.kind != "hf" or source.path is None:
            raise ValueError(f"QUANTIZER_MODEL {config.model!r} resolves to {source.kind}: "
                             "quantization needs real weights (a named model or a HF directory)")
        self.model_dir = Path(source.path)
        self.model_config = AutoConfig.from_pretrained(str(self.model_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))

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

    def validate(self, tasks: list[TaskSpec], pending: set[str]) -> None:
        """Raise InvalidArgumentError (or AlreadyExists/FailedPrecondition) before anything starts."""
        if not tasks:
            raise InvalidArgumentError("StartJob needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"task names repeat in one job: {names}")
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

    def run(self, tasks: list[TaskSpec], progress: ProgressFn) -> Path:
        """Quantize and publish a new version directory atomically (blocking; a job thread)."""
        torch.set_num_threads(self.config.num_threads)
        with torch.no_grad():
            if self.current_version() is None:
                from services.quantizer.pipeline import quantize
                log.info("no quantized version in %s: full quantization for %s", self.root,
                         [t.name for t in tasks])
                return quantize(str(self.model_dir), tasks, self.config.quant, self.root,
                                self.device, progress=progress, show_progress=False)
            from services.quantizer.incremental import add_tasks
            return add_tasks(self.root, tasks, self.device, progress=progress, show_progress=False)
