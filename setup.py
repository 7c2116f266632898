"""Builds llama2._native from native/ (see native/README.md). The compiler flags live here only.

The per-variant sources are compiled once per instruction-set variant with that variant's flags
and -DLLAMA2_VARIANT=<name> (so each copy's functions get their own names); the common sources
once with the baseline flags. dispatch.c picks a variant at import from the CPU's features.
"""

import os
import platform
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "native"
COMMON = ["module.c", "dispatch.c", "ops.c", "pool.c", "gemm.c", "layer.c", "layer_py.c", "attention_pool.c"]
# every type_*.c is a weight type's kernels (blocks.h's WEIGHT_TYPES lists the types)
PER_VARIANT = ["table.c", "act.c", "ops_elementwise.c", "attention.c", "gemm_float.c"] + sorted(
    f for f in os.listdir(NATIVE) if f.startswith("type_") and f.endswith(".c"))

# Every file: optimized, and no silent fusing of a*b+c into fma (dequantization must round each
# product like the gguf reference; the kernels use fma explicitly where they want it).
BASE_FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
X86_VARIANTS = {  # name -> flags; dispatch.c lists the same names, best first
    "scalar": [],
    "avx2": AVX2,
    "avx512": AVX512,
    "avx512vnni": AVX512 + ["-mavx512vnni"],
}
IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386", "x86")
VARIANTS = X86_VARIANTS if IS_X86 else {"scalar": []}


class BuildNative(build_ext):
    """Compiles the per-variant objects with their own flags and links them into the extension."""

    def build_extension(self, ext):
        if ext.name != "llama2._native":
            return super().build_extension(ext)

        def compile_variant(item):
            variant, flags = item
            return self.compiler.compile(
                [os.path.join(NATIVE, f) for f in PER_VARIANT],
                output_dir=os.path.join(self.build_temp, variant),
                macros=[("LLAMA2_VARIANT", variant)] + ext.define_macros,
                include_dirs=[NATIVE],
                extra_postargs=BASE_FLAGS + flags,
                depends=ext.depends,
            )

        # The variants compile side by side (one compiler process each).
        with ThreadPoolExecutor(max_workers=min(len(VARIANTS), os.cpu_count() or 1)) as pool:
            ext.extra_objects = [o for objs in pool.map(compile_variant, VARIANTS.items()) for o in objs]
        # build_ext relinks only when a common source is newer than the extension: a changed
        # per-variant source (a newer object) must relink too.
        target = self.get_ext_fullpath(ext.name)
        if os.path.exists(target) and any(os.path.getmtime(o) > os.path.getmtime(target) for o in ext.extra_objects):
            os.remove(target)
        super().build_extension(ext)


setup(
    ext_modules=[Extension(
        "llama2._native",
        sources=[os.path.join(NATIVE, f) for f in COMMON],
        include_dirs=[NATIVE],
        define_macros=[("LLAMA2_X86_LEVELS", "1")] if IS_X86 else [],
        extra_compile_args=BASE_FLAGS,
        extra_link_args=["-pthread"],
        # every header and per-variant source: a change to any of them relinks the extension
        depends=[os.path.join(NATIVE, f) for f in sorted(os.listdir(NATIVE)) if f.endswith(".h")]
        + [os.path.join(NATIVE, f) for f in PER_VARIANT],
    )],
    cmdclass={"build_ext": BuildNative},
)
