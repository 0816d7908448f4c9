"""Checkpoint conversion: safetensors shards in, the generated package's `save_pretrained` layout out, one tensor at a
time.

A `TensorPlan` says how one parameter of the generated model is made from checkpoint tensors: rows of pieces, each
row the concatenation of its (optionally transposed) pieces along the last dim (or the first: spans of a fused
projection gathered back, Qwen3-Next's per-head interleaved in_proj_qkvz); one row is the tensor itself, several
rows are stacked along a new first dim (Mixtral's experts into `w_in` / `w_out`). Everything is checked against the
shard headers before a byte is written (names, shapes, dtypes, shards present and complete); then the output file's
header is written from the planned shapes and each tensor is read, converted and appended on its own, so at most one
parameter (one expert for stacked ones) is in memory at a time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from archgen.errors import CompileError, Diagnostic, SourceLocation

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_DTYPE_NAME = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Piece:
    source: str  # the checkpoint tensor's name
    transpose: bool = False  # after selecting
    select: int | None = None  # take this index of the first dim (one expert of a stacked tensor)
    span: tuple[int, int] | None = None  # take these rows [start, stop) of the first dim (half of a fused projection)

    def shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        shape = shapes[self.source]
        if self.select is not None:
            shape = shape[1:]
        if self.span is not None:
            shape = (self.span[1] - self.span[0],) + shape[1:]
        return shape[::-1] if self.transpose else shape

    def in_bounds(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        first = shapes[self.source][0] if shapes[self.source] else 0
        rows = first if self.select is None else (shapes[self.source][1] if len(shapes[self.source]) > 1 else 0)
        return (self.select is None or 0 <= self.select < first) and (
            self.span is None or 0 <= self.span[0] < self.span[1] <= rows
        )


@dataclass(frozen=True)
class TensorPlan:
    target: str  # the generated model's parameter name
    rows: tuple[tuple[Piece, ...], ...]
    stacked: bool = False  # rows stacked along a new first dim; otherwise exactly one row
    axis: int = -1  # the dim a row's pieces are concatenated along: -1 or 0

    @classmethod
    def copy(cls, target: str, source: str) -> TensorPlan:
        return cls(target, ((Piece(source),),))

    def sources(self) -> list[str]:
        return [piece.source for row in self.rows for piece in row]


@dataclass
class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an index of shards), opened lazily."""

    directory: Path
    shard_of: dict[str, str]  # tensor name -> shard file name
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise _error(
                    str(index), f"cannot read the shard index: {error}", "re-download the checkpoint's index file"
                ) from None
            shards = sorted(set(weight_map.values()))
        elif single.exists():
            weight_map, shards = None, ["model.safetensors"]
        else:
            raise _error(
                str(directory),
                "no safetensors checkpoint: neither model.safetensors nor model.safetensors.index.json",
                "pass the model directory that holds the checkpoint (pytorch_model.bin checkpoints are not read)",
            )
        problems = [
            Diagnostic(
                "",
                f"shard {shard} listed in the index is missing",
                "download every shard the index names",
                SourceLocation(str(directory / shard)),
            )
            for shard in shards
            if not (directory / shard).exists()
        ]
        if problems:
            raise CompileError(problems)
        shard_of, shapes, dtypes = {}, {}, {}
        for shard in shards:
            header = _read_header(directory / shard)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                shard_of[name] = shard
                shapes[name] = tuple(entry["shape"])
                dtypes[name] = entry["dtype"]
        if weight_map is not None:
            missing = sorted(name for name, shard in weight_map.items() if shard_of.get(name) != shard)
            if missing:
                raise _error(
                    str(index),
                    f"{len(missing)} tensors the index places in a shard are not in it, e.g. "
                    f"{missing[0]} in {weight_map[missing[0]]}",
                    "re-download the checkpoint",
                )
        return cls(directory, shard_of, shapes, dtypes)

    def load(self, name: str) -> torch.Tensor:
        with safe_open(str(self.directory / self.shard_of[name]), framework="pt") as shard:
            return shard.get_tensor(name)

    def load_piece(self, piece: Piece) -> torch.Tensor:
        """The piece alone: a selected expert or span is read by itself, not the whole stacked tensor."""
        with safe_open(str(self.directory / self.shard_of[piece.source]), framework="pt") as shard:
            if piece.select is None and piece.span is None:
                tensor = shard.get_tensor(piece.source)
            elif piece.select is None:
                tensor = shard.get_slice(piece.source)[piece.span[0] : piece.span[1]]
            elif piece.span is None:
                tensor = shard.get_slice(piece.source)[piece.select]
            else:
                tensor = shard.get_slice(piece.source)[piece.select, piece.span[0] : piece.span[1]]
        return tensor.t() if piece.transpose else tensor


