"""The `archgen` command line. Diagnostics travel as values through the pipeline and are printed here, once."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console

from archgen.errors import CompileError, Diagnostic
from archgen.spec.text import printable

# soft_wrap: a sentence stays one line when the output is piped (rich would otherwise wrap it at 80 columns).
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_SPEC_ERROR = 2

spec_argument = click.argument("spec", type=click.Path(path_type=Path))
preset_option = click.option("--preset", default=None, help="Apply presets from the spec's `presets:` (comma-separated ones "
                             "apply left to right, e.g. tiny,interleaved).")
set_option = click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
                          help="Override one field, e.g. --set mixers.attn.n_heads=8 (repeatable).")


@dataclass
class OutputMode:
    """How the running command reports: plain text (default), errors only (--quiet), or one JSON document on stdout
    (--json), which then carries the diagnostics too, so a script reads one place."""

    quiet: bool = False
    json: bool = False
    warnings: list[Diagnostic] = field(default_factory=list)


Output = OutputMode()


def output_options(command):
    """--quiet and --json, for every command that prints."""
    def configure(ctx, param, value):
        setattr(Output, param.name, value)
        return value

    command = click.option("--quiet", is_flag=True, expose_value=False, callback=configure, is_eager=True,
                           help="Print errors only.")(command)
    return click.option("--json", is_flag=True, expose_value=False, callback=configure, is_eager=True,
                        help="Print one JSON document on stdout (diagnostics included) instead of text.")(command)


def diagnostic_json(diagnostic: Diagnostic) -> dict:
    location = diagnostic.location
    return {"severity": diagnostic.severity, "path": diagnostic.path, "message": diagnostic.message, "fix": diagnostic.fix,
            "file": location.file if location else None, "line": location.line if location else None,
            "column": location.column if location else None}


def print_json(document: dict) -> None:
    click.echo(json.dumps({**document, "warnings": [diagnostic_json(d) for d in Output.warnings]}, indent=2))


def print_diagnostics(diagnostics: list[Diagnostic]) -> None:
    for diagnostic in diagnostics:
        if Output.json:
            Output.warnings.append(diagnostic)  # errors end the command through fail(); warnings ride along
            continue
        if Output.quiet and diagnostic.severity != "error":
            continue
        style = "red" if diagnostic.severity == "error" else "yellow"
        head, _, fix = diagnostic.render().partition("\n")
        stderr.print(head, style=style, markup=False)
        if fix:
            stderr.print(fix, markup=False)


def say(text: str) -> None:
    """A line of progress or result for a person: not printed with --quiet or --json."""
    if not (Output.quiet or Output.json):
        stdout.print(text, markup=False)


def fail(error: CompileError) -> None:
    if Output.json:
        warnings = Output.warnings + [d for d in error.diagnostics if d.severity != "error"]
        click.echo(json.dumps({"ok": False, "errors": [diagnostic_json(d) for d in error.diagnostics if d.severity == "error"],
                               "warnings": [diagnostic_json(d) for d in warnings]}, indent=2))
        sys.exit(EXIT_SPEC_ERROR)
    print_diagnostics(error.diagnostics)
    n = sum(d.severity == "error" for d in error.diagnostics)
    stderr.print(f"{n} error{'s' if n != 1 else ''}", style="bold red")
    sys.exit(EXIT_SPEC_ERROR)


@click.group()
@click.version_option(package_name="archgen")
def main() -> None:
    """archgen: compile declarative specs of hybrid SSM / attention / MoE networks into PyTorch packages."""
    Output.quiet, Output.json, Output.warnings = False, False, []


@main.command()
@spec_argument
@preset_option
@set_option
@output_options
def check(spec: Path, preset: str | None, overrides: tuple[str, ...]) -> None:
    """Validate SPEC (and, without --preset, every preset it defines). Exit 0 when valid, 2 otherwise."""
    from archgen.pipeline import compile_spec
    from archgen.spec.load import load_spec

    try:
        presets = [preset] if preset else [None] + sorted(load_spec(spec, None, overrides).spec.presets)
    except CompileError as error:
        fail(error)
    # A problem in the base spec recurs under every preset: report it once, naming where it applies.
    found: dict[Diagnostic, list[str]] = {}
    for name in presets:
        try:
            compiled = compile_spec(spec, name, overrides)
            print_diagnostics(list(compiled.loaded.warnings))
        except CompileError as error:
            for diagnostic in error.diagnostics:
                found.setdefault(diagnostic, []).append("base" if name is None else name)
    if found:
        fail(CompileError([Diagnostic(d.path, d.message + _where_it_applies(where, len(presets)), d.fix, d.location, d.severity)
                           for d, where in found.items()]))
    if Output.json:
        print_json({"ok": True, "spec": str(spec), "checked": ["base" if name is None else name for name in presets]})
        return
    checked = ", ".join("base" if name is None else f"preset {name}" for name in presets)
    say(f"ok: {spec} ({checked})")


def _where_it_applies(where: list[str], n_checked: int) -> str:
    if n_checked == 1 or (where == ["base"]):
        return ""
    if len(where) == n_checked:
        return " (base and every preset)"
    names = [w for w in where if w != "base"]
    label = f"preset{'s' if len(names) > 1 else ''} {', '.join(names)}"
    return f" (base and {label})" if "base" in where else f" ({label})"


@main.command()
@spec_argument
@preset_option
@set_option
@output_options
@click.option("--diagram", type=click.Path(path_type=Path), default=None, help="Write the layer pattern as an SVG file.")
@click.option("--seq-len", default=2048, show_default=True, help="Sequence length for FLOPs and activations.")
@click.option("--context", default=None, type=int, help="Context length for the per-layer cache column (default: seq-len).")
def inspect(spec: Path, preset: str | None, overrides: tuple[str, ...], diagram: Path | None, seq_len: int,
            context: int | None) -> None:
    """Print SPEC's per-layer table and totals: parameters, FLOPs, weight, cache and activation bytes."""
    from archgen.passes.cost import cost_report
    from archgen.pipeline import compile_spec
    from archgen.report.diagram import layout_svg
    from archgen.report.tables import layer_table, report_json, totals_table

    try:
        compiled = compile_spec(spec, preset, overrides)
    except CompileError as error:
        fail(error)
    resolved = compiled.resolved
    report = cost_report(compiled.ir, seq_len=seq_len, context=context)
    warnings = list(compiled.loaded.warnings)
    mismatch = report.nominal_mismatch(resolved.nominal_params)
    if mismatch is not None:
        warnings.append(Diagnostic("nominal_params", f"the spec says {resolved.nominal_params:,.0f} parameters, the model has "
                                   f"{report.total_params:,} ({mismatch:+.0%})", "trust the count, or fix the spec's sizes",
                                   severity="warning"))
    print_diagnostics(warnings)
    if diagram is not None:
        diagram.write_text(layout_svg(resolved), encoding="utf-8")
    if Output.json:
        print_json(report_json(resolved, report))
        return
    stdout.print(layer_table(resolved, report))
    stdout.print(totals_table(resolved, report))
    if diagram is not None and not Output.quiet:
        stdout.print(f"diagram written to {diagram}")


