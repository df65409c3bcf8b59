"""Tokenizer: the model's HF tokenizer and chat template, as the gateway needs them."""
from __future__ import annotations

import json
from pathlib import Path

from services.common.errors import InvalidArgumentError

_ROLES = ("system", "user", "assistant")


class Tokenizer:
    """Turns a raw prompt or chat messages into token ids (and the text the model sees)."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self._tok = AutoTokenizer.from_pretrained(str(self.model_dir))
        config = json.loads((self.model_dir / "config.json").read_text())
        #: prompt + output tokens the model can attend to
        self.max_model_len = int(config.get("max_position_embeddings") or 2048)
        self.config = config

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self._tok(prompt, add_special_tokens=True)["input_ids"])

    def render_chat(self, messages: list[tuple[str, str]]) -> str:
        """The chat template applied to (role, content) turns, ending with the assistant cue."""
        for i, (role, _content) in enumerate(messages):
            if role not in _ROLES:
                raise InvalidArgumentError(
                    f"messages[{i}].role is {role!r}; expected one of {list(_ROLES)}")
        if not self.has_chat_template:
            raise InvalidArgumentError("this model has no chat template; send `prompt` instead")
        turns = [{"role": r, "content": c} for r, c in messages]
        return self._tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def encode_rendered(self, text: str) -> list[int]:
        # The template already holds the special tokens; adding BOS again would double it.
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)
