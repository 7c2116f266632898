"""The KV cache: keys and values of every layer in blocks of BLOCK_TOKENS positions, of one KV type.

    TYPES                    name -> KVType: a KV type's record (native/kv.h: id, row bytes,
                             encode, decode) with its module here (kvcache/<name>.py: what it is,
                             and the numpy reference the native record is tested against)
    help_text(defaults)      the --kv-type help, from TYPES and each format's default
    Pool                     blocks for all sequences, in memory mapped lazily: a block's pages are
                             touched (committed) when a position in it is first written
    Cache                    the one mutable inference state: a pool, a block table and a position
                             count per sequence slot, copy on write, and an index of full blocks
                             by the tokens that filled them (prefix reuse)

A layer's keys (and values) are one array [blocks, kv_heads, BLOCK_TOKENS, row_bytes] of uint8; a
row is head_dim values in the type's encoding. Sequence slot s holds positions 0..pos[s]-1; position
t lies in block tables[s][t // BLOCK_TOKENS] at t % BLOCK_TOKENS; with a sliding window, blocks
that fell out of it are released and their entries are None (`forget_before`). Blocks are
reference counted: a block may be in several tables (a shared prefix, a forked sequence) and in
the prefix index; a write into a block someone else also holds copies it first. The attention
kernels read only the blocks of the sequence's own table (native.attention checks every id
against the pool).
"""

import heapq
import mmap
from collections import OrderedDict
from importlib import import_module

import numpy as np

from .. import native
from ..errors import Llama2Error, UsageError

BLOCK_TOKENS = 16  # positions per block


class KVType:
    """One KV type. Its facts are native/kv.h's record, the one list of types: `ID` (what the
    kernels take), `needs` (what head_dim must be, "" for any), `row_bytes` and `encode` (what the
    cache is written with, prompt rows and decode rows alike). `reference` is its module here,
    kvcache/<NAME>.py: the description and a numpy encode/decode, the reference the tests hold the
    native record to, bit for bit (nothing else runs it)."""

    def __init__(self, kv_id: int, name: str, needs: str):
        self.ID, self.NAME, self.needs = kv_id, name, needs
        self.reference = import_module(f"{__name__}.{name}")

    def holds(self, hd: int) -> bool:
        """Whether rows of head_dim `hd` can be cached in this type."""
        return native.kv_row_bytes(self.ID, hd) >= 0

    def row_bytes(self, hd: int) -> int:
        """Bytes of one cached row of `hd` values; UsageError when the type cannot hold such rows."""
        n = native.kv_row_bytes(self.ID, hd)
        if n < 0:
            raise UsageError(f"--kv-type {self.NAME}: needs {self.needs}; this model's head_dim is {hd}")
        return n

    def encode(self, x) -> np.ndarray:  # float32 [..., hd] -> uint8 [..., row_bytes(hd)]
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((*x.shape[:-1], self.row_bytes(x.shape[-1])), np.uint8)
        native.kv_encode(self.ID, x, out)
        return out

    def __repr__(self):
        return f"<KV type {self.NAME}>"


TYPES = {name: KVType(i, name, needs) for i, (name, needs) in enumerate(native.kv_types())}


def get(name: str, label: str = "--kv-type") -> KVType:
    if name not in TYPES:
        raise UsageError(f"{label} {name}: expected one of {', '.join(TYPES)}")
    return TYPES[name]


def help_text(defaults: dict) -> str:
    """The --kv-type help: the types and the default (`defaults`: model format -> the KV type its
    models get, from the formats' records)."""
    names = list(TYPES)
    by_type = {}
    for fmt, t in defaults.items():
        by_type.setdefault(t, []).append(fmt)
    default = "; ".join(f"{t} for {' and '.join(fmts)} models" for t, fmts in by_type.items())
    return f"KV cache type: {', '.join(names[:-1])} or {names[-1]} (default: {default})"


def bytes_per_token(config, kv_type: str) -> int:
    """Cache bytes one position takes (keys and values of every layer)."""
    return 2 * config.n_layers * config.n_kv_heads * get(kv_type).row_bytes(config.head_dim)