@main.command()
@click.argument("specs", nargs=-1, type=click.Path(path_type=Path))
@preset_option
@set_option
@click.option("-o", "--output", "output_root", type=click.Path(path_type=Path), default=Path("generated"), show_default=True,
              help="Directory that receives <name>/ for each spec.")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 if the output differs from what the specs produce (prints the diff).")
@output_options
@click.option("--export", "export_formats", type=click.Choice(["pt2", "onnx"]), multiple=True,
              help="Also export each built package, as `archgen export` does with its defaults, into exports/<name>/ "
                   "(repeatable).")
@click.option("--autotune", is_flag=True,
              help="On this GPU, tune every Triton kernel the model uses at its shapes and pin the winners in the "
                   "package (kernels/tuning.json). Without it the package runs default configs and never tunes.")
@click.option("--tune-seq-len", "tune_seq_lens", type=click.IntRange(min=1), multiple=True, metavar="T",
              help="With --autotune: also tune at this sequence length (repeatable; the spec's max_seq_len and the "
                   "powers of two from 256 below it are always tuned).")
@click.option("--tune-batch", "tune_batches", type=click.IntRange(min=1), multiple=True, default=(1,), show_default=True,
              metavar="B", help="With --autotune: batch sizes to tune at (repeatable).")
@click.option("--tune-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="With --autotune: the activations' dtype the model will run in.")
def build(specs: tuple[Path, ...], preset: str | None, overrides: tuple[str, ...], output_root: Path, check: bool,
          export_formats: tuple[str, ...], autotune: bool, tune_seq_lens: tuple[int, ...], tune_batches: tuple[int, ...],
          tune_dtype: str) -> None:
    """Compile SPECS (default: every specs/*.yaml) into importable PyTorch packages under OUTPUT/<name>/."""
    import time

    from archgen.emit import diff_package, emit, write_package
    from archgen.pipeline import compile_spec
    from archgen.report.tables import human_bytes, human_count

    specs = specs or tuple(sorted(Path("specs").glob("*.yaml")))
    if not specs:
        stderr.print("no specs given and none found in specs/", style="red")
        sys.exit(EXIT_SPEC_ERROR)
    device = None
    if autotune:
        from archgen.emit.tune import tuning_device

        try:
            if check:
                raise CompileError([Diagnostic("", "--autotune and --check do not go together: --check compares "
                                                   "with what the specs produce, and tuned configs depend on the GPU",
                                               "drop one of them")])
            device = tuning_device()  # before anything is compiled or written: no GPU, no build
        except CompileError as error:
            fail(error)
    stale, built = [], []
    for spec in specs:
        started = time.perf_counter()
        try:
            compiled = compile_spec(spec, preset, overrides)
            # A file name may hold bytes that are not UTF-8.
            emitted = emit(compiled, printable(spec.as_posix()), printable(output_root.as_posix()))
        except CompileError as error:
            fail(error)
        target = output_root / compiled.resolved.name
        if check:
            diffs = diff_package(emitted.files, target)
            if diffs:
                stale.append(target)
                if not Output.json:
                    for diff in diffs:
                        click.echo(diff)
            else:
                say(f"up to date: {target}")
            continue
        files, tuning = emitted.files, None
        if device is not None:
            files, tuning = autotune_package(compiled, emitted, device, tune_seq_lens, tune_batches, tune_dtype)
        for note in write_package(files, target):  # what a killed build left behind, and what was done about it
            stderr.print(f"note: {note}", style="yellow", markup=False)
        size = sum(len(text.encode()) for text in files.values())
        report = emitted.plan.report
        seconds = time.perf_counter() - started
        built.append({"spec": str(spec), "package": str(target), "spec_hash": compiled.resolved.spec_hash,
                      "files": len(files), "bytes": size, "parameters": report.total_params,
                      "seconds": round(seconds, 3)})
        if tuning is not None:
            built[-1]["tuning"] = tuning
        say(f"built {target}/ from {spec} in {seconds:.2f}s: {len(files)} files ({human_bytes(size)}), "
            f"{len(emitted.plan.blocks)} block kinds, {human_count(report.total_params)} parameters")
        if export_formats:
            built[-1]["export"] = run_export(target, formats=export_formats)
    if Output.json:
        print_json({"ok": not stale, "built": built} if not check else {"ok": not stale, "stale": [str(t) for t in stale]})
    if stale:
        if not Output.json:
            stderr.print(f"stale: {', '.join(map(str, stale))}: run `archgen build` and commit the result", style="bold red")
        sys.exit(1)


def autotune_package(compiled, emitted, device: str, seq_lens: tuple[int, ...], batches: tuple[int, ...],
                     dtype: str) -> tuple[dict[str, str], dict]:
    """The package's files with kernels/tuning.json added (the winners of tuning its kernels here, with a progress
    bar), and a summary of the tuning for the build's report."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from archgen.emit.tune import TUNING_FILE, seq_len_buckets, tune_kernels, tuning_cases, tuning_file

    name = compiled.resolved.name
    cases = tuning_cases(compiled.ir, seq_len_buckets(emitted.plan.max_seq_len, seq_lens), batches)
    if not cases:
        say(f"nothing to tune: {name} runs no Triton kernel")
        return emitted.files, {"entries": 0, "seconds": 0.0, "file": None}
    started = time.perf_counter()
    columns = (TextColumn("tuning {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True, disable=Output.quiet or Output.json) as progress:
        task = progress.add_task(name, total=len(cases))
        table, warnings = tune_kernels(cases, dtype, device, lambda case: progress.update(
            task, advance=1, description=f"{name}: {case.label}"))
    print_diagnostics(warnings)
    seconds = time.perf_counter() - started
    say(f"tuned {len(table['entries'])} kernel configs of {name} in {seconds:.1f}s on {device} "
        f"({', '.join(sorted({c.file for c in cases}))}; batch {sorted(set(batches))}, lengths "
        f"{sorted({c.seqlen for c in cases})}, {dtype}): {TUNING_FILE}")
    text = tuning_file(table, compiled.resolved.spec_hash, cases, dtype)
    return {**emitted.files, TUNING_FILE: text}, {"entries": len(table["entries"]), "seconds": round(seconds, 3),
                                                  "file": TUNING_FILE, "table": json.loads(text)}


def run_export(package: Path, show_traceback: bool = False, **options) -> dict:
    """Export one generated package and report it; an ExportError is printed (layer, op, spec component) and exits 1.
    Returns what --json prints: the output files and the checks against eager."""
    import time
    import traceback

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from archgen.export import ExportError, export_package
    from archgen.report.tables import human_bytes

    started = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("exporting {task.fields[package]}: {task.description}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=stderr, transient=True, disable=Output.quiet or Output.json) as progress:
            task = progress.add_task("loading the package", package=str(package))
            result = export_package(package, progress=lambda step: progress.update(task, description=step), **options)
    except (ExportError, ValueError, FileNotFoundError) as error:
        if show_traceback:
            traceback.print_exception(error)
        if Output.json:
            click.echo(json.dumps({"ok": False, "package": str(package), "error": str(error)}, indent=2))
        else:
            stderr.print(f"error: {error}", style="red", markup=False)
        sys.exit(1)
    summary = {"package": str(package), "directory": str(result.directory), "seconds": round(time.perf_counter() - started, 1),
               "files": {graph: {fmt: str(path) for fmt, path in by_format.items()} for graph, by_format in result.files.items()},
               "checks": result.manifest["checks"]}
    files = ", ".join(f"{path.name} ({human_bytes(path.stat().st_size)})" for by_format in result.files.values()
                      for path in by_format.values())
    say(f"exported {package}/ to {result.directory}/ in {summary['seconds']:.1f}s: {files}, manifest.json")
    checks = result.manifest["checks"]
    if checks:
        worst = {graph: max(checks[graph].values(), default=0.0) for graph in ("prefill", "decode")}
        say(f"checked against eager at batch {checks['batch']}, prompt {checks['seq']}: relative error "
            f"prefill {worst['prefill']:.1e}, decode {worst['decode']:.1e}")
    return summary


DYNAMIC_DIMS = ("batch", "seq")


def dynamic_dims(text: str) -> list[str]:
    """--dynamic: 'batch', 'seq', 'batch,seq' or 'both', and '' or 'none' for a fully static graph."""
    words = [word.strip() for word in text.split(",") if word.strip()]
    if words in (["both"], ["all"]):
        return list(DYNAMIC_DIMS)
    if words in ([], ["none"]):
        return []
    unknown = [word for word in words if word not in DYNAMIC_DIMS]
    if unknown:
        raise click.BadParameter(f"unknown dim {', '.join(map(repr, unknown))}: use batch, seq, both, or none",
                                 param_hint="--dynamic")
    return words


@main.command("export")
@click.argument("package", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--format", "formats", type=click.Choice(["pt2", "onnx"]), multiple=True,
              help="What to write (repeatable); default both. ONNX is converted from the torch.export program.")
@click.option("--weights", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="A save_pretrained directory; default: a seeded initialisation (the manifest records the seed).")
@click.option("--seed", default=0, show_default=True, help="Seed of the initialisation when no --weights are given.")
@click.option("--dynamic", default="batch,seq", show_default=True,
              help="Dims left dynamic: batch, seq, both (= batch,seq), or none (a static dim takes --batch / --seq).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--max-batch", default=64, show_default=True, help="Upper bound of the dynamic batch.")
@click.option("--max-len", type=int, default=None,
              help="Positions a cache holds, meta tokens included (default: the spec's max_seq_len).")
@click.option("--batch", default=1, show_default=True, help="The batch size when batch is static.")
@click.option("--seq", default=16, show_default=True, help="The prompt length when seq is static.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (18 or newer).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output directory (default: exports/<name>/).")
@click.option("--no-check", is_flag=True, help="Skip running the exported graphs against eager.")
@click.option("--attention-mask", "ragged", is_flag=True,
              help="The prefill graph also takes attention_mask (left-padded prompts of different lengths; the caches "
                   "carry each row's pads).")
@click.option("--traceback", "show_traceback", is_flag=True, help="On failure, also print the exporter's own stack trace.")
@output_options
def export_command(package: Path, formats: tuple[str, ...], weights: Path | None, seed: int, dynamic: str, dtype: str,
                   max_batch: int, max_len: int | None, batch: int, seq: int, opset: int, output: Path | None,
                   no_check: bool, ragged: bool, show_traceback: bool) -> None:
    """Export the generated PACKAGE (e.g. generated/hspmn) as prefill and decode-step graphs (.pt2, .onnx) with a manifest."""
    if opset < 18:
        raise click.BadParameter(f"ONNX export needs opset 18 or newer, got {opset}", param_hint="--opset")
    summary = run_export(package, show_traceback=show_traceback, formats=formats or ("pt2", "onnx"), weights=weights,
                         seed=seed, dtype=dtype, dynamic=dynamic_dims(dynamic), max_batch=max_batch, max_len=max_len,
                         batch=batch, seq=seq, opset=opset, output=output, check=not no_check, ragged=ragged)
    if Output.json:
        print_json({"ok": True, **summary})


@main.group("import")
def import_group() -> None:
    """Bring a published model in as a spec (and its weights)."""


@import_group.command("hf")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Directory that receives spec.yaml (and weights/).")
@click.option("--weights", is_flag=True,
              help="Also convert the safetensors checkpoint in SOURCE into OUTPUT/weights/ (a save_pretrained directory).")
@click.option("--name", default=None, help="The spec's name (default: from the model directory's name).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Convert every tensor to this dtype (default: keep the checkpoint's, which must match the config's).")
@output_options
def import_hf_command(source: Path, output: Path, weights: bool, name: str | None, dtype: str | None) -> None:
    """Import a Hugging Face config.json (or a model directory) as OUTPUT/spec.yaml."""
    from archgen.importers import import_hf

    if not source.exists():
        hub_id = len(source.parts) == 2 and not str(source).startswith((".", "/"))
        hint = (f": archgen reads a downloaded model and fetches nothing. Download it first, e.g. `hf download {source} "
                f"--local-dir models/{source.name}` (huggingface_hub), then `archgen import hf models/{source.name}`"
                if hub_id else "")
        raise click.BadParameter(f"'{source}' does not exist{hint}", param_hint="SOURCE")

    try:
        result = import_hf(source, output, weights=weights, name=name, dtype=dtype)
    except CompileError as error:
        fail(error)
    if Output.json:
        print_json({"ok": True, "model_type": result.model_type, "spec": str(result.spec_path), "spec_hash": result.spec_hash,
                    "params": result.n_params, "weights": str(result.weights) if result.weights else None})
        return
    weights_note = f"; weights in {result.weights}/" if result.weights else ""
    say(f"imported {source} (model_type {result.model_type}) to {result.spec_path}: {result.n_params:,} parameters, "
        f"spec sha256 {result.spec_hash[:12]}{weights_note}")


@main.command("export-spec")
@spec_argument
@preset_option
@set_option
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Directory that receives config.json (and model.safetensors).")
@click.option("--weights", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="A save_pretrained directory of the generated package, converted to the transformers checkpoint layout.")
@output_options
def export_spec_command(spec: Path, preset: str | None, overrides: tuple[str, ...], output: Path, weights: Path | None) -> None:
    """Write SPEC as a Hugging Face config.json (llama, mistral, mixtral, mamba, mamba2, bamba, jamba) where it is exactly one."""
    from archgen.importers import export_spec

    try:
        result = export_spec(spec, output, weights=weights, preset=preset, overrides=overrides)
    except CompileError as error:
        fail(error)
    if Output.json:
        print_json({"ok": True, "model_type": result.model_type, "directory": str(result.directory)})
        return
    say(f"exported {spec} as model_type {result.model_type} to {result.directory}/")


@main.command()
@spec_argument
@preset_option
@set_option
@output_options
@click.option("--device", default=None, help="cuda (default when a GPU is present) or cpu (figures only check the command).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--batch", default=4, show_default=True, help="Batch of the training step and the prefill.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per sequence in the training step and the prefill.")
@click.option("--decode-batch", "decode_batches", multiple=True, type=int, default=(1, 32), show_default=True,
              help="Batch sizes of the decode measurement (repeatable).")
@click.option("--prompt-len", default=128, show_default=True)
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=3),
              help="tokens generated per decode timing (on CUDA graphs: generate's greedy loop after its prefill, "
                   "timed alone; eager: the runs of 2 and of this many tokens are subtracted)")
@click.option("--variant", "variants", multiple=True,
              type=click.Choice(["kernels", "reference", "compiled", "kernels_compiled", "kernels_graphed"]),
              help="What to measure (repeatable; default the first three): the package as generated, its reference ops, "
                   "those compiled, the package compiled, and its layers replayed as CUDA graphs.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default=Path("bench-results"),
              show_default=True,
              help="Directory for <name>.json and <name>.png.")
def bench(spec: Path, preset: str | None, overrides: tuple[str, ...], device: str | None, dtype: str, batch: int, seq_len: int,
          decode_batches: tuple[int, ...], prompt_len: int, new_tokens: int, variants: tuple[str, ...], output: Path) -> None:
    """Measure SPEC's generated model on this machine: training tokens/s and MFU, prefill tokens/s, decode ms/token
    against the memory floor, peak memory; for the package as generated, its reference ops, and those compiled."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from archgen.benchmark import DEFAULT_VARIANTS, BenchConfig, plot, progress_steps, run_bench

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is visible to torch; use --device cpu to check the command",
                                 param_hint="--device")
    config = BenchConfig(spec, preset, overrides, device, dtype, batch, seq_len, decode_batches, prompt_len, new_tokens,
                         variants=variants or DEFAULT_VARIANTS)
    columns = (SpinnerColumn(), TextColumn("bench {task.fields[spec]}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.description}"))
    try:
        with Progress(*columns, console=stderr, transient=True, disable=Output.quiet or Output.json) as progress:
            task = progress.add_task("starting", spec=spec.name, total=progress_steps(config))
            started = iter(range(progress_steps(config) + 1))  # each report starts a step: the ones before it are done

            def report(step: str) -> None:
                progress.update(task, description=step, completed=next(started, progress_steps(config)))

            result = run_bench(config, progress=report)
            progress.update(task, completed=progress_steps(config))
    except CompileError as error:
        fail(error)
    output.mkdir(parents=True, exist_ok=True)
    name = spec.stem + (f"-{preset}" if preset else "")
    write_text_atomically(output / f"{name}.json", json.dumps(result.to_json(), indent=2) + "\n")
    plot(result, output / f"{name}.png")
    if Output.json:
        print_json({"ok": True, **result.to_json()})
        return
    if Output.quiet:
        return
    table = Table(title=f"{spec.name} on {result.device}, {dtype}: train/prefill at {batch} × {seq_len}")
    decode_columns = [f"decode b{b} ms/tok (× floor)" for b in decode_batches]
    for column in ("variant", "train tok/s", "MFU", "prefill tok/s", *decode_columns, "peak GiB"):
        table.add_column(column, justify="right")
    def absent(figures: dict, part: str) -> str:
        # compiled variants do not decode (theirs is the uncompiled variant's): not measured, not failed
        return "failed" if f"{part}_error" in figures else "skipped" if f"{part}_skipped" in figures else "—"

    def cell(figures: dict, part: str, key: str, form: str) -> str:
        if part not in figures:
            return absent(figures, part)
        if figures[part].get(key) is None:
            return "—"
        shape = (figures[part].get("batch", batch), figures[part].get("seq_len", seq_len))
        shrunk = f" at {shape[0]} × {shape[1]}" if shape != (batch, seq_len) else ""  # it did not fit at batch × seq_len
        # training's tokens/s from replays of one recorded step (the package's CUDAGraphTrainStep)
        graphed = " (graph)" if key == "tokens_per_s" and figures[part].get("cuda_graph_step") else ""
        return format(figures[part][key], form) + shrunk + graphed

    for variant, figures in result.variants.items():
        decode = [f"{figures[f'decode_batch_{b}']['ms_per_token']:.2f} ({figures[f'decode_batch_{b}']['times_floor']:.1f}×)"
                  if f"decode_batch_{b}" in figures else absent(figures, f"decode_batch_{b}") for b in decode_batches]
        peaks = [f["peak_memory_gib"] for f in figures.values() if isinstance(f, dict) and "peak_memory_gib" in f]
        table.add_row(variant, cell(figures, "train", "tokens_per_s", ",.0f"), cell(figures, "train", "mfu", ".1%"),
                      cell(figures, "prefill", "tokens_per_s", ",.0f"),
                      *decode, f"{max(peaks):.1f}" if peaks else "—")
    stdout.print(table)
    for variant, figures in result.variants.items():
        for key, message in figures.items():
            if key.endswith("_error"):
                stderr.print(f"{variant} {key[:-6]} failed: {message}", style="yellow", markup=False)
            elif key.endswith("_skipped"):
                stderr.print(f"{variant} {key[:-8]} skipped: {message}", style="yellow", markup=False)
        if "cuda_graph_step_error" in figures.get("train", {}):
            stderr.print(f"{variant} train timed eagerly, its step not recorded as a CUDA graph: "
                         f"{figures['train']['cuda_graph_step_error']}", style="yellow", markup=False)
        if "mfu_note" in figures.get("train", {}):
            stderr.print(f"{variant} MFU not shown: {figures['train']['mfu_note']}", style="yellow", markup=False)
    say(f"wrote {output / (name + '.json')} and {output / (name + '.png')}")


