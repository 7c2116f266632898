"""Will a model fit? What loading and running it takes, against what the machine has.

`estimate` is a pure function of the model's shape, how each tensor is stored and what `--quantize`
makes of it; `available` reads MemAvailable (/proc/meminfo) and the address-space limit (RLIMIT_AS,
less what the process already maps); `guard` refuses a model that cannot fit with one line naming
both figures and what would fit, and turns a MemoryError during loading into the same kind of line.

Each figure comes from the record that holds the fact, so a new format, weight type or KV type is
budgeted by its own record:

- the format's reader (llama2.formats): `describe`, how each matrix is stored, from the headers
  alone (pytorch_model.bin folders, read through torch, say f32), and `KV_TYPE`, the cache its
  models get without --kv-type;
- the weight type (llama2.weights): `stored_bytes`, what a matrix costs used in place (resident
  and in address space: the loaders map their files; a matrix regrouped at load,
  `weights.interleaved.regroups`, as much address space again); `quantized_kind`, what `--quantize` makes of a
  float matrix (its Matrix's STORES_FLOATS): the quantized copy is resident, the float file stays
  mapped (address space only); while a matrix is quantized, its float32 widening and the
  quantizers' temporaries (`weights.ggml_quants.SCRATCH_BYTES`) exist once;
- the KV type (llama2.kvcache): `bytes_per_token` and `pool_bytes`, whole blocks of the positions
  the cache may hold (one context for `llama2 run`, the pool's token budget for `llama2 serve`;
  committed only as used, so these are the most it reaches).

Norms are float32 copies; a forward pass's activations (`scratch_bytes`) come on top.
"""

import contextlib
import os
import resource
from dataclasses import dataclass

from . import formats, kvcache, weights
from .checkpoint import LAYER_MATRICES, tensor_shapes
from .config import PASS_ROWS, Q8_GROUP_SIZE
from .errors import Llama2Error
from .weights import interleaved
from .weights.base import DEQUANT_TILE

MARGIN = 1.05  # interpreter, kernels and allocator slack on top of the estimate
MARGIN_BYTES = 64 << 20


@dataclass(frozen=True)
class Need:
    """Bytes a model needs: `resident` must fit in memory, `address` in the address space."""
    weights: int  # resident weights
    address_weights: int  # weights' address space (maps of files whose contents were quantized too)
    cache: int  # KV cache: the positions it may hold, in its type
    scratch: int  # activations of a full-context prompt, logits, RoPE tables, quantizing at load

    @property
    def resident(self) -> int:
        return int((self.weights + self.cache + self.scratch) * MARGIN) + MARGIN_BYTES

    @property
    def address(self) -> int:
        return int((self.address_weights + self.cache + self.scratch) * MARGIN) + MARGIN_BYTES


def kv_position_bytes(config, kv_type: str = "f32") -> int:
    """Bytes one position of the KV cache takes in `kv_type` (keys and values of every layer)."""
    return kvcache.bytes_per_token(config, kv_type)


def held_positions(config) -> int:
    """The most positions one sequence keeps in the cache: its context, or with a sliding window
    of W the window's blocks (the cache frees those before it): W positions plus a partial block
    at either end."""
    if not config.sliding_window:
        return config.seq_len
    return min(config.seq_len, config.sliding_window + 2 * kvcache.BLOCK_TOKENS)


def kv_cache_bytes(config, kv_type: str = "f32", positions: int = None) -> int:
    """The KV cache holding `positions` (default: one whole context) in `kv_type`, in whole blocks
    of kvcache.BLOCK_TOKENS: the most it commits (llama2.kvcache.Pool maps it lazily)."""
    return kvcache.pool_bytes(config, kv_type, config.seq_len if positions is None else positions)


def default_kv_type(path) -> str:
    """The KV type a model file gets without --kv-type: its format's KV_TYPE."""
    return formats.reader(formats.model_kind(path)).KV_TYPE


