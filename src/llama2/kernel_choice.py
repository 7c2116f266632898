"""Which instruction-set level runs each weight type, per CPU model: the widest level the CPU has is
not always the fastest (issue 20: on Zen 4, AVX-512 runs as two 256-bit halves, and our AVX2 Q8_0
decode beat our AVX-512 one by 30%).

One record per CPU family (or list of models): the weight types whose kernels run at another level
than the widest, each measured on such a CPU with scripts/bench_native.py (docs/engine.md says how).
A type's decode and prompt kernels move together, except a quantized type's decode alone, whose
kernels give the same bits at every SIMD level (kernels.h: a row's bits do not depend on its
pass). The choice is made from this table at import, never by timing, so a run's bits do not vary
from run to run; LLAMA2_ISA (or --isa) forces one level for every type. llama2.native applies it.
"""

from typing import NamedTuple


class Choice(NamedTuple):
    vendor: str  # CPUID's vendor string
    family: int  # display family (CPUID leaf 1)
    models: tuple  # display models it covers; () for the whole family
    levels: dict  # GGUF type name -> level (llama2.native.LEVELS) of its decode and prompts
    decode: dict  # the same for decode rows alone: quantized types only (their SIMD kernels agree bit
    #               for bit at every level, so their decode and prompts may run on different ones)
    measured: str  # where the numbers come from


CHOICES = (
    # Family 19h: Zen 3 (no AVX-512: its widest level is AVX2 anyway) and Zen 4, which splits each
    # 512-bit operation into two 256-bit halves.
    Choice("AuthenticAMD", 0x19, (), {"F16": "avx2"}, {"Q8_0": "avx2"},
           "AMD EPYC Zen 4 (family 0x19 model 0x11), 2 threads. Issue 20, idle machine, the kernels before "
           "the four-row decode (2026-12-07): TinyLlama decode at avx2 vs avx512, Q8_0 36.8 vs 28.3 tok/s, F16 "
           "13.9 vs 12.3. scripts/bench_native.py on a shared machine at a load of about 10 (noisy), "
           "2026-12-07, avx2 / avx512vnni: prompts (N=64) F16 0.93-1.02x, Q8_0 0.67-0.71x (so Q8_0's prompts "
           "stay at the widest level); decode could not be measured at the memory limit under that load (1 "
           "thread, current kernels: 1.00x and 0.99x). BF16, Q4_K: mixed results, left at the widest"),
)


def levels_for(vendor: str, family: int, model: int) -> tuple:
    """({GGUF type name: level}, {GGUF type name: decode level}): the types this table moves off
    the widest level on that CPU."""
    for c in CHOICES:
        if c.vendor == vendor and c.family == family and (not c.models or model in c.models):
            return dict(c.levels), dict(c.decode)
    return {}, {}
