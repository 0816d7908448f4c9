"""`archgen train` on GPUs: single-GPU throughput and MFU with torch.compile, and 1 GPU against 2 (FSDP2) at the same
global batch, with a checkpoint written on 2 GPUs resumed on 1.

Everything runs through the command line a user runs (`python -m archgen train`, `torchrun … -m archgen train`), on
text that ships with Python: the standard library's own sources (about 12 MB without its tests, one document per
file, every 20th held out), bytes as tokens (the spec's vocabulary is set to 256). A few hundred steps of 16k tokens
read each byte less than once, so the held-out loss measures what the model learned (14% of the held-out files'
line-start 64-byte windows also occur in training files: licence headers, imports). The pydoc_data topics of the
README's CPU example are 0.47 MB and nest each other's sections: 88% of the 64-byte windows of a 5% held-out split
occur in the training topics, and Bamba-1B reached a held-out loss of 0.27 nats per byte on them in 120 steps (GPU
call 2 of session 7) by recalling, not predicting.
Sections, each a ratio against a peer or a floor measured in the same run:

  matmul         the bf16 dense matmul rate of GPU 0 (8192² × 8192 products): MFU's denominator
  compiled       --model (bench/specs/bamba_1b.yaml or specs/hymba_plus.yaml), `compile: true` (each layer compiled),
                 bf16 autocast, AdamW fused, global batch 8 × 2048 (16k tokens) on GPU 0 for --steps steps. From its
                 metrics.jsonl: the setup before step 1 (build, data, weights), the compilation (step 1's time less a
                 steady step's), tokens/s and MFU = the cost model's training FLOPs per token × tokens/s ÷ the
                 measured matmul rate (medians past the first 20% of steps), the loss curve, the held-out loss
                 against the unigram baseline, and the final checkpoint's save time
  one_gpu        the same model and batch eager on one GPU: the compiled run's peer, and the 2-GPU run's
  two_gpus       the same global batch as micro-batch 4 on each of 2 GPUs (torchrun, FSDP2, bf16 mixed precision):
                 every step's loss against one GPU's (bf16 tolerance), scaling efficiency = tokens/s₂ ÷ (2 · tokens/s₁);
                 it saves a torch.distributed.checkpoint at half its steps
  resume_2_to_1  that checkpoint resumed on ONE GPU without torchrun: its losses after the resume against the
                 straight 2-GPU run's
  resume_1_to_1  on one GPU, eager, 4 of the model's layers (what a resume restores does not depend on the depth, and
                 a quarter of the weights saves and loads in a quarter of the time): a run that saves a checkpoint at
                 half its steps, and that checkpoint resumed in a new process; the losses after the resume against
                 the straight run's (the issue's "same loss curve on GPU within bf16 noise")

    python bench/train_gpu.py --out $OUT --budget-s 170 --skip scaling,resume  # one GPU: the compiled run, ~150 s
    python bench/train_gpu.py --out $OUT --budget-s 110 --skip compiled,scaling  # one GPU: resume_1_to_1, ~80 s
    python bench/train_gpu.py --out $OUT                 # a machine with 2 GPUs (nvidia-h200-x2), about 400 s
    python bench/train_gpu.py --dry-run --out /tmp/bench # a CPU: tiny HSPMN, gloo, a few steps (checks the plumbing)

A run that reaches its share of --budget-s is killed and reported with the steps it logged; a run that fails or is
killed keeps the tail of its output in its section. Writes $OUT/train_gpu.json ({"meta", "sections"}) after every
section, $OUT/train_gpu.bars.json, and each run's log, metrics.jsonl and curves.png under $OUT/train_gpu/<run>/. The
runs themselves (package, tokenized data, checkpoints: 14 GB for Bamba-1B) go to --work, by default a temporary
directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from harness import ROOT, Run, median_ms


@dataclass(frozen=True)
class Setup:
    name: str
    spec: str
    preset: str | None
    overrides: tuple[str, ...]
    seq_len: int
    micro_batch: int  # one GPU's sequences per step; 2 GPUs take half each
    compiled_steps: int
    scaling_steps: int
    compile: bool
    device_args: tuple[str, ...]  # passed to `archgen train`
    resume_layers: tuple[str, ...]  # --set overrides that cut the model to a few layers for resume_1_to_1 (4 on GPUs)
    matmul_size: int
    corpus_bytes: int | None  # of the standard library's sources; None: all of them
    eval_batches: int  # micro-batches of held-out sequences per evaluation
    # Losses of 1 and 2 processes may differ by this much (relative): bf16 rounds each product to 8 bits of mantissa
    # (2⁻⁸ ≈ 0.4%), and the two runs reduce in a different order, which a few steps of training amplify.
    loss_tolerance: float = 0.02

    @property
    def how(self) -> str:
        """How the "compiled" run trains, for its figures' names (the dry run's is eager, in float32 on a CPU)."""
        return "compiled layers, bf16 autocast" if self.compile else "eager, float32"


def gpu_setup(name: str, spec: str, byte_vocabulary: tuple[str, ...], resume_layers: tuple[str, ...]) -> Setup:
    return Setup(name, str(ROOT / spec), None, byte_vocabulary, seq_len=2048, micro_batch=8, compiled_steps=300,
                 scaling_steps=20, compile=True, device_args=(), resume_layers=resume_layers, matmul_size=8192,
                 corpus_bytes=None, eval_batches=4)


MODELS = {"bamba_1b": gpu_setup("bamba_1b", "bench/specs/bamba_1b.yaml", ("model.vocab_size=256",),
                                ("layout.mixers=(ssm*3, attn)",)),
          # Hymba+'s forecaster reads each of its bins back as a token id: no more bins than the vocabulary has
          "hymba_plus": gpu_setup("hymba_plus", "specs/hymba_plus.yaml",
                                  ("model.vocab_size=256", "heads.forecaster.n_bins=256"),
                                  ("layout.n_layers=4", "layout.mixers=global_attn|ssm, (attn|ssm)*2, global_attn|ssm"))}
DRY = Setup("hspmn_tiny", str(ROOT / "specs/hspmn.yaml"), "tiny", (), seq_len=32, micro_batch=4, compiled_steps=4,
            scaling_steps=4, compile=False, device_args=("--device", "cpu"), resume_layers=("layout.n_layers=2",),
            matmul_size=256, corpus_bytes=1_000_000, eval_batches=1)
# MFU and 2-GPU scaling have no bar in issue 13; these are issue 12's training MFU bar and what FSDP2 over NVLink
# should keep of two GPUs at a 1B model.
MFU_BAR = 0.4
SCALING_BAR = 0.9


class RunFailed(RuntimeError):
    """A training command exited with an error or logged no step (its output's tail is in the section)."""


def write_data(work: Path, max_bytes: int | None) -> tuple[Path, dict]:
    """The standard library's .py files as JSONL, sorted by path, its tests and installed packages left out (up to
    max_bytes of them); what was written goes into the run's metadata."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    left_out = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    files = sorted(p for p in stdlib.rglob("*.py") if not left_out & set(p.relative_to(stdlib).parts))
    rows, size = [], 0
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        if max_bytes is not None and size + len(text) > max_bytes:
            break
        rows.append(json.dumps({"text": text}) + "\n")
        size += len(text)
    if not rows:
        raise RunFailed(f"no Python sources under {stdlib} to train on: this Python ships without them")
    path = work / "stdlib_sources.jsonl"
    path.write_text("".join(rows))
    return path, {"corpus": f"{stdlib}/**/*.py without tests", "documents": len(rows), "characters": size}


def write_recipe(work: Path, name: str, setup: Setup, data: Path, steps: int, micro: int, compile_: bool,
                 checkpoint_interval: int = 0) -> Path:
    body = {
        "schema_version": 1,
        "spec": {"path": setup.spec, "preset": setup.preset, "set": list(setup.overrides)},
        "data": {"train": [str(data)], "validation": {"fraction": 0.05}, "seq_len": setup.seq_len,
                 "cache_dir": str(work / "cache")},
        "tokenizer": {"kind": "bytes"},
        "optimizer": {"lr": 3.0e-4, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1},
        "batch": {"tokens": setup.micro_batch * setup.seq_len, "micro_batch": micro},
        "steps": steps,
        "compile": compile_,
        "eval": {"interval": max(1, steps // 3), "batches": setup.eval_batches},
        "checkpoint": {"interval": checkpoint_interval, "keep": 2},
        "log_interval": 1,
        "seed": 0,
        "output": str(work / name),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def train_command(recipe: Path, processes: int, setup: Setup, extra: tuple[str, ...] = ()) -> list[str]:
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"])
    return [*launcher, "-m", "archgen", "train", str(recipe), "--no-progress", *setup.device_args, *extra]


def launch(command: list[str], log: Path, timeout: float, record: dict, env: dict[str, str] | None = None) -> None:
    """Run a training command with its output in `log`; at `timeout` seconds kill it and every process it started
    (torchrun's workers). The record gets the wall time, the exit code (None: killed at the time limit) and, unless it
    exited cleanly, the output's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    record["command"] = " ".join(command)
    started = time.perf_counter()
    with log.open("w") as sink, subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                                 stdout=sink, stderr=subprocess.STDOUT, start_new_session=True) as process:
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    record.update({"wall_s": round(time.perf_counter() - started, 1), "exit_code": code, "time_limit_s": round(timeout, 1)})
    if code != 0:
        record["output_tail"] = log.read_text(errors="replace")[-6000:]
    if code not in (0, None):
        raise RunFailed(f"exited {code}: the last lines of its output are in output_tail")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def step_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_rows(run_dir) if "loss" in r]


