"""Build-time tuning (`archgen build SPEC --autotune`): time every Triton kernel the model uses at the model's own
shapes on this GPU, and ship the winners in the package as kernels/tuning.json.

What to tune comes from the IR: every op the kernel-selection pass gave a kernel, once per distinct (kernel file,
resolved config, parameter shapes). How to tune it is the kernel file's business: each declares a hook

    autotune(config: dict, params: {name: shape}, batch: int, seqlen: int, dtype, device) -> None

that runs the kernels such an op runs at that batch and sequence length (forward and backward). The hooks run inside
`triton_support.tuning_session()`, where every shape bucket a kernel meets is timed over its candidates and the
winner recorded, so this module knows no kernel by name. The table is keyed as the package reads it: GPU name,
torch and triton versions, tuner ("<op>.<kernel>") and the kernel's own shape bucket; the generated package loads
it at import (kernels/triton_support.py) and never tunes while running (kernels/__init__.py turns RUNTIME_TUNING off).

Where it can run: on a CUDA GPU; or in Triton's CPU interpreter when TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1
(the tests: every bucket "tunes" its one interpreter config, so the plumbing runs end to end). Anywhere else it is a
CompileError, raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from archgen.errors import CompileError, Diagnostic
from archgen.ir.graph import IR

TUNING_FILE = "kernels/tuning.json"
SHORTEST_BUCKET = 256
"""The shortest sequence length tuned from max_seq_len alone (shorter ones come from --tune-seq-len)."""
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class TuneCase:
    """One hook call: kernel file `file` for the op `op` (the first of the ops sharing this config), at batch × seqlen."""

    file: str
    op: str
    config: dict[str, Any]
    params: dict[str, tuple[int, ...]]
    batch: int
    seqlen: int

    @property
    def label(self) -> str:
        return f"{self.file} ({self.op}) batch {self.batch} × {self.seqlen}"


def seq_len_buckets(max_seq_len: int, extra: Iterable[int] = ()) -> list[int]:
    """Powers of two from SHORTEST_BUCKET up to max_seq_len, max_seq_len itself, and the `extra` lengths, sorted."""
    lengths = {max_seq_len, *extra}
    length = SHORTEST_BUCKET
    while length < max_seq_len:
        lengths.add(length)
        length *= 2
    return sorted(lengths)


def tuning_cases(ir: IR, seq_lens: Iterable[int], batches: Iterable[int]) -> list[TuneCase]:
    """Every (kernel file, distinct op config and parameter shapes) the IR runs, at every batch × length."""
    distinct: dict[tuple, TuneCase] = {}
    for op in ir.ops():
        if not op.kernels:
            continue
        config = dataclasses.asdict(op.config) if dataclasses.is_dataclass(op.config) else dict(op.config)
        params = {name: tuple(shape) for name, shape in sorted(op.params.items())}
        for file in sorted({kernel.file for kernel in op.kernels.values()}):  # an op may run several kernel files
            key = (file, repr(sorted(config.items())), repr(params))
            distinct.setdefault(key, TuneCase(file, op.name, config, params, 0, 0))
    return [dataclasses.replace(case, batch=batch, seqlen=seqlen)
            for case in distinct.values() for batch in sorted(set(batches)) for seqlen in sorted(set(seq_lens))]


def tuning_device() -> str:
    """"cuda", or "cpu" when the kernels run in Triton's interpreter on request; else a CompileError saying why not."""
    def refuse(message: str, fix: str) -> CompileError:
        return CompileError([Diagnostic("", f"--autotune: {message}", fix)])

    try:
        import torch

        from archgen.resources import kernels_package

        kernels_package()
        support = importlib.import_module("archgen_kernels.triton_support")
    except ImportError as error:
        raise refuse(f"the kernels need triton, which did not import ({error})",
                     "install triton (pip install triton) on the machine with the GPU, or build without --autotune") from None
    if torch.cuda.is_available():
        return "cuda"
    if support.triton_on_cpu():
        return "cpu"
    interpret = os.environ.get("TRITON_INTERPRET", "")
    raise refuse("no CUDA GPU here (torch.cuda.is_available() is False): tuned configs are only worth what the GPU "
                 "they were timed on" + (f"; TRITON_INTERPRET={interpret!r} alone does not tune on the CPU" if interpret else ""),
                 "run `archgen build SPEC --autotune` on the GPU the package will run on, or build without --autotune "
                 "(the package then runs each kernel's default config and says so once)")


def tune_kernels(cases: list[TuneCase], dtype: str, device: str,
                 on_case: Callable[[TuneCase], None] = lambda case: None) -> tuple[dict, list[Diagnostic]]:
    """Run every case's hook in one tuning session; returns the tuning table and warnings (kernel files without a
    hook, which keep their default configs). on_case(case) is called after each case (the progress bar)."""
    import torch

    support = importlib.import_module("archgen_kernels.triton_support")
    modules, warnings = {}, []
    for file in sorted({case.file for case in cases}):
        module = importlib.import_module(f"archgen_kernels.{file}")
        if callable(getattr(module, "autotune", None)):
            modules[file] = module
        else:
            warnings.append(Diagnostic("", f"--autotune: kernels/{file}.py declares no `autotune` hook, so its kernels "
                                           "keep their default configs", "add autotune(config, params, batch, seqlen, "
                                           "dtype, device) to it (see kernels/rmsnorm.py)", severity="warning"))
    with support.tuning_session() as table:
        for case in cases:
            if case.file in modules:
                modules[case.file].autotune(case.config, case.params, case.batch, case.seqlen,
                                            getattr(torch, dtype), device)
            on_case(case)
        if device == "cuda":
            torch.cuda.synchronize()
        return table(), warnings


def tuning_file(table: dict, spec_hash: str, cases: list[TuneCase], dtype: str) -> str:
    """kernels/tuning.json's text: the table with what it was tuned for (read by people; the loader reads entries)."""
    tuned_for = {"spec_hash": spec_hash, "dtype": dtype, "batches": sorted({c.batch for c in cases}),
                 "seq_lens": sorted({c.seqlen for c in cases}), "kernels": sorted({c.file for c in cases})}
    return json.dumps({"format": table["format"], "tuned_for": tuned_for, "entries": table["entries"]}, indent=1) + "\n"
