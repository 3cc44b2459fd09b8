"""The block allocator of the paged KV cache, with prefix caching.

The pool has `num_blocks` blocks of `block_size` tokens. A sequence holds a list of blocks (its
block table); a block may be held by several sequences at once when they share its whole token
prefix. With prefix caching on, a block that has been filled completely is registered under a
digest of every token up to its end (the digest chains the previous block's), so a later
sequence that starts with the same tokens takes the block instead of recomputing it. Blocks no
sequence holds stay cached and are evicted least recently used when fresh ones are needed.

Only full blocks are shared, and only read: a sequence writes its own partial last block.
Everything here is host-side bookkeeping; the device sees only block tables.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

_ROOT = b"llama-jax prefix"


class BlockAllocator:
    """Free lists and reference counts of the blocks of one pool."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_cache: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._refs = np.zeros(num_blocks, np.int32)
        self._digest: dict[int, bytes] = {}  # block -> digest of the prefix it ends
        self._cached: dict[bytes, int] = {}  # digest -> block (held or not)
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self.hits = 0  # tokens served from the cache
        self.queries = 0  # prompt tokens looked up

    @property
    def available(self) -> int:
        """Blocks that can be handed out now: free ones plus cached ones nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def digests(self, tokens: Sequence[int]) -> list[bytes]:
        """The digest of each full block of `tokens`, chained from the first."""
        out, digest, bs = [], _ROOT, self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            chunk = np.asarray(tokens[start : start + bs], np.int64).tobytes()
            digest = hashlib.blake2b(digest + chunk, digest_size=16).digest()
            out.append(digest)
        return out

    def match(self, digests: Sequence[bytes], n_tokens: int) -> list[int]:
        """Take (hold) the cached blocks that begin a sequence of `n_tokens` tokens whose full
        blocks have `digests`, as many as are cached in a row from the first.

        At most `n_tokens - 1` tokens are matched: the last prompt token is always computed,
        since its logits give the first generated token, and computing it must not write into
        a shared block (so a prompt that is all full cached blocks recomputes its last block).
        """
        self.queries += n_tokens
        if not self.prefix_cache:
            return []
        blocks = []
        for digest in digests[: max(n_tokens - 1, 0) // self.block_size]:
            block = self._cached.get(digest)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self._hold(block)
        self.hits += len(blocks) * self.block_size
        return blocks

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh blocks (held), evicting idle cached ones oldest first; None if there are
        not that many, and then nothing is taken."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._cached[self._digest.pop(block)]
            self._refs[block] = 1
            out.append(block)
        return out

    def register(self, digests: Sequence[bytes], blocks: Sequence[int]) -> None:
        """Record that `blocks[i]` holds the full block with `digests[i]` (see `digests`), so
        later sequences can share it. A block whose prefix is already cached elsewhere (two
        identical prompts computed at once) is left unregistered."""
        if not self.prefix_cache:
            return
        for digest, block in zip(digests, blocks, strict=False):
            if block in self._digest or digest in self._cached:
                continue
            self._digest[block] = digest
            self._cached[digest] = block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one hold on each block. Cached blocks nobody holds stay cached (and become the
        most recently used); others go back to the free list."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than held")
            if self._refs[block] == 0:
                if block in self._digest:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            self._idle.pop(block)
        self._refs[block] += 1

    def check_all_free(self) -> None:
        """Raise unless no block is held (for tests and shutdown checks)."""
        held = np.flatnonzero(self._refs)
        if held.size:
            raise AssertionError(f"blocks still held: {held.tolist()}")
