"""archgen.benchmark (`archgen bench`) on the CPU at toy sizes: every part of every variant asked for is measured or
names its error, the floors are positive, and the plot is a PNG. The figures themselves mean nothing here."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from archgen.benchmark import (
    BenchConfig,
    BenchResult,
    add_mfu,
    greedy_loop_ms_per_token,
    measure_variant,
    plot,
    prepare_bench,
    progress_steps,
    run_bench,
    train_figures,
)
from archgen.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY = {"device": "cpu", "dtype": "float32", "batch": 1, "seq_len": 16, "decode_batches": (1, 2), "prompt_len": 4, "new_tokens": 3,
       "train_steps": 1}


def test_every_part_is_measured_against_floors_of_the_same_run(tmp_path):
    config = BenchConfig(ROOT / "specs/hspmn.yaml", "tiny", variants=("reference",), **TOY)
    steps = []
    result = run_bench(config, progress=steps.append)
    assert len(steps) == progress_steps(config), steps  # `archgen bench`'s progress bar ends full, not before
    figures = result.variants["reference"]
    assert not [key for key in figures if key.endswith("_error")], figures
    assert figures["train"]["tokens_per_s"] > 0 and 0 < figures["train"]["mfu"]
    assert figures["prefill"]["tokens_per_s"] > 0
    for batch in (1, 2):
        decode = figures[f"decode_batch_{batch}"]
        assert decode["ms_per_token"] > 0 and decode["floor_ms_per_token"] > 0
        assert decode["times_floor"] == decode["ms_per_token"] / decode["floor_ms_per_token"]
    assert result.copy_bytes_per_s > 0 and result.matmul_flops_per_s > 0 and result.parameters > 0
    plot(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_progress_bar_counts_the_compiled_variants_without_decoding():
    config = BenchConfig(Path("toy.yaml"), variants=("kernels", "compiled"), decode_batches=(1, 32))
    assert progress_steps(config) == 2 + (1 + 2 + 2) + (1 + 2)  # build, floors; model, train, prefill, 2 decodes; ...


def test_a_part_that_would_end_past_the_deadline_is_skipped_and_the_others_kept(tmp_path):
    """whole_model.py's guard: a compile estimated to outlast the budget does not start; figures fill the caller's dict
    as each part ends, so a run stopped from outside keeps them."""
    prepared = prepare_bench(BenchConfig(ROOT / "specs/hspmn.yaml", "tiny", variants=("reference",), **TOY), tmp_path)
    figures = {}
    seen = []

    def progress(step):
        seen.append(dict(figures))

    measure_variant(prepared, "reference", progress, deadline=time.perf_counter() + 600, parts=("train", "prefill"),
                    figures=figures, part_seconds={"prefill": 3600.0})
    assert figures["train"]["tokens_per_s"] > 0 and "prefill" not in figures
    assert figures["prefill_skipped"].endswith("the part takes about 3600 s"), figures
    assert "train" in seen[-1], "the training figure was in the caller's dict when the prefill was considered"
    assert not [key for key in figures if key.startswith("decode")], "decoding was not asked for"


def test_a_run_without_decoding_still_plots(tmp_path):
    """The compiled variants measure training and prefill only (GPU call 1 of session 7 lost its PNG to an empty log axis)."""
    result = BenchResult("bamba_1b.yaml", None, "cpu", "2.13", "2026-12-01", 1, 1, 1.0, 1.0, 1.0,
                         {"decode_batches": [1, 32], "batch": 8, "seq_len": 2048, "dtype": "bfloat16"},
                         {"compiled": {"train": {"tokens_per_s": 43309.8}, "prefill": {"tokens_per_s": 114729.5}}})
    plot(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_command_writes_json_and_png(tmp_path):
    result = CliRunner().invoke(main, ["bench", str(ROOT / "specs/hspmn.yaml"), "--preset", "tiny", "--device", "cpu",
                                       "--dtype", "float32", "--batch", "1", "--seq-len", "8", "--decode-batch", "1",
                                       "--prompt-len", "4", "--new-tokens", "3",
                                       "--variant", "reference", "-o", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["ok"] and "reference" in document["variants"]
    assert (tmp_path / "hspmn-tiny.json").exists() and (tmp_path / "hspmn-tiny.png").exists()


def test_an_mfu_above_one_is_not_shown_as_one_and_says_why():
    """On a CPU without native bfloat16 the square bf16 matmul the run measures is slower than the model's own
    matmuls (an MFU of 269% in `archgen bench --preset tiny`): that rate was no peak, so no MFU is reported."""
    prepared = SimpleNamespace(train_flops_per_token=lambda seq_len: 1e6, result=SimpleNamespace(matmul_flops_per_s=1e9))
    below, above = {"tokens_per_s": 500.0, "seq_len": 8}, {"tokens_per_s": 2700.0, "seq_len": 8}
    add_mfu(below, prepared)
    add_mfu(above, prepared)
    assert below["mfu"] == 0.5 and "mfu_note" not in below
    assert above["mfu"] is None and "2.70x the measured square-matmul rate (1.00 GFLOP/s)" in above["mfu_note"]


def test_the_table_tells_a_part_not_measured_from_a_failed_one(tmp_path):
    """The compiled variant does not decode (its decoding is the uncompiled one's): its decode cells read "—", not
    "failed"; a CPU records no peak memory, "—" rather than 0.0."""
    result = CliRunner().invoke(main, ["bench", str(ROOT / "specs/hspmn.yaml"), "--preset", "tiny", "--device", "cpu",
                                       "--dtype", "float32", "--batch", "1", "--seq-len", "8", "--decode-batch", "1",
                                       "--prompt-len", "4", "--new-tokens", "3", "--variant", "compiled", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "compiled" in line)
    assert "failed" not in row and row.count("—") >= 2, result.stdout


class FitsUpTo(torch.nn.Module):
    """A model whose training step runs out of memory above `max_tokens` tokens, as a GPU's would."""

    def __init__(self, max_tokens: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.max_tokens = max_tokens

    def forward(self, tokens, targets):
        if tokens.numel() > self.max_tokens:
            raise torch.OutOfMemoryError(f"{tokens.numel()} tokens")
        return SimpleNamespace(loss=self.weight * tokens.float().mean())


def test_a_training_step_that_does_not_fit_halves_the_batch_then_the_length():
    tokens = torch.zeros(4, 1024 + 1, dtype=torch.long)
    figures = train_figures(FitsUpTo(512), tokens, BenchConfig(Path("toy.yaml"), **TOY))
    assert (figures["batch"], figures["seq_len"]) == (1, 512)
    assert figures["out_of_memory_at"] == ["4 x 1024", "2 x 1024", "1 x 1024"]
    assert figures["tokens_per_s"] > 0
    fits = train_figures(FitsUpTo(4096), tokens, BenchConfig(Path("toy.yaml"), **TOY))
    assert (fits["batch"], fits["seq_len"], fits["out_of_memory_at"]) == (4, 1024, [])


def test_a_training_step_that_never_fits_says_which_shapes_were_tried():
    tokens = torch.zeros(2, 512 + 1, dtype=torch.long)
    config = BenchConfig(Path("toy.yaml"), **TOY)
    with pytest.raises(torch.OutOfMemoryError, match="2 x 512, 1 x 512, 1 x 256"):
        train_figures(FitsUpTo(100), tokens, config)
    with pytest.raises(torch.OutOfMemoryError, match="1024 tokens"):  # a same-shape peer must not shrink
        train_figures(FitsUpTo(512), tokens, config, shrink=False)


class RecordsOnThirdCall:
    """A stand-in for a package's CUDAGraphTrainStep: eager warm-up calls, then a recording that fails or succeeds."""

    warmup_steps = 2

    def __init__(self, model, optimizer, loss_fn, fail: bool):
        self.model, self.optimizer, self.loss_fn, self.fail, self.calls = model, optimizer, loss_fn, fail, 0

    def __call__(self, tokens):
        self.calls += 1
        if self.calls > self.warmup_steps and self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        loss = self.loss_fn(tokens)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


@pytest.mark.parametrize("fail", [False, True])
def test_the_kernels_variant_trains_through_the_graph_step_and_says_when_it_could_not_record(fail):
    tokens = torch.zeros(2, 16 + 1, dtype=torch.long)

    def step_class(model, optimizer, loss_fn):
        return RecordsOnThirdCall(model, optimizer, loss_fn, fail)

    figures = train_figures(FitsUpTo(4096), tokens, BenchConfig(Path("toy.yaml"), **TOY), graph_step=step_class)
    assert figures["tokens_per_s"] > 0 and figures["cuda_graph_step"] is not fail
    assert ("operation not permitted" in figures.get("cuda_graph_step_error", "")) is fail


def test_only_the_kernels_variant_on_cuda_takes_the_packages_graph_step():
    from archgen.benchmark import graph_train_step

    package = SimpleNamespace(CUDAGraphTrainStep=RecordsOnThirdCall)
    on = {device: SimpleNamespace(config=SimpleNamespace(device=device), package=package) for device in ("cuda", "cpu")}
    assert graph_train_step(on["cuda"], "kernels") is RecordsOnThirdCall
    assert graph_train_step(on["cuda"], "reference") is None and graph_train_step(on["cuda"], "kernels_compiled") is None
    assert graph_train_step(on["cpu"], "kernels") is None


def test_the_table_marks_a_recorded_training_step_and_says_why_one_was_not(tmp_path, monkeypatch):
    import archgen.benchmark as benchmark

    real = benchmark.run_bench

    def with_graph_figures(config, progress):
        result = real(config, progress)
        result.variants["kernels"]["train"]["cuda_graph_step"] = True
        result.variants["reference"]["train"].update(cuda_graph_step=False, cuda_graph_step_error="RuntimeError: sync")
        return result

    monkeypatch.setattr(benchmark, "run_bench", with_graph_figures)
    result = CliRunner().invoke(main, ["bench", str(ROOT / "specs/hspmn.yaml"), "--preset", "tiny", "--device", "cpu",
                                       "--dtype", "float32", "--batch", "1", "--seq-len", "8", "--decode-batch", "1",
                                       "--prompt-len", "4", "--new-tokens", "3", "--variant", "kernels", "--variant",
                                       "reference", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    kernels_row = next(line for line in result.stdout.splitlines() if "kernels" in line)
    assert kernels_row.count("(graph)") == 1, result.stdout  # the tokens/s cell, not the MFU's
    assert "reference train timed eagerly, its step not recorded as a CUDA graph: RuntimeError: sync" in result.stderr


def test_the_greedy_loop_figure_times_the_replays_alone_not_the_prefill(monkeypatch):
    """On CUDA a graph's decode figure is decoder.greedy(first, n - 1) timed alone, per token: a slow prefill (here 50
    ms, as a prompt's eager forward can jitter) adds nothing; the decoder is the one generate used (same length key)."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    asked = []

    class Decoder:
        def prefill(self, run_prompt):
            time.sleep(0.05)
            return run_prompt(None)

        def greedy(self, first, steps):
            assert first.shape == (1, 1)
            time.sleep(0.002 * steps)

    class Model:
        meta_tokens = torch.zeros(3, 8)

        def generate(self, prompt, **kwargs):
            asked.append(("generate", kwargs["max_new_tokens"], kwargs["cuda_graph"]))

        def graph_decoder(self, batch, max_len, device, compile=False):
            asked.append(("decoder", batch, max_len, compile))
            return Decoder()

        def forward(self, input_ids, cache=None, run_heads=True):
            assert not run_heads  # a decoding prefill computes no heads
            return SimpleNamespace(logits=torch.zeros(1, 4, 10))

        __call__ = forward

    ms = greedy_loop_ms_per_token(Model(), torch.zeros(1, 4, dtype=torch.long), new_tokens=11, rounds=2)
    assert 2.0 <= ms < 3.5  # 2 ms a step; the 50 ms prefill outside
    assert asked == [("generate", 11, True), ("decoder", 1, 3 + 4 + 11, False)]
    with pytest.raises(ValueError, match="at least 3"):
        greedy_loop_ms_per_token(Model(), torch.zeros(1, 4, dtype=torch.long), new_tokens=2)

