"""Will a model fit? What loading and running it takes, against what the machine has.

`estimate` is a pure function of the model's shape, how each tensor is stored and how the engine
holds it; `available` reads MemAvailable (/proc/meminfo) and the address-space limit (RLIMIT_AS,
less what the process already maps); `guard` refuses a model that cannot fit with one line naming
both figures and what would fit, and turns a MemoryError during loading into the same kind of line.

How the engine holds weights (bytes per value; keep in step with the loaders):

| stored as | resident | address space | notes |
|---|---|---|---|
| fp32 (llama2.c, GGUF F32) | 4 | 4 | used in place from the file's map |
| fp16 / bf16 (llama2.c v3, GGUF) | 4 | 6 | widened to float32; the file stays mapped |
| q8_0 (group g) | 1 + 4/g | same | used in place |
| Hugging Face folder | 4 | 4 | read into float32 arrays |

`--quantize q8_0` adds an int8 copy (1 + 4/32) of each float matrix; the float weights stay
referenced (resident for copies, address space only for an fp32 file's map).
"""

import contextlib
import os
import resource
from dataclasses import dataclass

from .errors import Llama2Error

Q8_BYTES = 1 + 4 / 32  # an int8 value plus its share of a float32 scale per group of 32
MARGIN = 1.05  # interpreter, kernels and allocator slack on top of the estimate
MARGIN_BYTES = 64 << 20


@dataclass(frozen=True)
class Need:
    """Bytes a model needs: `resident` must fit in memory, `address` in the address space."""
    weights: int  # resident weights
    address_weights: int  # weights' address space (maps of files whose contents were copied too)
    cache: int  # KV cache: keys and values of every slot, float32
    scratch: int  # activations of a full-context prompt, logits, RoPE tables

    @property
    def resident(self) -> int:
        return int((self.weights + self.cache + self.scratch) * MARGIN) + MARGIN_BYTES

    @property
    def address(self) -> int:
        return int((self.address_weights + self.cache + self.scratch) * MARGIN) + MARGIN_BYTES


def _per_value(stored: str, quantize: bool) -> tuple:
    """(resident, address) bytes per weight value of a matrix stored as `stored`."""
    if stored.startswith("q8_0"):
        group = int(stored.partition(":")[2] or 32)
        size = 1 + 4 / group
        return size, size
    resident, address = {"fp32": (4, 4), "fp16": (4, 6), "bf16": (4, 6), "hf": (4, 4)}[stored]
    if quantize:
        resident = Q8_BYTES + (0 if stored == "fp32" else resident)  # fp32's map is not touched again
        address += Q8_BYTES
    return resident, address


def estimate(config, stored: dict, quantize: bool = False, slots: int = 1) -> Need:
    """What `config` (a ModelConfig) needs when its tensors are stored as `stored` (tensor name ->
    "fp32", "fp16", "bf16", "hf" or "q8_0:GROUP"; norms are float32), run with `quantize` and
    `slots` KV-cache slots (the server's --max-batch)."""
    from .checkpoint import tensor_shapes

    c = config
    weights = address = 0.0
    for name, shape in tensor_shapes(c).items():
        n = 1
        for d in shape:
            n *= d
        if name.startswith("rms"):
            weights, address = weights + 4 * n, address + 4 * n
            continue
        r, a = _per_value(stored.get(name, "fp32"), quantize)
        weights, address = weights + r * n, address + a * n
    cache = 2 * 4 * c.n_layers * slots * c.seq_len * c.kv_dim
    scratch = 4 * (c.seq_len * (6 * c.dim + 3 * c.hidden_dim + c.n_heads * 64)  # a prompt's activations
                   + c.vocab_size * (slots + 1)  # logits
                   + max(c.hidden_dim, c.vocab_size) * c.dim  # a dequantized tile or a product
                   + c.seq_len * c.head_dim)  # RoPE tables
    return Need(int(weights), int(address), int(cache), int(scratch))


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


