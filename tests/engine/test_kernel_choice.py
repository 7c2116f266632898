"""The level per weight type and CPU (llama2.kernel_choice's table, applied by llama2.native at
import): a CPU id gives the table's levels, the active kernels run each type on its variant, and
LLAMA2_ISA still forces one level for everything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mixed_kernels
from test_native import ALL, FLOATS, activations, random_weights

from llama2 import kernel_choice, native

pytestmark = pytest.mark.usefixtures("restore_level")  # conftest.py

WIDEST = native.variants()[0]
INTEL = native.Cpu("GenuineIntel", 6, 0x8F)  # Sapphire Rapids: no record, the widest everywhere


def expected(record) -> native.Kernels:
    """The variants each type should run on under a table record, on this CPU's features."""
    have, levels = native.variants(), native.supported()

    def variant(level, otherwise):
        return next(v for v in native._LEVEL_VARIANTS[level] if v in have) if level in levels else otherwise

    types = {name: variant(record.levels.get(name) if record else None, WIDEST) for name, _, _ in native.TYPES.values()}
    return native.Kernels(WIDEST, types, {name: variant(record.decode.get(name) if record else None, v)
                                          for name, v in types.items()})


def test_cpu_id_is_what_the_kernel_reports():
    info = Path("/proc/cpuinfo")
    fields = {}
    if info.exists():  # Linux: the kernel's reading of the same CPUID leaves
        for line in info.read_text().splitlines():
            k, _, v = line.partition(":")
            fields.setdefault(k.strip(), v.strip())
    if "vendor_id" not in fields:
        pytest.skip("no /proc/cpuinfo vendor_id to compare with (not Linux on x86)")
    assert native.cpu() == (fields["vendor_id"], int(fields["cpu family"]), int(fields["model"]))


@pytest.mark.parametrize("record", kernel_choice.CHOICES, ids=lambda c: f"{c.vendor}-{c.family:#x}")
def test_each_record_of_the_table_is_applied(record):
    cpu = native.Cpu(record.vendor, record.family, record.models[0] if record.models else 0)
    assert kernel_choice.levels_for(*cpu) == (record.levels, record.decode)
    names = {t[0] for t in native.TYPES.values()}
    assert set(record.levels) | set(record.decode) <= names, "the table names an unknown type"
    assert set(record.levels.values()) | set(record.decode.values()) <= set(native.LEVELS), "an unknown level"
    assert all(native.WEIGHT_TYPES[t.lower()].activations for t in record.decode), "a float type's decode alone"
    assert native.select_for_cpu(cpu) == expected(record)
    assert native.kernels() == expected(record)
    assert native.level() == native.supported()[-1]  # the base: the widest level


def test_a_cpu_without_a_record_runs_every_type_at_the_widest_level():
    assert kernel_choice.levels_for(*INTEL) == ({}, {})
    native.select_for_cpu(INTEL)
    assert native.kernels() == expected(None)
    assert native.describe() == WIDEST


def test_import_applies_the_table_and_llama2_isa_overrides_it():
    code = "import json; from llama2 import native; print(json.dumps(native.kernels()))"
    env = {k: v for k, v in os.environ.items() if k != native.ENV}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert native.Kernels(*json.loads(r.stdout)) == native.choose(native.cpu())
    for level in native.supported():
        r = subprocess.run([sys.executable, "-c", code], env=dict(env, **{native.ENV: level}), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        base, types, decode = json.loads(r.stdout)
        assert base in native._LEVEL_VARIANTS[level] and set(types.values()) | set(decode.values()) == {base}


def test_describe_names_the_types_off_the_base():
    k = native.select_kernels(mixed_kernels())
    words = native.describe()
    assert words.split("; ")[0] == k.base
    parts = words.split("; ")

    def said(what, name):
        return any(part.startswith(what + " for ") and name in part.split(" for ")[1].split(", ") for part in parts)

    for name in k.types:
        p, d = k.types[name], k.decode[name]
        assert said(p, name) == (p == d != k.base)
        assert said(f"{p} prompts", name) == (p != d and p != k.base)
        assert said(f"{d} decode", name) == (p != d and d != k.base)


def test_unknown_variant_or_a_decode_level_with_other_bits_is_refused():
    with pytest.raises(ValueError, match="variant 'avx9'"):
        native.select_kernels((WIDEST, {"F16": "avx9"}, {}))
    have = native.variants()
    if len(have) > 1:  # another variant's float kernels sum in another order; scalar's integer ones too
        for t in ("F16", "Q8_0"):
            with pytest.raises(ValueError, match=f"^{t}: decode on {have[-1]} and prompts on {WIDEST}"):
                native.select_kernels((WIDEST, {}, {t: have[-1]}))


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_a_mixed_table_runs_each_type_on_its_variants_kernels(t):
    """Decode (1, 2 rows), the dot kernels' tiles (5), prompts (16, 33) and dequantization of each
    type under a mixed choice give the bits of its own variants alone: its prompts' kernels,
    tiles and float gemm come from one, its decode rows' from the other (the same bits: a split is
    allowed only there)."""
    rng = np.random.default_rng(int(t))
    rows, cols = 37, (200 if t in FLOATS else 512)
    w = random_weights(rng, t, rows, cols)
    mixed = mixed_kernels()
    name = native.TYPES[int(t)][0]

    def run(ns):
        outs = []
        for n in ns:
            out = np.empty((n, rows), np.float32)
            native.matmul(int(t), w, activations(rng, n, cols), out)
            outs.append(out)
        deq = np.empty((rows, cols), np.float32)
        native.dequantize_rows(int(t), w, np.arange(rows, dtype=np.int64), deq)
        return outs + [deq]

    for own, ns in ((mixed.decode[name], (1, 2)), (mixed.types[name], (5, 16, 33))):
        state = rng.bit_generator.state
        native.select_variant(own)
        want = run(ns)
        rng.bit_generator.state = state
        native.select_kernels(mixed)
        got = run(ns)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
