"""LLMEngine: requests in, token/text deltas out; each step is schedule → run → update."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.adapters import load_adapter
from services.common.model_source import resolve_model
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.errors import (AdapterInUseError, DuplicateRequestError,
                                    InvalidRequestError, UnknownTaskError)
from services.engine.model_runner import ModelRunner
from services.engine.policies import make_scheduler
from services.engine.sequence import FinishReason, SamplingParams, Sequence


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (a streaming chunk)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_output_tokens: int
    is_finished: bool


@dataclass
class GenerationResult:
    """A whole generation, assembled by `LLMEngine.generate`."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = FinishReason.NONE


@dataclass
class _TextState:
    """Per-request text bookkeeping: full text, how much was emitted, the detokenizer."""

    detok: IncrementalDetokenizer | None
    text: str = ""
    num_emitted_chars: int = 0


class LLMEngine:
    """Multi-LoRA generation over one shared base model (see docs/architecture.md)."""

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None,
                 tokenizer=None, load_tokenizer: bool = True) -> None:
        self.config = config
        source = None
        if runner is None:
            source = resolve_model(config.model)
            runner = ModelRunner.load(config, source)
        self.runner = runner
        shape = runner.shape
        if tokenizer is None and load_tokenizer:
            source = source or resolve_model(config.model)
            if source.kind == "hf":
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(source.path)
        self.tokenizer = tokenizer
        eos = set(shape.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self.max_model_len = config.max_model_len or shape.max_position_embeddings
        self.block_manager = BlockManager(runner.num_kv_blocks, config.block_size)
        self.scheduler = make_scheduler(config.policy, config.scheduler_config(),
                                        self.block_manager)
        self._seqs: dict[str, Sequence] = {}
        self._text: dict[str, _TextState] = {}

    @classmethod
    def from_env(cls) -> LLMEngine:
        return cls(EngineConfig.from_env())

    # ---- adapters -------------------------------------------------------------
    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA directory as task `name` (replacing a task of that name)."""
        if not name:
            raise InvalidRequestError("adapter name must be non-empty ('' is the base model)")
        adapter = load_adapter(name, path, self.runner.shape.dims(), self.config.max_lora_rank)
        self.runner.add_adapter(adapter)

    def remove_adapter(self, name: str) -> None:
        users = [s.request_id for s in self._seqs.values() if s.task == name]
        if users:
            raise AdapterInUseError(f"task {name!r} is used by {len(users)} unfinished "
                                    f"request(s), e.g. {users[0]!r}; abort them first")
        self.runner.remove_adapter(name)

    @property
    def adapter_names(self) -> list[str]:
        return self.runner.lora.adapter_names

    def swap_base_weights(self, modules: dict[tuple[int, str], object]) -> None:
        """Replace base linears {(layer, name): module} between steps (quantized versions)."""
        for (layer, name), module in modules.items():
            self.runner.set_base_linear(layer, name, module)

    # ---- requests -------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, task: str = "",
                    predicted_output_tokens: int | None = None, deadline_s: float | None = None) -> None:
        """Queue a request; deadline_s: when its client stops waiting (time.monotonic), which the
        inlaid policy ranks by (a request that can no longer make it goes after those that can)."""
        params = params or SamplingParams()
        self._validate(request_id, prompt_token_ids, params, task)
        seq = Sequence(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                       params=params, task=task,
                       predicted_output_tokens=predicted_output_tokens, deadline_s=deadline_s)
        detok = (IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
                 if self.tokenizer is not None else None)
        self._seqs[request_id] = seq
        self._text[request_id] = _TextState(detok)
        self.scheduler.add(seq)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams,
                  task: str) -> None:
        if request_id in self._seqs:
            raise DuplicateRequestError(f"request {request_id!r} is already in the engine")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        vocab = self.runner.shape.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if params.max_tokens > self.config.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} exceeds the limit "
                                      f"{self.config.max_tokens_limit}")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(f"prompt ({len(prompt)} tokens) + max_tokens "
                                      f"({params.max_tokens}) = {total} exceeds max_model_len "
                                      f"{self.max_model_len}")
        if self.block_manager.blocks_needed(total) > self.block_manager.num_blocks:
            raise InvalidRequestError(f"{total} tokens need more KV blocks than the engine has "
                                      f"({self.block_manager.num_blocks})")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none")
        if task and not self.runner.lora.has_adapter(task):
            raise UnknownTaskError(task)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; returns its final (CANCELLED) output, or None if unknown."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self.scheduler.abort(request_id)
        seq.finish_reason = FinishReason.CANCELLED
        return self._finish(seq, [], "")

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_unfinished(self) -> int:
        return len(self._seqs)

    def stats(self) -> dict[str, int]:
        """Gauges for metrics and health: queue sizes, KV blocks, adapters."""
        bm = self.block_manager
        return {"num_waiting": len(self.scheduler.waiting),
                "num_running": len(self.scheduler.running),
                "num_kv_blocks": bm.num_blocks, "num_free_kv_blocks": bm.num_free_blocks,
                "num_adapters": len(self.runner.lora.adapter_names),
                "num_resident_adapters": len(self.runner.lora.loaded_names),
                "num_adapter_loads": self.runner.lora.num_loads}

    # ---- the step -------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        if self.config.lora_prefetch and self.runner.lora.can_prefetch:   # packs made while this step runs
            self.runner.lora.prefetch(self.scheduler.upcoming_tasks(self.config.lora_prefetch),
                                      self.config.lora_prefetch)
        tokens = self.runner.run(out.seqs)
        self.scheduler.update(out, tokens)
        return [self._postprocess(seq, tok) for seq, tok in zip(out.seqs, tokens, strict=True)]

    def _postprocess(self, seq: Sequence, token_id: int) -> RequestOutput:
        state = self._text[seq.request_id]
        reason = FinishReason.NONE
        if token_id in self.eos_token_ids and not seq.params.ignore_eos:
            reason = FinishReason.EOS
        elif seq.num_output_tokens >= seq.params.max_tokens:
            reason = FinishReason.LENGTH
        if state.detok is not None:
            state.text += state.detok.add(token_id)
            if reason is not FinishReason.NONE:
                state.text += state.detok.flush()
            cut = self._find_stop(seq.params.stop, state)
            if cut is not None:
                state.text = state.text[:cut]
                reason = FinishReason.STOP
        if reason is FinishReason.NONE:
            end = len(state.text) - _stop_holdback(state.text, seq.params.stop)
            new_text = state.text[state.num_emitted_chars:end]
            state.num_emitted_chars = max(state.num_emitted_chars, end)
            return RequestOutput(seq.request_id, [token_id], new_text, reason,
                                 seq.num_prompt_tokens, seq.num_output_tokens, False)
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        return self._finish(seq, [token_id], state.text[state.num_emitted_chars:])

    def _find_stop(self, stops: tuple[str, ...], state: _TextState) -> int | None:
        if not stops:
            return None
        # Only the unemitted tail (plus overlap) can hold a new match.
        longest = max(len(s) for s in stops)
        begin = max(0, state.num_emitted_chars - longest)
        hits = [i for i in (state.text.find(s, begin) for s in stops) if i >= 0]
        return min(hits) if hits else None

    def _finish(self, seq: Sequence, new_token_ids: list[int], new_text: str) -> RequestOutput:
        del self._seqs[seq.request_id]
        del self._text[seq.request_id]
        self.runner.sampler.release(seq.request_id)
        return RequestOutput(seq.request_id, new_token_ids, new_text, seq.finish_reason,
                             seq.num_prompt_tokens, seq.num_output_tokens, True)

    # ---- convenience ----------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 tasks: list[str] | None = None) -> list[GenerationResult]:
        """Run prompts to completion (tests, benchmarks); results in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        tasks = tasks or [""] * len(prompts)
        ids = [f"gen-{id(self)}-{i}" for i in range(len(prompts))]
        results = {rid: GenerationResult(rid) for rid in ids}
        for rid, prompt, p, task in zip(ids, prompts, params_list, tasks, strict=True):
            self.add_request(rid, self.encode(prompt), p, task)
        while any(not results[r].finish_reason for r in ids):
            if not self.has_unfinished:
                raise RuntimeError("engine idle with unfinished generate() requests")
            for o in self.step():
                if o.request_id in results:
                    res = results[o.request_id]
                    res.token_ids += o.new_token_ids
                    res.text += o.new_text
                    if o.is_finished:
                        res.finish_reason = o.finish_reason
        return [results[r] for r in ids]


def _stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best
