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
    Choice("AuthenticAMD", 0x19, (), {}, {},
           "AMD EPYC Zen 4 (family 0x19 model 0x11), 2 threads, idle, 2026-12-07 (10:40 UTC), kernels of "
           "this commit, scripts/bench_native.py --rows 32768 --reps 3 (weights far larger than the caches), "
           "avx512vnni vs avx2: decode F16 44.1 vs 40.2 GB/s, Q8_0 50.1 vs 49.9, Q4_0 26.6 vs 24.5, Q4_K 33.1 vs "
           "31.2, Q6_K 48.9 vs 44.2; prompts (N=128, W [11008, 4096]) F16 161 vs 161 GFLOP/s, Q8_0 219 vs 156, "
           "Q4_K 538 vs 332. No type is faster at avx2 here: the widest level everywhere. (Issue 20's "
           "figures, avx2 ahead for Q8_0 and F16 decode, came from the kernels of an earlier day.) Rerun "
           "2026-12-07 14:06 UTC with the evening's kernels, same command and types: decode F16 35.5 vs 44.9 "
           "GB/s (the reverse of the morning's 44.1 vs 40.2, within this host's run-to-run spread of 30%), "
           "BF16 38.4 vs 47.5, Q8_0 50.0 vs 45.2, Q4_0 29.7 vs 29.8, Q4_K 36.9 vs 35.1, Q6_K 39.6 vs 39.0; "
           "prompts F16 206 vs 181, BF16 206 vs 165, Q8_0 475 vs 186, Q4_0 475 vs 179, Q4_K 560 vs 341, "
           "Q6_K 508 vs 252 GFLOP/s. The prompts decide for avx512vnni; the float decode gap flips between "
           "runs, so the table is unchanged."),
)


def levels_for(vendor: str, family: int, model: int) -> tuple:
    """({GGUF type name: level}, {GGUF type name: decode level}): the types this table moves off
    the widest level on that CPU."""
    for c in CHOICES:
        if c.vendor == vendor and c.family == family and (not c.models or model in c.models):
            return dict(c.levels), dict(c.decode)
    return {}, {}
