"""Stand-in training rows before real adapter outputs exist: reference completions' token counts."""
from __future__ import annotations

from services.common.workload.chat import completion_token_ids, render_prompt


def reference_rows(num_per_task: int, split: str = "train", seed: int = 0,
                   model: str = "smollm2-135m") -> list[dict]:
    """{task, prompt, output_tokens} per built-in task, output_tokens = reference completion + EOS.

    A well-trained adapter answers close to its reference, so these lengths
    approximate the real ones; data/lengths.jsonl (real generations) replaces them.
    """
    from transformers import AutoTokenizer

    from services.common.model_source import resolve_model
    from services.common.workload.task import builtin_tasks

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model).path)
    rows = []
    for name, task in builtin_tasks().items():
        for ex in task.examples(split, num_per_task, seed=seed):
            rows.append({"task": name, "prompt": render_prompt(tokenizer, ex.prompt),
                         "output_tokens": len(completion_token_ids(tokenizer, ex.completion))})
    return rows
