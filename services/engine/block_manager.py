"""BlockManager: fixed-size KV-cache blocks handed to sequences (no torch)."""
from __future__ import annotations

from collections import deque

from services.engine.sequence import Sequence


class BlockManager:
    """Owns the free list of KV-cache blocks; the tensors live in the model runner.

    A sequence holding n tokens of KV needs ceil(n / block_size) blocks. Blocks
    are allocated for the whole prompt at prefill and one at a time as decode
    crosses a block boundary; freed blocks go back to the free list and are
    reused by later sequences.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, extra_tokens: int = 0) -> bool:
        """Whether the sequence's whole current token list (+ extra) fits in free blocks."""
        need = self.blocks_needed(seq.num_tokens + extra_tokens) - len(seq.block_table)
        return need <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give the sequence blocks for all its current tokens (prefill or recompute)."""
        need = self.blocks_needed(seq.num_tokens) - len(seq.block_table)
        if need > len(self._free):
            raise MemoryError(f"need {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            seq.block_table.append(self._free.popleft())

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode token of seq has a slot (a new block only at a boundary)."""
        needs_block = seq.num_tokens > len(seq.block_table) * self.block_size
        return not needs_block or len(self._free) > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for seq's newest token (called before a decode step)."""
        if seq.num_tokens > len(seq.block_table) * self.block_size:
            if not self._free:
                raise MemoryError("no free KV block for decode")
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        """Return seq's blocks (finished, aborted or preempted)."""
        self._free.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0
