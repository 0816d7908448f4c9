"""Check, on the PTX for the H200 (sm_90) and without a GPU, that kernels/qkv_rope.py's fused kernel computes its sums
and its rotation with the instructions of the two kernels whose bits it must give: each K-loop step
(gemv._tile_products) as `_qkv_gemv_kernel`'s, the rotation (rope._rotate_pair) as `_rope_write_kv_kernel`'s.

Why: the interpreter runs no compiler, and the compiler decides what the source leaves open: with fp fusion on (Triton's
default), which product of `b * cos + a * sin` LLVM contracts into an fma was its choice per kernel, and on the H200
the two paths were 1 float32 ulp apart (docs/design.md, session 14). The kernels now share those helpers and write
their fmas explicitly; this checks that what ptxas is given is indeed the same.

How: bench/sm90_audit.py's stub driver compiles the real launchers' kernels for sm_90 on CPU tensors (triton 3.6,
the GPU machine's), at tests/kernels/test_qkv_rope.py's float32 shapes and GEMV configs and at a Hymba-like
bf16/float32 shape. In each kernel's PTX every float32 instruction (mul, fma, add, sub, neg, shfl) inside a helper is
taken as: its op, its source position inside the helper (from the .loc comments, inlining included) and, per operand,
the helper position of the instruction that produced it ("in" for a value from outside: a load, an accumulator, the
sums), commutative operands sorted. The kernels agree when they have the same such instructions, and the fused
kernel's K loop twice as many as the GEMV's (two tiles: a and b of each rotation pair). The instruction counts of
the rotation differ with the tile shapes; the kinds may not.

    PYTHONPATH=$PWD /work/t36torch/bin/python bench/qkv_rope_ptx.py [--pdl]

Exit status 1 when a kernel differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
from collections import Counter
from pathlib import Path

# (B, T, HQ, HK, D, R, K, bias, L, slots), dtypes, GEMV configs (None: the shape's own, what the tests run untuned):
# test_qkv_rope.py's float32 cases with its configs, and Hymba-like layers' shapes with real tiles
SMALL = {"default": None, "8x16": {"BLOCK_N": 8, "BLOCK_K": 16, "num_warps": 1},
         "1x32": {"BLOCK_N": 1, "BLOCK_K": 32, "num_warps": 1}}
LARGE = {"default": None, "4x1024": {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4}}
CASES = {
    "D64-R64-bias": ((1, 1, 4, 2, 64, 64, 40, True, 8, [5]), ("float32",), SMALL),
    "D16-R10-ring": ((2, 2, 2, 1, 16, 10, 24, False, 4, [3, 0]), ("float32",), SMALL),
    "D128-R128-K2048": ((1, 1, 8, 2, 128, 128, 2048, True, 16, [3]), ("float32", "bfloat16"), LARGE),
    "D64-R46-K2048": ((1, 1, 4, 1, 64, 46, 2048, False, 16, [3]), ("float32", "bfloat16"), LARGE),
}
OP = re.compile(r"^\s*(?:@%p\d+\s+)?([a-z][\w.]*)\s+(.*);")
ARITHMETIC = re.compile(r"^(?:fma|mul|add|sub|neg)\.[a-z.]*f32$|^shfl\.sync\.bfly\.b32$")


def helper_lines(module, name: str) -> tuple[str, range]:
    """(file name, the line numbers of the @triton.jit function `name`): the .loc positions inside it."""
    import inspect

    fn = getattr(module, name).fn
    lines, first = inspect.getsourcelines(fn)
    return Path(inspect.getsourcefile(fn)).name, range(first, first + len(lines))


def instructions(ptx: str) -> list[tuple[str, list[str], list[tuple[str, list[str]]]]]:
    """(op, .loc chain innermost first, [(producer op, its .loc chain)] per operand) of each float32 instruction."""
    chain, found, producers = [], [], {}
    for line in ptx.splitlines():
        loc = re.match(r"\s*\.loc\s+\d+\s+\d+\s+\d+\s*//\s*(.*)", line)
        if loc:
            chain = re.findall(r"([\w.]+\.py:\d+:\d+)", loc.group(1))
            continue
        m = OP.match(line)
        if not m:
            continue
        op, args = m.groups()
        registers = re.findall(r"%r\d+|0f[0-9A-F]{8}", args)
        if op.startswith(("ld.", "mov")):
            for r in registers[:None if op.startswith("ld.") else 1]:
                producers[r] = (op.split(".")[0], chain)
            continue
        if ARITHMETIC.match(op) and registers:
            found.append((op, chain, [producers.get(r, (r, [])) for r in registers[1:]]))
            producers[registers[0]] = (op.split(".")[0], chain)
    return found


def kinds(ptx: str, where: tuple[str, range]) -> Counter:
    """The instructions inside a helper (file, lines), as (op, position in the helper, operand kinds), counted."""
    file, lines = where

    def inside(chain):  # the index of the helper's position in a .loc chain (innermost first), or None
        at = [i for i, loc in enumerate(chain) if loc.split(":")[0] == file and int(loc.split(":")[1]) in lines]
        return at[-1] if at else None

    counted = Counter()
    for op, chain, operands in instructions(ptx):
        i = inside(chain)
        if i is None:
            continue
        names = []
        for name, produced_at in operands:
            j = inside(produced_at)
            names.append(name if name.startswith("0f") else "in" if j is None else
                         f"{name}@{'<'.join(produced_at[:j + 1])}")
        if op.startswith(("mul", "add")):
            names.sort()
        elif op.startswith("fma"):
            names = sorted(names[:2]) + names[2:]
        counted[(op, "<".join(chain[:i + 1]), tuple(names))] += 1
    return counted


def compiled(fn, hashes: set[str]):
    """The compiled kernels of a @triton.jit function with these hashes."""
    for kernel_cache, *_ in fn.device_caches.values():
        for kernel in kernel_cache.values():
            if kernel.hash in hashes:
                yield kernel


def load_audit():
    """bench/sm90_audit.py as a module (its stub driver and kernel loading), registered as its test registers it."""
    name = "bench_sm90_audit"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("sm90_audit.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look their module up
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdl", action="store_true", help="compile with the programmatic launch's gdc calls in")
    args = parser.parse_args()
    import torch

    audit = load_audit()
    audit.install_driver()
    modules = audit.load_kernels(args.pdl)
    gemv, rope, qkv_rope = modules["gemv"], modules["rope"], modules["qkv_rope"]
    tile, rotation = helper_lines(gemv, "_tile_products"), helper_lines(rope, "_rotate_pair")
    functions = {"fused": qkv_rope._qkv_rope_kernel, "gemv": gemv._qkv_gemv_kernel, "rope": rope._rope_write_kv_kernel}
    failures = 0
    for case, ((B, T, HQ, HK, D, R, K, bias, L, slots), dtypes, configs) in CASES.items():
        for dtype in (getattr(torch, name) for name in dtypes):
            for name, config in configs.items():
                if config is None:
                    config = gemv.shape_config((HQ + 2 * HK) * D, K, B * T, audit.H200["multiprocessor_count"])

                def randn(*shape, scale=1.0, dtype=dtype):
                    return (torch.randn(*shape) * scale).to(dtype)

                x = randn(B, T, K)
                weights = [randn(rows, K, scale=1 / math.sqrt(K)) for rows in (HQ * D, HK * D, HK * D)]
                biases = [randn(w.shape[0]) if bias else None for w in weights]
                angles = torch.rand(T, R // 2)
                caches = [torch.zeros(B, HK, L, D, dtype=dtype) for _ in "kv"]
                at = torch.tensor(slots)
                audit.RECORDER.rows.clear()
                qkv_rope.qkv_rope_write_kv_forward(x, *weights, *biases, angles.cos(), angles.sin(), *caches, at,
                                                   config=config)
                qkv = gemv.qkv_gemv_forward(x, *weights, *biases, config=config)
                q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in qkv.split([HQ * D, HK * D, HK * D], -1))
                rope.rope_write_kv(q, k, v, angles.cos(), angles.sin(), *caches, at)
                hashes = {row.hash for row in audit.RECORDER.rows}
                ptx = {label: next(compiled(fn, hashes)).asm["ptx"] for label, fn in functions.items()}
                fused_tile, gemv_tile = kinds(ptx["fused"], tile), kinds(ptx["gemv"], tile)
                fused_rotation, rope_rotation = kinds(ptx["fused"], rotation), kinds(ptx["rope"], rotation)
                same_loop = set(fused_tile) == set(gemv_tile) and sum(fused_tile.values()) == 2 * sum(gemv_tile.values())
                same_rotation = bool(fused_rotation) and set(fused_rotation) == set(rope_rotation)
                failures += not (same_loop and same_rotation)
                label = f"{str(dtype).removeprefix('torch.'):8s} {case:16s} {name:8s}"
                print(f"{label} K loop: {sum(gemv_tile.values()):3d} instructions a tile, "
                      f"{'the same' if same_loop else 'DIFFERENT'}; rotation: {sum(fused_rotation.values()):3d} "
                      f"instructions, {'the same kinds' if same_rotation else 'DIFFERENT'}")
                if not (same_loop and same_rotation):
                    for what, ours, theirs in (("K loop", fused_tile, gemv_tile), ("rotation", fused_rotation,
                                                                                    rope_rotation)):
                        print(f"    {what}: fused only {sorted(set(ours) - set(theirs))}; "
                              f"the other only {sorted(set(theirs) - set(ours))}")
    print("every kernel pair the same" if not failures else f"{failures} cases differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
