"""Scheduling policies; `make_scheduler(name, ...)` builds one by name."""
from __future__ import annotations

from services.engine.block_manager import BlockManager
from services.engine.policies.fifo import FifoScheduler
from services.engine.policies.inlaid import InlaidScheduler
from services.engine.policies.mlfq import MLFQScheduler
from services.engine.policies.wfq import WFQScheduler
from services.engine.scheduler import Scheduler, SchedulerConfig

POLICIES: dict[str, type[Scheduler]] = {
    FifoScheduler.name: FifoScheduler,
    InlaidScheduler.name: InlaidScheduler,
    MLFQScheduler.name: MLFQScheduler,
    WFQScheduler.name: WFQScheduler,
}


def make_scheduler(name: str, config: SchedulerConfig, block_manager: BlockManager) -> Scheduler:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(config, block_manager)