SCHEMA_ID = "urn:archgen:spec-schema:1"  # a name, not a place: editors get the file itself through `schema --install`


def spec_schema() -> dict:
    """The spec language as a JSON Schema (draft 2020-12, which pydantic writes) with its dialect and identity."""
    from archgen.spec.models import Spec

    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **Spec.model_json_schema()}


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the schema to this file instead of printing it.")
@click.option("--install", is_flag=True,
              help="Write the schema to .archgen/spec.schema.json and map specs/*.yaml to it in .vscode/settings.json "
                   "(the YAML extension's `yaml.schemas`); other settings are kept.")
@click.option("--quiet", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, param, value: setattr(Output, "quiet", value),
              help="Print errors only (the schema itself is still printed when neither -o nor --install is given).")
@click.option("--recipe", "for_recipe", is_flag=True, help="The schema of training recipes (`archgen train`) instead of specs.")
def schema(output: Path | None, install: bool, for_recipe: bool) -> None:
    """Print the JSON Schema of the spec language (for editor completion and validation).

    Editors that read `# yaml-language-server: $schema=PATH` modelines (VS Code's YAML extension, Neovim's yamlls,
    JetBrains IDEs) validate a spec that starts with one; every spec in specs/ does.
    """
    if for_recipe:
        from archgen.train.recipe import Recipe

        recipe_schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **Recipe.model_json_schema()}
        text = json.dumps(recipe_schema, indent=2) + "\n"
        if output is not None:
            write_text_atomically(output, text)
        else:
            click.echo(text, nl=False)
        return
    text = json.dumps(spec_schema(), indent=2) + "\n"
    if install:
        output = output or Path(".archgen/spec.schema.json")
        install_schema(output, text)
        return
    if output is not None:
        write_text_atomically(output, text)
        say(f"schema written to {output}")
        return
    click.echo(text, nl=False)


