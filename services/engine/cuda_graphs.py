"""DecodeGraphs: pure-decode steps of the GPU fast path replayed from CUDA graphs, per batch bucket."""
from __future__ import annotations

import torch

from services.engine.attention import AttentionMetadata
from services.engine.kernels.lora import LoraBatch


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, 16, 32, then steps of 16 up to max_num_seqs (included)."""
    sizes = [n for n in (1, 2, 4, 8, 16, 32) if n < max_num_seqs]
    n = 48
    while n < max_num_seqs:
        sizes.append(n)
        n += 16
    return sizes + [max_num_seqs]


def lora_grouping(slot_of: list[int]) -> torch.Tensor:
    """Host version of kernels.lora.prepare_lora_batch: int32 [4, T] = order, sorted slots,
    first and one-past-last sorted position of each position's segment (no device sort in
    the graph)."""
    order = sorted(range(len(slot_of)), key=lambda i: slot_of[i])
    slots = [slot_of[i] for i in order]
    start, end = [0] * len(slots), [0] * len(slots)
    i = 0
    while i < len(slots):
        j = i
        while j < len(slots) and slots[j] == slots[i]:
            j += 1
        for k in range(i, j):
            start[k], end[k] = i, j
        i = j
    return torch.tensor([order, slots, start, end], dtype=torch.int32)


def bucket_for(num_seqs: int, sizes: list[int]) -> int | None:
    """Smallest captured size ≥ num_seqs (None: too large for any graph)."""
    return next((s for s in sizes if s >= num_seqs), None)


class DecodeGraphs:
    """One CUDA graph per (batch bucket, with LoRA or not), captured on first use.

    Inputs live in static device buffers sized for the largest bucket; a step copies its
    token ids, positions, KV slots, block tables, lengths and adapter slots in (one host→device
    copy), pads the bucket with rows that write into a scratch KV block, replays, and returns
    the fp32 logits of the real rows. The only host sync left is the sampler reading tokens.
    Graphs read the model's weights and LoRA stacks by address: weight swaps that are not in
    place and LoRA stack reallocations change `epoch`, and the graphs are recaptured.
    """

    def __init__(self, runner, max_num_seqs: int, max_blocks_per_seq: int, scratch_block: int) -> None:
        self.runner = runner
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.scratch_block = scratch_block
        dev, n = runner.device, self.sizes[-1]
        # [N] inputs and [N, max_blocks] tables; padding rows are reset every step (see run)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32,
                                       device=dev)
        # LoRA token grouping (services.engine.kernels.lora.LoraBatch), computed on the host:
        # rows 0-3 = order, sorted slots, segment start, segment end per sorted position
        self.lora_rows = torch.zeros(4, n, dtype=torch.int32, device=dev)
        self.lora_order = torch.zeros(n, dtype=torch.long, device=dev)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._epoch: tuple | None = None
        self._pool = None
        self.num_captures = 0

    def can_run(self, seqs) -> bool:
        bs = self.runner.block_size
        return (len(seqs) <= self.sizes[-1]
                and all(s.num_tokens - s.num_cached_tokens == 1 for s in seqs)
                and all(-(-s.num_tokens // bs) <= self.max_blocks_per_seq for s in seqs))

    def run(self, seqs, slot_of: list[int]) -> torch.Tensor:
        """Logits [len(seqs), V] fp32 (a view of a static buffer: read before the next step)."""
        num, bs = len(seqs), self.runner.block_size
        bucket = bucket_for(num, self.sizes)
        use_lora = any(s >= 0 for s in slot_of)
        epoch = (self.runner.model_epoch, self.runner.lora.layout_version)
        if epoch != self._epoch:
            self._graphs.clear()
            # The freed graphs' memory pool dies with them; capturing into its stale handle
            # trips an allocator assertion (seen on torch 2.11), so the next capture starts a new one.
            self._pool = None
            self._epoch = epoch
        max_nb = max(-(-s.num_tokens // bs) for s in seqs)
        rows = []
        for s, slot in zip(seqs, slot_of, strict=True):
            pos = s.num_tokens - 1
            table = s.block_table[: -(-s.num_tokens // bs)]
            if len(table) * bs < s.num_tokens:
                raise ValueError(f"sequence {s.request_id}: {len(s.block_table)} KV blocks "
                                 f"cannot hold {s.num_tokens} tokens")
            rows.append([s.token_ids[-1], pos, table[pos // bs] * bs + pos % bs, s.num_tokens]
                        + table + [self.scratch_block] * (max_nb - len(table)))
        dev = torch.tensor(rows, dtype=torch.long).to(self.runner.device)   # [B, 4 + max_nb]
        self.input_ids[:num].copy_(dev[:, 0])
        self.positions[:num].copy_(dev[:, 1])
        self.slot_mapping[:num].copy_(dev[:, 2])
        self.context_lens[:num].copy_(dev[:, 3])
        self.block_tables[:num, :max_nb].copy_(dev[:, 4:])
        if bucket > num:  # padding rows: one token at position 0 written into the scratch block
            self.input_ids[num:bucket].zero_()
            self.positions[num:bucket].zero_()
            self.slot_mapping[num:bucket].fill_(self.scratch_block * bs)
            self.context_lens[num:bucket].fill_(1)
            self.block_tables[num:bucket, 0].fill_(self.scratch_block)
        if use_lora:
            self.lora_rows[:, :bucket].copy_(lora_grouping(slot_of + [-1] * (bucket - num)).to(
                self.runner.device))
            self.lora_order[:bucket].copy_(self.lora_rows[0, :bucket])
        entry = self._graphs.get((bucket, use_lora))
        if entry is None:
            entry = self._capture(bucket, use_lora)
            self._graphs[(bucket, use_lora)] = entry
        graph, logits = entry
        graph.replay()
        return logits[:num]

    def _forward(self, bucket: int, use_lora: bool) -> torch.Tensor:
        r = self.runner
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:bucket],
                                 query_starts=list(range(bucket + 1)), context_lens=[],
                                 prefill_ids=[], prefill_blocks=[],
                                 decode_blocks=self.block_tables[:bucket],
                                 decode_lens=self.context_lens[:bucket], is_all_decode=True)
        lora = None
        if use_lora:
            r.lora.use_batch(LoraBatch(order=self.lora_order[:bucket],
                                       sorted_slots=self.lora_rows[1, :bucket],
                                       seg_start=self.lora_rows[2, :bucket],
                                       seg_end=self.lora_rows[3, :bucket]))
            lora = r.lora
        hidden = r.model(self.input_ids[:bucket], self.positions[:bucket], r.kv_caches, meta, lora)
        return r.model.logits(hidden)

    def _capture(self, bucket: int, use_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on the step's real inputs: compiles kernels and tunes every GEMM shape (the
        # tuner cannot run inside a capture). It writes the same K/V the replay writes again.
        self._forward(bucket, use_lora)
        torch.cuda.synchronize(self.runner.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(bucket, use_lora)
        self._pool = graph.pool()
        self.num_captures += 1
        return graph, logits