def keep_artifacts(run_dir: Path, out: Path) -> None:
    """The small files of a run (metrics, curves) beside its log in $OUT; the package and checkpoints stay in --work."""
    for name in ("metrics.jsonl", "curves.png"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, out / name)


def summarize(run_dir: Path, tokens_per_step: int, matmul_flops: float) -> dict:
    """A run's figures from its metrics.jsonl (every step logged): steady-state medians past the first 20% of steps,
    what came before step 1 and what step 1 cost beyond a steady step (compilation, first-call kernel tuning)."""
    rows = read_rows(run_dir)
    steps = [r for r in rows if "loss" in r]
    if not steps:
        raise RunFailed("the run logged no step: see output_tail (and the log beside the JSON)")
    seconds = [tokens_per_step / r["tokens_per_s"] for r in steps]
    steady = slice(max(1, len(steps) // 5), None) if len(steps) > 1 else slice(None)
    step_s = statistics.median(seconds[steady])
    flops = statistics.median(r["flops_per_s"] for r in steps[steady])
    summary = {"steps_logged": len(steps), "steps_measured": len(seconds[steady]),
               "setup_s": steps[0]["elapsed_s"] - seconds[0], "first_step_s": seconds[0],
               "compile_s": seconds[0] - step_s if len(steps) > 1 else None,
               "first_steps_s": [round(s, 3) for s in seconds[:5]], "step_s": step_s,
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[steady]), "model_flops_per_s": flops,
               "mfu": flops / matmul_flops, "peak_memory_gib": max(r["memory_gib"] for r in steps),
               "first_loss": steps[0]["next_token_loss"], "last_loss": steps[-1]["next_token_loss"],
               "loss_curve": [[r["step"], round(r["next_token_loss"], 4)] for r in steps]}
    if "mfu" in steps[0]:  # the loop's own MFU: over the GPU's datasheet peak rather than the measured matmul rate
        summary["mfu_of_datasheet_peak"] = statistics.median(r["mfu"] for r in steps[steady])
    evaluations = [r for r in rows if "eval_loss" in r]
    if evaluations:
        summary.update({k: evaluations[-1][k] for k in ("eval_loss", "eval_perplexity", "unigram_loss")})
    saves = [r for r in rows if "checkpoint" in r]
    if saves:
        summary["checkpoint_save_s"] = saves[-1]["save_s"]
    return summary


def compare_losses(reference: list[dict], other: list[dict]) -> dict:
    """Step-by-step next-token losses of two runs over the steps both logged: the largest difference relative to the
    reference's loss at that step."""
    by_step = {r["step"]: r["next_token_loss"] for r in reference}
    pairs = [(by_step[r["step"]], r["next_token_loss"]) for r in other if r["step"] in by_step]
    if not pairs:
        raise RunFailed("the two runs have no step in common")
    relative = [abs(b - a) / abs(a) for a, b in pairs]
    return {"steps_compared": len(pairs), "max_relative_delta": max(relative),
            "max_abs_delta": max(abs(b - a) for a, b in pairs), "mean_relative_delta": sum(relative) / len(relative),
            "reference_final": pairs[-1][0], "final": pairs[-1][1]}


def loss_bar(bench: Run, figure: str, delta: float, tolerance: float) -> None:
    """A bar row for a loss difference: tolerance ÷ difference, above 1 within the tolerance. Runs that agree exactly
    have no finite ratio: the section's max_relative_delta of 0 says it."""
    if delta:
        bench.bar(figure, delta, "fraction", "bf16 tolerance", tolerance, tolerance / delta, 1.0)


class TrainBench(Run):
    def __init__(self, args: argparse.Namespace, setup: Setup, work: Path):
        super().__init__("train_gpu", args.out, dry_run=args.dry_run, budget_s=args.budget_s)
        self.setup = setup
        self.work = work
        self.logs = self.out / "train_gpu"
        self.data, corpus = write_data(work, setup.corpus_bytes)
        self.single = {} if args.dry_run else {"CUDA_VISIBLE_DEVICES": "0"}
        self.tokens_per_step = setup.micro_batch * setup.seq_len
        self.matmul_flops = 0.0
        self.meta.update({"model": setup.name, "spec": setup.spec, "preset": setup.preset, "set": list(setup.overrides),
                          "batch": [setup.micro_batch, setup.seq_len], "loss_tolerance": setup.loss_tolerance,
                          **corpus})

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def train(self, record: dict, name: str, steps: int, processes: int, micro: int, compile_: bool, timeout: float,
              checkpoint_interval: int = 0, extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
              log: str | None = None, setup: Setup | None = None) -> Path:
        """Write the recipe `name` (of this run's model, or of `setup`) and run it; its log, metrics and curves go to
        $OUT/train_gpu/<log or name>/ whatever happened."""
        setup = setup or self.setup
        recipe = write_recipe(self.work, name, setup, self.data, steps, micro, compile_, checkpoint_interval)
        run_dir = self.work / name
        kept = self.logs / (log or name)
        try:
            launch(train_command(recipe, processes, setup, extra), kept / "output.log", timeout, record, env)
        finally:
            keep_artifacts(run_dir, kept)
        return run_dir

    def matmul(self, record: dict) -> None:
        """Dense matmul FLOP/s (bfloat16 on a GPU, float32 on a CPU): the median of timed products."""
        import torch

        size = self.setup.matmul_size
        dtype = torch.float32 if self.dry_run else torch.bfloat16
        a = torch.randn(size, size, device=self.device, dtype=dtype)
        b = torch.randn(size, size, device=self.device, dtype=dtype)
        seconds = median_ms(lambda: a @ b, self.device, reps=20, warmup=5) / 1e3
        self.matmul_flops = 2 * size**3 / seconds
        record.update({"flops_per_s": self.matmul_flops, "dtype": str(dtype).removeprefix("torch."), "size": size})

    def compiled(self, record: dict, steps: int, share: float) -> None:
        record.update({"steps": steps, "torch_compile": self.setup.compile})
        # dynamo says when it compiles a layer again or breaks a graph: either would show as slow steps
        run_dir = self.train(record, "compiled", steps, 1, self.setup.micro_batch, self.setup.compile,
                             self.left() * share, env={**self.single, "TORCH_LOGS": "recompiles,graph_breaks"})
        record.update(summarize(run_dir, self.tokens_per_step, self.matmul_flops))
        self.bar(f"{self.setup.name} archgen train MFU, {self.setup.micro_batch} x {self.setup.seq_len} tokens, "
                 f"{self.setup.how}", record["model_flops_per_s"], "model FLOP/s",
                 "bf16 dense matmul rate measured in the run (8192^3)", self.matmul_flops, record["mfu"], MFU_BAR)

    def one_gpu(self, record: dict, share: float) -> None:
        run_dir = self.train(record, "one_gpu", self.setup.scaling_steps, 1, self.setup.micro_batch, False,
                             self.left() * share, env=self.single)
        record.update(summarize(run_dir, self.tokens_per_step, self.matmul_flops))
        compiled = self.sections.get("compiled", {})
        if "tokens_per_s" in compiled:
            self.bar(f"{self.setup.name} archgen train tokens/s, {self.setup.how} vs eager, 1 GPU",
                     compiled["tokens_per_s"], "tokens/s", "the same recipe eager, this run", record["tokens_per_s"],
                     compiled["tokens_per_s"] / record["tokens_per_s"], 1.0)

    def two_gpus(self, record: dict, share: float) -> None:
        steps = self.setup.scaling_steps
        run_dir = self.train(record, "two_gpus", steps, 2, self.setup.micro_batch // 2, False, self.left() * share,
                             checkpoint_interval=steps // 2)
        record.update(summarize(run_dir, self.tokens_per_step, self.matmul_flops))
        one = self.sections["one_gpu"]
        efficiency = record["tokens_per_s"] / (2 * one["tokens_per_s"])
        self.bar(f"{self.setup.name} archgen train tokens/s, 2 GPUs FSDP2 (scaling efficiency)", record["tokens_per_s"],
                 "tokens/s", "2 x one GPU's tokens/s at the same global batch, this run", 2 * one["tokens_per_s"],
                 efficiency, SCALING_BAR)
        losses = record["loss_vs_one_gpu"] = compare_losses(step_rows(self.work / "one_gpu"), step_rows(run_dir))
        loss_bar(self, f"{self.setup.name} next-token loss, 2 GPUs against 1: largest relative difference",
                 losses["max_relative_delta"], self.setup.loss_tolerance)

    def resume_2_to_1(self, record: dict) -> None:
        half = self.setup.scaling_steps // 2
        run_dir = self.work / "two_gpus"
        straight = step_rows(run_dir)
        checkpoint = run_dir / "checkpoints" / f"step-{half:08d}"
        trainer = json.loads((checkpoint / "trainer.json").read_text())
        record.update({"checkpoint": str(checkpoint), "saved_by": trainer["world_size"],
                       "distributed_checkpoint": (checkpoint / "distributed").is_dir()})
        self.train(record, "two_gpus", self.setup.scaling_steps, 1, self.setup.micro_batch // 2, False, self.left(),
                   extra=("--resume-from", str(checkpoint)), env=self.single, log="resume_2_to_1")
        after = [r for r in step_rows(run_dir) if r["step"] > half]
        losses = compare_losses(straight, after)
        record.update(losses)
        loss_bar(self, f"{self.setup.name} next-token loss resumed on 1 GPU from 2 GPUs' checkpoint: largest relative "
                 "difference", losses["max_relative_delta"], self.setup.loss_tolerance)

    def resume_1_to_1(self, record: dict) -> None:
        from archgen.pipeline import compile_spec

        setup = replace(self.setup, overrides=self.setup.overrides + self.setup.resume_layers)
        steps, half = setup.scaling_steps, setup.scaling_steps // 2
        layers = len(compile_spec(setup.spec, setup.preset, setup.overrides).resolved.layers)
        record.update({"set": list(setup.overrides), "layers": layers, "steps": steps, "resumed_at": half})
        run_dir = self.train(record.setdefault("straight", {}), "resume_1_to_1", steps, 1, setup.micro_batch, False,
                             self.left() * 0.6, checkpoint_interval=half, env=self.single, setup=setup, log="straight")
        straight = step_rows(run_dir)
        checkpoint = run_dir / "checkpoints" / f"step-{half:08d}"
        self.train(record.setdefault("resumed", {}), "resume_1_to_1", steps, 1, setup.micro_batch, False, self.left(),
                   extra=("--resume-from", str(checkpoint)), env=self.single, setup=setup, log="resumed")
        losses = compare_losses(straight, [r for r in step_rows(run_dir) if r["step"] > half])
        record.update(losses)
        loss_bar(self, f"{self.setup.name} ({layers} layers) next-token loss resumed on 1 GPU from its own checkpoint: "
                 "largest relative difference", losses["max_relative_delta"], self.setup.loss_tolerance)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny HSPMN, gloo: checks the plumbing")
    parser.add_argument("--budget-s", type=float, default=400.0, help="wall-clock seconds for everything")
    parser.add_argument("--model", choices=sorted(MODELS), default="bamba_1b", help="the GPU runs' model")
    parser.add_argument("--steps", type=int, default=None, help="steps of the compiled run (default 300)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: compiled, scaling, resume")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the runs write packages, data and checkpoints (default: a temporary directory, "
                             "removed at the end)")
    args = parser.parse_args()
    setup = DRY if args.dry_run else MODELS[args.model]
    skip = set(filter(None, args.skip.split(",")))
    work = args.work or Path(tempfile.mkdtemp(prefix="train_gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench = TrainBench(args, setup, work)
        bench.section("matmul", bench.matmul)
        scaling, resume = "scaling" not in skip, "resume" not in skip
        two_gpu_parts = scaling and (args.dry_run or visible_gpus() >= 2)
        if "compiled" not in skip:
            steps = args.steps or setup.compiled_steps
            # alone it may use all the time left (less a margin to write the JSON); before other parts, half
            bench.section("compiled", lambda record: bench.compiled(record, steps, 0.5 if scaling or resume else 0.97))
        if scaling:
            share = 1 / 3 if two_gpu_parts else 1 / 2 if resume else 0.97
            bench.section("one_gpu", lambda record: bench.one_gpu(record, share))
            if two_gpu_parts:
                bench.section("two_gpus", lambda record: bench.two_gpus(record, 1 / 2))
                bench.section("resume_2_to_1", bench.resume_2_to_1)
            else:
                bench.sections["two_gpus"] = {"skipped": f"{visible_gpus()} GPU visible: the 2-GPU parts need 2"}
                bench.write()
        if resume:
            bench.section("resume_1_to_1", bench.resume_1_to_1)
        print(bench.summary())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