def install_schema(schema_path: Path, text: str) -> None:
    """Write the schema and point VS Code's YAML extension at it for specs/*.yaml, keeping every other setting."""
    settings_path = Path(".vscode/settings.json")
    settings = {}
    if settings_path.exists():
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:  # VS Code allows comments there; we will not rewrite what we cannot read
            stderr.print(f"error: {settings_path}:{error.lineno}:{error.colno}: not plain JSON ({error.msg}); "
                         "nothing was written",
                         style="red", markup=False)
            stderr.print(f"fix: add \"yaml.schemas\": {{\"{schema_path}\": [\"specs/*.yaml\"]}} to it by hand, "
                         "or remove its comments and run this again", markup=False)
            sys.exit(EXIT_SPEC_ERROR)
        if not isinstance(settings, dict):
            stderr.print(f"error: {settings_path} is not a JSON object; nothing was written", style="red", markup=False)
            sys.exit(EXIT_SPEC_ERROR)
    schemas = settings.get("yaml.schemas") if isinstance(settings.get("yaml.schemas"), dict) else {}
    settings["yaml.schemas"] = {**schemas, schema_path.as_posix(): ["specs/*.yaml"]}
    write_text_atomically(schema_path, text)
    write_text_atomically(settings_path, json.dumps(settings, indent=2) + "\n")
    say(f"schema written to {schema_path}; {settings_path} maps specs/*.yaml to it")


