"""Fingerprints are taken and compared on AVX2 kernels, where the CPU has AVX2 (cachectl/numerics.py)."""
from cachectl import numerics

FLAGS = "flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c%s\n"


def test_kernels_are_pinned_to_avx2_only_where_the_cpu_has_it(tmp_path):
    with_avx2, without = tmp_path / "with", tmp_path / "without"
    with_avx2.write_text("processor\t: 0\n" + FLAGS % " avx2 avx512f")
    without.write_text("processor\t: 0\n" + FLAGS % "")
    assert numerics._pinned(str(with_avx2)) == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    # torch would run AVX2 code there without checking (an illegal instruction), or warn (ARM)
    assert numerics._pinned(str(without)) == {}
    assert numerics._pinned(str(tmp_path / "no-such-file")) == {}
