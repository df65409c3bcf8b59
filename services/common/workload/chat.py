"""Prompt rendering shared by training, evaluation, traces and length measurement."""
from __future__ import annotations


def render_prompt(tokenizer, prompt: str) -> str:
    """The user prompt inside the model's chat template, ending where the assistant answers.

    Training and serving must render identically, or an adapter sees a different context at
    inference than it was trained on.
    """
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the rendered prompt (the template already holds any special tokens)."""
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False).input_ids


def completion_token_ids(tokenizer, completion: str) -> list[int]:
    """Token ids of a reference completion followed by EOS, as the model should emit it."""
    return tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