def write_text_atomically(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary sibling renamed over the target."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@main.command("train")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the run's output directory.")
@click.option("--resume-from", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Continue from this checkpoint directory.")
@click.option("--stop-after", type=int, default=None,
              help="Save and stop after this many steps (the schedule still spans the recipe's steps).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: this process's GPU when there is one).")
@click.option("--no-progress", is_flag=True, help="Print a line per log interval instead of a progress bar.")
def train_command(recipe: Path, resume: bool, resume_from: Path | None, stop_after: int | None, device: str | None,
                  no_progress: bool) -> None:
    """Train the spec a RECIPE names on its data; checkpoints, metrics.jsonl and curves.png go to its output directory.

    Under `torchrun --nproc-per-node N -m archgen train RECIPE` the model is sharded with FSDP2. Ctrl-C or SIGTERM
    saves a checkpoint and exits with 128 + the signal number."""
    import os

    from archgen.train.loop import train

    main_process = os.environ.get("RANK", "0") == "0"
    try:
        result = train(recipe, resume=resume_from or resume, stop_after=stop_after, device=device, console=stderr,
                       show_progress=not no_progress)
    except CompileError as error:
        if main_process:
            fail(error)
        sys.exit(EXIT_SPEC_ERROR)
    if not main_process:
        return
    from archgen.train.metrics import perplexity

    if result.eval_loss is not None:
        stdout.print(f"held-out loss {result.eval_loss:.4f} (perplexity {perplexity(result.eval_loss):.2f}); unigram baseline "
                     f"{result.unigram_loss:.4f} (perplexity {perplexity(result.unigram_loss):.2f})", markup=False)
    stdout.print(f"checkpoint: {result.checkpoint}", markup=False)
    if result.curves:
        stdout.print(f"curves: {result.curves}", markup=False)
    if result.interrupted is not None:
        sys.exit(128 + result.interrupted)


@main.command("generate")
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--prompt", default="", help="Text to continue.")
@click.option("--max-new-tokens", default=200, show_default=True)
@click.option("--temperature", default=0.8, show_default=True, help="0 decodes greedily.")
@click.option("--top-k", type=int, default=50, show_default=True)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def generate_command(checkpoint: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                     top_p: float | None, seed: int, device: str) -> None:
    """Continue --prompt with a trained CHECKPOINT (a checkpoint directory, or a run directory: its newest), printing
    the text as it is generated."""
    from archgen.train.generate import generate_text

    try:
        sys.stdout.write(prompt)
        generate_text(checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed, device,
                      write=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        sys.stdout.write("\n")
    except (FileNotFoundError, ValueError) as error:
        stderr.print(f"error: {error}", style="red", markup=False)
        sys.exit(1)


@main.group("tokenizer")
def tokenizer_group() -> None:
    """Tokenizers for training."""


@tokenizer_group.command("train")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--vocab-size", default=8192, show_default=True)
@click.option("--field", default="text", show_default=True, help="The text column of JSONL / Parquet files.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("tokenizer.json"), show_default=True)
def tokenizer_train(files: tuple[Path, ...], vocab_size: int, field: str, output: Path) -> None:
    """Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on FILES; <|endoftext|> separates documents."""
    from archgen.train.data import check_source
    from archgen.train.tokenizer import TokenizerError, train_bpe

    for file in files:
        why = check_source(file, field)
        if why:
            stderr.print(f"error: {file}: {why}", style="red", markup=False)
            sys.exit(EXIT_SPEC_ERROR)
    try:
        result = train_bpe(list(files), vocab_size, output, field)
    except TokenizerError as error:
        stderr.print(f"error: {error}", style="red", markup=False)
        sys.exit(1)
    stdout.print(f"wrote {result['file']}: {result['vocab_size']:,} tokens from {result['documents']:,} documents", markup=False)


if __name__ == "__main__":
    main()