def scratch_bytes(config, slots: int = 1) -> int:
    """A pass's activations (PASS_ROWS rows at most), the logits, a dequantized tile
    (weights.base.DEQUANT_TILE floats at most) and the RoPE tables, float32."""
    c = config
    rows = min(c.seq_len, PASS_ROWS)
    return 4 * (rows * (6 * c.dim + 3 * c.hidden_dim + c.n_heads * 64)  # a pass's activations
                + c.vocab_size * (slots + 1)  # logits
                + min(DEQUANT_TILE, max(c.hidden_dim, c.vocab_size) * c.dim)  # a tile or a product
                + c.seq_len * c.head_dim)  # RoPE tables


def _stores_floats(kind) -> bool:  # what --quantize applies to
    return weights.stored_type(kind)[0].STORES_FLOATS


def quantize_scratch(config) -> int:
    """Quantizing at load: the largest matrix widened to float32, plus the quantizers' temporaries."""
    largest = max(s[-1] * s[-2] for n, s in tensor_shapes(config).items() if not n.startswith("rms"))
    return 4 * largest + weights.ggml_quants.SCRATCH_BYTES


def estimate(config, stored: dict, quantize=None, slots: int = 1, kv_type: str = "f32",
             kv_positions: int = None) -> Need:
    """What `config` (a ModelConfig) needs when its matrices are stored as `stored` (tensor name ->
    a kind as `weights.stored_type` takes it, or a list of kinds per layer; missing names: f32;
    norms are float32), run with `--quantize quantize` (a type or mix name; True means q8_0),
    `slots` sequences at once and a `kv_type` KV cache of `kv_positions` positions (default:
    `slots` whole contexts; the server's pool: its token budget)."""
    c = config
    to_type = "q8_0" if quantize is True else quantize
    held = address = 0
    for name, shape in tensor_shapes(c).items():
        if name.startswith("rms"):
            n = 1
            for d in shape:
                n *= d
            held, address = held + 4 * n, address + 4 * n
            continue
        rows, cols = shape[-2:]
        layers = list(range(c.n_layers)) if name in LAYER_MATRICES else [None]
        kinds = stored.get(name, "f32")
        for i, layer in enumerate(layers):
            kind = kinds[i] if isinstance(kinds, list) else kinds
            size = weights.stored_bytes(kind, rows, cols)
            address += size
            if to_type and _stores_floats(kind):  # a quantized copy resident; the file stays mapped
                kind = weights.quantized_kind(to_type, name, layer, cols, c)
                q = weights.stored_bytes(kind, rows, cols)
                held, address = held + q, address + q
            else:
                held += size
            if interleaved.regrouped_tensor(name, c.shared_classifier) and \
                    interleaved.regroups(weights.stored_type(kind)[0].NAME, rows):
                address += weights.stored_bytes(kind, rows, cols)  # its regrouped copy; the file stays mapped
    scratch = scratch_bytes(c, slots) + (quantize_scratch(c) if quantize else 0)
    positions = slots * held_positions(c) if kv_positions is None else kv_positions
    return Need(int(held), int(address), int(kv_cache_bytes(c, kv_type, positions)), int(scratch))


# -- what the machine has -------------------------------------------------------------------------

@dataclass(frozen=True)
class Available:
    memory: int = None  # MemAvailable, bytes (None: unknown)
    address: int = None  # RLIMIT_AS less what the process maps now (None: no limit)
    limit: int = None  # RLIMIT_AS itself


def _kib(path, key) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available() -> Available:
    memory = _kib("/proc/meminfo", "MemAvailable")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return Available(memory)
    mapped = _kib("/proc/self/status", "VmSize") or 0
    return Available(memory, max(limit - mapped, 0), limit)


# -- the verdict ----------------------------------------------------------------------------------

def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def fits(need: Need, have: Available) -> bool:
    return ((have.memory is None or need.resident <= have.memory)
            and (have.address is None or need.address <= have.address))


def _room(have: Available) -> str:
    parts = []
    if have.memory is not None:
        parts.append(f"{gb(have.memory)} of memory is available")
    if have.address is not None:
        parts.append(f"the address-space limit (ulimit -v, {gb(have.limit)}) leaves {gb(have.address)}")
    return " and ".join(parts) or "the machine's memory is unknown"