def verdict(name: str, config, stored: dict, quantize: bool, slots: int, have: Available,
            slots_flag: str = None, force: bool = False) -> str:
    """None when the model fits (unless `force`); else one line: what it needs, what there is, and
    what would fit."""
    need = estimate(config, stored, quantize, slots)
    if fits(need, have) and not force:
        return None
    by_address = have.address is not None and need.address > have.address

    def size(n: Need) -> str:
        return gb(n.address if by_address else n.resident)

    line = (f"{name}: needs about {size(need)} (weights {gb(need.weights)}, KV cache {gb(need.cache)} "
            f"for {slots} sequence{'s' if slots > 1 else ''} of {config.seq_len} tokens) but {_room(have)}")
    options = []
    floats = any(not s.startswith("q8_0") for s in stored.values())
    if floats and not quantize:
        q = estimate(config, stored, True, slots)
        if fits(q, have):
            options.append(f"--quantize q8_0 (about {size(q)})")
    if slots_flag and slots > 1:
        fewer = max((n for n in range(1, slots) if fits(estimate(config, stored, quantize, n), have)),
                    default=None)
        if fewer:
            options.append(f"{slots_flag} {fewer}")
    export = f"an int8 file made by `llama2 export OUT.bin --from {name} --dtype q8_0`"
    if floats:
        q8 = estimate(config, {k: "q8_0:32" for k in stored}, False, slots)
        if fits(q8, have):
            options.append(f"{export} (about {size(q8)})")
        elif not options:
            return line + f"; even {export} would need about {size(q8)}"
    return line + ("; would fit: " + ", or ".join(options) if options else "; nothing smaller is known to fit")


def describe(path):
    """(ModelConfig, {tensor name: how it is stored}) from a model's header alone, or None when the
    file cannot be read that way (the loader then reports what is wrong with it)."""
    from . import checkpoint
    from .loader import model_kind

    try:
        kind = model_kind(path)
        if kind == "hf":
            from .hf import read_config
            config = read_config(path)
            return config, {name: "hf" for name in checkpoint.tensor_shapes(config)}
        if kind == "gguf":
            from .gguf import BF16, F16, F32, Q8_0, GGUFModel
            m = GGUFModel(path)
            types = {F32: "fp32", F16: "fp16", BF16: "bf16", Q8_0: "q8_0:32"}
            stored = {}
            for name in checkpoint.tensor_shapes(m.config):
                if not name.startswith("rms"):
                    layer = 0 if name in checkpoint.LAYER_MATRICES else None
                    stored[name] = types.get(m.kind(name, layer), "fp32")
            return m.config, stored
        with open(path, "rb") as f:
            head = f.read(checkpoint.HEADER_BYTES)
        config, version, group_size, _ = checkpoint.read_header(path, head)
        dtype = checkpoint.file_dtype(head, version)
        how = f"q8_0:{group_size}" if dtype == "q8_0" else dtype
        return config, {name: how for name in checkpoint.tensor_shapes(config)}
    except Exception:  # noqa: BLE001 -- advisory only: the loader gives the file's real error
        return None


@contextlib.contextmanager
def guard(path, quantize: str = None, slots: int = 1, slots_flag: str = None, have: Available = None):
    """Around loading the model at `path`: refuse up front when the estimate does not fit, and turn
    a MemoryError while loading into one line (Llama2Error)."""
    described = describe(path)
    have = have or available()
    if described is not None:
        line = verdict(os.fspath(path), *described, bool(quantize), slots, have, slots_flag)
        if line is not None:
            raise Llama2Error(line)
    try:
        yield
    except MemoryError:
        where = f"{os.fspath(path)}: ran out of memory while loading"
        if described is None:
            raise Llama2Error(f"{where} ({_room(have)})") from None
        line = verdict(where, *described, bool(quantize), slots, have, slots_flag, force=True)
        raise Llama2Error(line.replace(f"{where}: needs", f"{where}; it needs", 1)) from None
