"""Request traces: JSONL records of arrival time, task and lengths, read for replay."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CHARS_PER_TOKEN = 4     # rough English BPE ratio, used only when a trace has text but no token count


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace; `output_tokens` is the true (reference) output length."""

    arrival_s: float
    task: str
    prompt_tokens: int
    output_tokens: int
    predicted_output_tokens: int | None = None
    prompt: str | None = None            # kept when the trace has text (the real engine needs it)
    request_id: str = ""
    priority_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.arrival_s < 0:
            raise ValueError(f"arrival_s must be >= 0, got {self.arrival_s}")
        if self.prompt_tokens <= 0 or self.output_tokens <= 0:
            raise ValueError(f"prompt_tokens and output_tokens must be > 0, got "
                             f"{self.prompt_tokens}, {self.output_tokens}")
        if self.predicted_output_tokens is not None and self.predicted_output_tokens <= 0:
            raise ValueError(f"predicted_output_tokens must be > 0, got {self.predicted_output_tokens}")
        if self.priority_weight <= 0:
            raise ValueError(f"priority_weight must be > 0, got {self.priority_weight}")

    @classmethod
    def from_record(cls, rec: dict, index: int) -> TraceRequest:
        """Parse one JSONL record; accepts token counts or prompt text (tokens ≈ chars / 4)."""
        if "output_tokens" not in rec:
            raise ValueError(f"trace record {index} has no output_tokens: {sorted(rec)}")
        prompt = rec.get("prompt")
        if "prompt_tokens" in rec:
            prompt_tokens = int(rec["prompt_tokens"])
        elif prompt is not None:
            prompt_tokens = max(1, round(len(prompt) / CHARS_PER_TOKEN))
        else:
            raise ValueError(f"trace record {index} has neither prompt_tokens nor prompt")
        predicted = rec.get("predicted_output_tokens")
        return cls(arrival_s=float(rec.get("arrival_s", 0.0)), task=str(rec.get("task", "")),
                   prompt_tokens=prompt_tokens, output_tokens=int(rec["output_tokens"]),
                   predicted_output_tokens=None if predicted is None else int(predicted),
                   prompt=prompt, request_id=str(rec.get("request_id", f"r{index}")),
                   priority_weight=float(rec.get("priority_weight", 1.0)))

    def to_record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSONL trace, sorted by arrival time. Blank lines are skipped."""
    requests = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno + 1}: not JSON: {e}") from None
            requests.append(TraceRequest.from_record(rec, lineno))
    return sorted(requests, key=lambda r: r.arrival_s)


def write_trace(path: str | Path, requests: list[TraceRequest]) -> None:
    with Path(path).open("w") as f:
        for req in requests:
            f.write(json.dumps(req.to_record()) + "\n")