def verdict(name: str, config, stored: dict, quantize, slots: int, have: Available,
            slots_flag: str = None, force: bool = False, kv_type: str = "f32", kv_positions: int = None,
            budget_flag: str = None) -> str:
    """None when the model fits (unless `force`); else one line: what it needs, what there is, and
    what would fit (with `budget_flag`, the largest KV budget that does)."""
    kv = {"kv_type": kv_type, "kv_positions": kv_positions}
    need = estimate(config, stored, quantize, slots, **kv)
    if fits(need, have) and not force:
        return None
    by_address = have.address is not None and need.address > have.address

    def size(n: Need) -> str:
        return gb(n.address if by_address else n.resident)

    positions = slots * held_positions(config) if kv_positions is None else kv_positions
    line = (f"{name}: needs about {size(need)} (weights {gb(need.weights)}, {kv_type} KV cache "
            f"{gb(need.cache)} for {positions} positions) but {_room(have)}")
    options = []
    floats = any(_stores_floats(k) for v in stored.values() for k in (v if isinstance(v, list) else [v]))
    if floats and not quantize:
        for q in ("q8_0", "q4_k_m"):
            with contextlib.suppress(ValueError):
                smaller = estimate(config, stored, q, slots, **kv)
                if fits(smaller, have):
                    options.append(f"--quantize {q} (about {size(smaller)})")
                    break
    if slots_flag and slots > 1:
        fewer = max((n for n in range(1, slots) if fits(estimate(config, stored, quantize, n, **kv), have)),
                    default=None)
        if fewer:
            options.append(f"{slots_flag} {fewer}")
    if budget_flag and positions > 1:
        bt = kvcache.BLOCK_TOKENS

        def room(blocks):
            return fits(estimate(config, stored, quantize, slots, kv_type, blocks * bt), have)
        lo, hi = 0, -(-positions // bt) - 1  # the most whole blocks that fit, below the ask
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if room(mid) else (lo, mid - 1)
        if lo and room(lo):
            options.append(f"{budget_flag} {lo * bt}")
    export = f"an int8 file made by `llama2 export OUT.bin --from {name} --dtype q8_0`"
    if floats:
        q8 = estimate(config, {k: f"int8_groups:{Q8_GROUP_SIZE}" for k in stored}, None, slots, **kv)
        if fits(q8, have):
            options.append(f"{export} (about {size(q8)})")
        elif not options:
            return line + f"; even {export} would need about {size(q8)}"
    return line + ("; would fit: " + ", or ".join(options) if options else "; nothing smaller is known to fit")


def describe(path):
    """(ModelConfig, {tensor name: how it is stored, or a list per layer}) from a model's headers
    alone (its format module's `describe`), or None when the file cannot be read that way (the
    loader then reports what is wrong)."""
    try:
        return formats.describe(path)
    except Exception:  # noqa: BLE001 -- advisory only: the loader gives the file's real error
        return None


@contextlib.contextmanager
def guard(path, quantize: str = None, slots: int = 1, slots_flag: str = None, have: Available = None,
          kv_type: str = None, kv_positions: int = None, budget_flag: str = None):
    """Around loading the model at `path` (a `kv_type` cache, default the format's, of
    `kv_positions` positions, default `slots` contexts): refuse up front when the estimate does not
    fit, and turn a MemoryError while loading into one line (Llama2Error)."""
    described = describe(path)
    have = have or available()
    if described is not None:  # else the loader reports what is wrong with the path
        kv_type = kv_type or default_kv_type(path)
    kv = {"kv_type": kv_type, "kv_positions": kv_positions, "budget_flag": budget_flag}
    if described is not None:
        line = verdict(os.fspath(path), *described, quantize, slots, have, slots_flag, **kv)
        if line is not None:
            raise Llama2Error(line)
    try:
        yield
    except MemoryError:
        # (a file read while loading, the tokenizer say, names itself: fileio.read_user_file)
        name = os.fspath(path)
        if described is None:
            raise Llama2Error(f"{name}: ran out of memory while loading ({_room(have)})") from None
        line = verdict(name, *described, quantize, slots, have, slots_flag, force=True, **kv)
        raise Llama2Error(line.replace(f"{name}: needs", f"{name}: ran out of memory while loading; it needs",
                                       1)) from None