def pool_bytes(config, kv_type: str, positions: int) -> int:
    """The most a Pool for `positions` positions (whole blocks) commits: every page touched."""
    return -(-positions // BLOCK_TOKENS) * BLOCK_TOKENS * bytes_per_token(config, kv_type)


class CacheFull(Llama2Error):
    """No free block is left in the pool for a sequence that must grow."""


class Pool:
    """`n_blocks` blocks of every layer's keys and values, mapped anonymously: the operating system
    gives a page memory only when it is first written, and blocks are handed out lowest id first,
    so the memory in use follows the positions held, not the pool's size."""

    def __init__(self, config, kv_type: str, n_blocks: int, block_tokens: int = BLOCK_TOKENS):
        if n_blocks < 1:
            raise ValueError("a KV pool needs at least one block")
        self.type = get(kv_type)
        self.kv_type = kv_type
        self.n_blocks, self.block_tokens = n_blocks, block_tokens
        self.head_dim = config.head_dim
        shape = (config.n_layers, n_blocks, config.n_kv_heads, block_tokens, self.type.row_bytes(config.head_dim))
        size = int(np.prod(shape))
        self._maps = (mmap.mmap(-1, size), mmap.mmap(-1, size))
        self.k = np.frombuffer(self._maps[0], np.uint8, size).reshape(shape)
        self.v = np.frombuffer(self._maps[1], np.uint8, size).reshape(shape)
        self.refs = np.zeros(n_blocks, np.int32)
        self._free = list(range(n_blocks))  # a heap: lowest id first keeps the touched pages dense

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def alloc(self):
        """A block with one reference, or None when none is free."""
        if not self._free:
            return None
        b = heapq.heappop(self._free)
        self.refs[b] = 1
        return b

    def ref(self, b: int):
        self.refs[b] += 1

    def release(self, b: int):
        self.refs[b] -= 1
        if self.refs[b] == 0:
            heapq.heappush(self._free, b)
        elif self.refs[b] < 0:
            raise AssertionError(f"KV block {b} released more often than held")

    def copy(self, src: int, dst: int):
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


class Cache:
    """Keys and values of up to `slots` sequences of at most `seq_len` positions each, in blocks of a
    shared Pool. `pos[s]` is the number of positions slot s holds; `tables[s]` its blocks."""

    def __init__(self, config, kv_type: str, slots: int = 1, seq_len: int = None, blocks: int = None):
        self.config = config
        self.seq_len = seq_len or config.seq_len
        bt = BLOCK_TOKENS
        self.pool = Pool(config, kv_type, blocks or slots * -(-self.seq_len // bt), bt)
        self.kv_type, self.type, self.block_tokens = kv_type, self.pool.type, bt
        self.pos = np.zeros(slots, np.int64)
        self.tables = [[] for _ in range(slots)]
        # positions `truncate` may take back (a speculative draft's rows): a sliding window keeps
        # that many more positions behind it (Transformer.forward_batch)
        self.rollback = 0
        self._index = OrderedDict()  # (parent serial, block tokens) -> (serial, block): LRU first
        self._serial = 0

    @property
    def slots(self) -> int:
        return len(self.tables)

    # -- blocks of a slot ---------------------------------------------------------------------

    def reset(self, slot: int = 0):
        """Forget slot's positions and return its blocks."""
        for b in self.tables[slot]:
            if b is not None:
                self.pool.release(b)
        self.tables[slot] = []
        self.pos[slot] = 0

    def blocks_needed(self, slot: int, n: int) -> int:
        """New blocks slot needs to hold `n` more positions (a shared partial last block counts)."""
        have, pos = len(self.tables[slot]), int(self.pos[slot])
        need = -(-(pos + n) // self.block_tokens) - have
        if pos % self.block_tokens and have and self.pool.refs[self.tables[slot][-1]] > 1:
            need += 1  # copy on write
        return need

    def free_blocks(self) -> int:
        """Blocks free now plus those only the prefix index holds (dropped when needed)."""
        return self.pool.free_blocks + sum(1 for _, b in self._index.values() if self.pool.refs[b] == 1)

    def reserve(self, slot: int, n: int):
        """Make slot's table cover `n` more positions, copying a shared last block before it is
        written. Raises CacheFull (the blocks taken so far stay with the slot) when the pool and the
        prefix index have no block left."""
        pos = int(self.pos[slot])
        if pos + n > self.seq_len:
            raise Llama2Error(f"context is full: {pos + n} positions exceed seq_len {self.seq_len}")
        table, bt = self.tables[slot], self.block_tokens
        if pos % bt and self.pool.refs[table[-1]] > 1:
            b = self._alloc()
            self.pool.copy(table[-1], b)
            self.pool.release(table[-1])
            table[-1] = b
        while len(table) * bt < pos + n:
            table.append(self._alloc())

    def _alloc(self) -> int:
        b = self.pool.alloc()
        while b is None and self._evict():
            b = self.pool.alloc()
        if b is None:
            raise CacheFull(f"the KV cache is full ({self.pool.n_blocks} blocks of {self.block_tokens} positions)")
        return b

    def truncate(self, slot: int, n: int):
        """Keep slot's first `n` positions (speculative decoding drops the rows of rejected guesses);
        blocks past them go back to the pool. A kept partial block is written again in place, or
        copied first when shared (`reserve`)."""
        if not 0 <= n <= self.pos[slot]:
            raise ValueError(f"cannot truncate slot {slot} of {self.pos[slot]} positions to {n}")
        table = self.tables[slot]
        keep = -(-n // self.block_tokens)
        for b in table[keep:]:
            self.pool.release(b)
        del table[keep:]
        self.pos[slot] = n

    def fork(self, src: int, dst: int):
        """Slot dst continues from slot src's positions, sharing its blocks (copied when written)."""
        self.reset(dst)
        for b in self.tables[src]:
            if b is not None:
                self.pool.ref(b)
        self.tables[dst] = list(self.tables[src])
        self.pos[dst] = self.pos[src]

    def forget_before(self, slot: int, position: int):
        """Release slot's blocks that hold only positions before `position` (a sliding window has
        moved past them: attention will not read them again); their table entries become None."""
        table = self.tables[slot]
        for i in range(min(len(table), position // self.block_tokens)):
            if table[i] is not None:
                self.pool.release(table[i])
                table[i] = None

    # -- reading and writing ------------------------------------------------------------------

    def locate(self, spans) -> tuple:
        """Where the rows of a pass go: `spans` is [(slot, first position, rows)] (reserved) ->
        block ids [N], offsets in the block [N], for `write`."""
        bt = self.block_tokens
        blocks, offs = [], []
        for slot, start, n in spans:
            pos = np.arange(start, start + n)
            table = self.tables[slot]  # the new positions' blocks are never released ones
            blocks.append(np.array([table[i] for i in range(start // bt, (start + n - 1) // bt + 1)],
                                   np.int64)[pos // bt - start // bt])
            offs.append(pos % bt)
        return np.concatenate(blocks), np.concatenate(offs)

    def write(self, layer: int, where: tuple, k, v):
        """Store k, v [N, kv_heads, hd] float32 of `layer` at `where` (from `locate`)."""
        blocks, offs = where
        self.pool.k[layer, blocks, :, offs] = self.type.encode(k)  # the decode step's bytes (native/kv.h)
        self.pool.v[layer, blocks, :, offs] = self.type.encode(v)

    def table_array(self, slots) -> np.ndarray:  # [B] -> int32 [B, max blocks], padded with 0
        tabs = [self.tables[s] for s in slots]
        out = np.zeros((len(tabs), max(1, max(len(t) for t in tabs))), np.int32)
        for i, t in enumerate(tabs):
            out[i, :len(t)] = [-1 if b is None else b for b in t]  # -1: released (out of the window)
        return out

    # -- prefix reuse ---------------------------------------------------------------------------

    def reuse_prefix(self, slot: int, tokens, root=0) -> int:
        """Start an empty slot with the indexed blocks that hold a prefix of `tokens` (whole blocks,
        leaving at least the last token to compute). Returns the positions reused. `root`: the
        chain's first parent, 0 for the base model; keys and values computed under a LoRA adapter
        differ from the base's, so each adapter's chains start from a root of their own
        (`adapter_root`)."""
        if self.pos[slot] or self.tables[slot]:
            raise ValueError("reuse_prefix needs an empty slot")
        bt, parent, n = self.block_tokens, root, 0
        for i in range((len(tokens) - 1) // bt):
            hit = self._index.get((parent, tuple(tokens[i * bt:(i + 1) * bt])))
            if hit is None:
                break
            key = (parent, tuple(tokens[i * bt:(i + 1) * bt]))
            self._index.move_to_end(key)
            parent, b = hit
            self.pool.ref(b)
            self.tables[slot].append(b)
            n += bt
        self.pos[slot] = n
        return n

    def publish(self, slot: int, tokens, root=0):
        """Index slot's full blocks by the tokens that filled them (`tokens`: the slot's positions
        in order, at most pos[slot]; `root` as reuse_prefix's); the index holds a reference to each,
        dropped when the pool runs out (least recently used first)."""
        bt, parent = self.block_tokens, root
        n = min(len(tokens), int(self.pos[slot])) // bt
        for i in range(n):
            if self.tables[slot][i] is None:  # out of a sliding window: the chain stops here
                break
            key = (parent, tuple(tokens[i * bt:(i + 1) * bt]))
            hit = self._index.get(key)
            if hit is None:
                self._serial += 1
                b = self.tables[slot][i]
                self.pool.ref(b)
                hit = self._index[key] = (self._serial, b)
            else:
                self._index.move_to_end(key)
            parent = hit[0]

    @staticmethod
    def adapter_root(adapter: int):
        """The prefix index's root for rows computed with LoRA adapter `adapter` (-1: none)."""
        return 0 if adapter < 0 else ("lora", adapter)

    def _evict(self) -> bool:
        """Drop the least recently used index entry that alone holds its block; False if none."""
        for key, (_, b) in self._index.items():
            if self.pool.refs[b] == 1:
                del self._index[key]
                self.pool.release(b)
                return True
        return False

    def clear_index(self):
        for _, b in self._index.values():
            self.pool.release(b)
        self._index.clear()

    def check(self):
        """Pool accounting (tests call it after every step): each block's count is the tables and
        index entries holding it, and the free list is exactly the blocks nobody holds."""
        held = np.zeros(self.pool.n_blocks, np.int64)
        for t in self.tables:
            for b in t:
                if b is not None:
                    held[b] += 1
        for _, b in self._index.values():
            held[b] += 1
        assert np.array_equal(held, self.pool.refs), "KV block reference counts disagree with their holders"
        assert sorted(self.pool._free) == [int(b) for b in np.flatnonzero(held == 0)], "KV free list is wrong"
        for s, t in enumerate(self.tables):
            assert len(t) * self.block_tokens >= self.pos[s], f"slot {s} holds positions beyond its blocks"