def _read_header(path: Path) -> dict:
    """The JSON header of one safetensors file, checked against the file size (a truncated download is an error here,
    before anything is converted)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise _error(str(path), f"the shard is truncated ({size} bytes, not even a header)", "re-download this shard")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise _error(
                str(path),
                f"the shard is truncated: its header claims {length} bytes, the file has {size}",
                "re-download this shard",
            )
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise _error(str(path), f"the shard's header is not valid JSON ({error})", "re-download this shard") from None
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise _error(
            str(path),
            f"the shard is truncated: its tensors need {8 + length + end} bytes, the file has {size}",
            "re-download this shard",
        )
    return header


def _error(file: str, message: str, fix: str) -> CompileError:
    return CompileError([Diagnostic("", message, fix, SourceLocation(file))])


def _shape_of(row: tuple[Piece, ...], checkpoint: Checkpoint, axis: int) -> tuple[int, ...] | None:
    if not all(p.in_bounds(checkpoint.shapes) for p in row):
        return None
    shapes = [list(p.shape(checkpoint.shapes)) for p in row]
    if not shapes[0]:
        return None
    lengths = [s.pop(axis) for s in shapes]
    if any(s != shapes[0] for s in shapes):
        return None
    shapes[0].insert(axis if axis >= 0 else len(shapes[0]) + 1 + axis, sum(lengths))
    return tuple(shapes[0])


def check_plan(
    plans: list[TensorPlan],
    expected: dict[str, tuple[int, ...]],
    checkpoint: Checkpoint,
    declared_dtype: str | None,
    dtype: str | None,
    ignorable: Callable[[str], bool],
) -> dict[str, torch.dtype]:
    """Every problem of converting `checkpoint` by `plans` into parameters of the shapes `expected`, at once.

    Returns the dtype each target will be written in.
    """
    problems: list[Diagnostic] = []
    out_dtypes: dict[str, torch.dtype] = {}
    where = SourceLocation(str(checkpoint.directory))
    planned = {plan.target for plan in plans}
    for target in sorted(set(expected) - planned):
        problems.append(
            Diagnostic(
                target,
                f"archgen's parameter {target} {expected[target]} has no checkpoint tensor mapped to it",
                "extend the model type's name mapping in archgen/importers",
                where,
            )
        )
    used: set[str] = set()
    for plan in plans:
        missing = [s for s in plan.sources() if s not in checkpoint.shapes]
        used.update(plan.sources())
        if missing:
            problems.append(
                Diagnostic(
                    plan.target,
                    f"the checkpoint has no tensor {missing[0]}, which archgen's {plan.target} "
                    f"{expected.get(plan.target)} is made from",
                    "check that the checkpoint matches its config.json",
                    where,
                )
            )
            continue
        row_shapes = [_shape_of(row, checkpoint, plan.axis) for row in plan.rows]
        shape = None
        if all(s is not None and s == row_shapes[0] for s in row_shapes):
            shape = (len(plan.rows),) + row_shapes[0] if plan.stacked else row_shapes[0]
        if shape != expected.get(plan.target):
            got = ", ".join(f"{s} {checkpoint.shapes[s]}" for s in plan.sources()[:3]) + (
                " ..." if len(plan.sources()) > 3 else ""
            )
            problems.append(
                Diagnostic(
                    plan.target,
                    f"checkpoint {got} gives shape {shape}, but archgen's {plan.target} is {expected.get(plan.target)}",
                    "check the config against the checkpoint",
                    where,
                )
            )
            continue
        source_dtypes = {checkpoint.dtypes[s] for s in plan.sources()}
        if len(source_dtypes) > 1:
            problems.append(
                Diagnostic(
                    plan.target,
                    f"the tensors making {plan.target} mix dtypes {sorted(source_dtypes)}",
                    "pass --dtype to convert every tensor to one dtype",
                    where,
                )
            )
            continue
        source_dtype = _from_safetensors(source_dtypes.pop())
        if dtype is None and declared_dtype is not None and source_dtype != DTYPES.get(declared_dtype):
            problems.append(
                Diagnostic(
                    plan.target,
                    f"checkpoint tensor {plan.sources()[0]} is {_DTYPE_NAME.get(source_dtype, source_dtype)}, "
                    f"but the config declares dtype {declared_dtype}",
                    "pass --dtype float32 (or bfloat16, float16) to convert every tensor to one dtype",
                    where,
                )
            )
            continue
        if source_dtype is None:
            problems.append(
                Diagnostic(
                    plan.target,
                    f"checkpoint tensor {plan.sources()[0]} has dtype {checkpoint.dtypes[plan.sources()[0]]}, "
                    "which is not a floating point type archgen loads",
                    "pass --dtype to convert",
                    where,
                )
            )
            continue
        out_dtypes[plan.target] = DTYPES[dtype] if dtype else source_dtype
    for name in sorted(set(checkpoint.shapes) - used):
        if not ignorable(name):
            problems.append(
                Diagnostic(
                    name,
                    f"checkpoint tensor {name} {checkpoint.shapes[name]} has no place in the imported spec",
                    "check the config against the checkpoint, or extend the name mapping",
                    where,
                )
            )
    if problems:
        raise CompileError(problems)
    return out_dtypes


def _from_safetensors(code: str) -> torch.dtype | None:
    return {v: k for k, v in _SAFETENSORS_DTYPE.items()}.get(code)


def _rows(plan: TensorPlan, checkpoint: Checkpoint, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for row in plan.rows:
        parts = [checkpoint.load_piece(p) for p in row]
        yield (parts[0] if len(parts) == 1 else torch.cat(parts, dim=plan.axis)).to(dtype).contiguous()


def write_safetensors(
    path: Path,
    plans: list[TensorPlan],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    checkpoint: Checkpoint,
) -> None:
    """Write `plans` as one safetensors file (the format save_model writes), streaming one row at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in plans:
        dtype = dtypes[plan.target]
        size = torch.Size(shapes[plan.target]).numel() * dtype.itemsize
        header[plan.target] = {
            "dtype": _SAFETENSORS_DTYPE[dtype],
            "shape": list(shapes[plan.target]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for plan in plans:
            for row in _rows(plan, checkpoint, dtypes[plan.target]):
                out.write(row.reshape(-1).view(torch.uint8).numpy().tobytes())  # bfloat16 has no numpy dtype: write raw bytes
