"""bench/qkv_rope_ptx.py's reading of PTX: the instructions inside a helper, by the position its .loc comments give
(inlined, under any call site), with their operands' producers, so that two kernels computing the helper alike compare
equal whatever their registers, and a product fused differently does not (session 14's float32 failure)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_qkv_rope_ptx", ROOT / "bench" / "qkv_rope_ptx.py")
ptx_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ptx_check)

HELPER = ("rope.py", range(78, 87))


def _ptx(site: str, first: int, fused: tuple[int, int]) -> str:
    """b·cos + a·sin after loads of a, b, cos, sin (registers from `first`): the product at column fused[0] rounded by
    a mul, the other fused into an fma at column fused[1]; the helper inlined at call site `site`."""
    a, b, cos, sin, product, out = (f"%r{first + i}" for i in range(6))
    return "\n".join([
        f"\t.loc\t1 120 5                         // {site}",
        f"\tld.global.b32 {{ {a} }}, [ %rd1 + 0 ];",
        f"\tld.global.b32 {{ {b} }}, [ %rd2 + 0 ];",
        f"\tld.global.b32 {{ {cos} }}, [ %rd3 + 0 ];",
        f"\tld.global.b32 {{ {sin} }}, [ %rd4 + 0 ];",
        f"\t.loc\t2 86 {fused[0]}                        // rope.py:86:{fused[0]} @[ {site} ]",
        f"\tmul.f32 \t{product}, {cos if fused[0] == 56 else a}, {b if fused[0] == 56 else sin};",
        f"\t.loc\t2 86 {fused[1]}                        // rope.py:86:{fused[1]} @[ {site} ]",
        f"\tfma.rn.f32 \t{out}, {a if fused[0] == 56 else cos}, {sin if fused[0] == 56 else b}, {product};",
    ])


def test_a_helper_computed_alike_compares_equal_across_kernels_registers_and_call_sites():
    ours = ptx_check.kinds(_ptx("qkv_rope.py:128:81", 10, (56, 52)), HELPER)
    theirs = ptx_check.kinds(_ptx("rope.py:101:35 @[ rope.py:193:79 ]", 40, (56, 52)), HELPER)
    assert ours == theirs and sum(ours.values()) == 2
    (mul, fma) = sorted(ours, key=lambda kind: kind[0], reverse=True)
    assert mul[0] == "mul.f32" and mul[2] == ("in", "in")  # loads are from outside the helper
    assert fma[0] == "fma.rn.f32" and fma[2] == ("in", "in", "mul@rope.py:86:56")


def test_the_other_product_fused_is_told_apart():
    ours = ptx_check.kinds(_ptx("qkv_rope.py:128:81", 10, (56, 52)), HELPER)
    theirs = ptx_check.kinds(_ptx("rope.py:101:35", 10, (50, 56)), HELPER)
    assert set(ours) != set(theirs)


def test_instructions_outside_the_helper_are_left_out():
    assert not ptx_check.kinds(_ptx("qkv_rope.py:128:81", 10, (56, 52)), ("rope.py", range(1, 50)))
