"""Do the generated packages work on a GPU? Every spec in specs/ at its `tiny` preset, on one device.

For each spec (built into a temporary directory and imported on its own, like tests/conftest.py does):
  float32   train     forward with targets, backward, 20 AdamW steps on one batch: the loss must fall
            decode    prefill (1 and 7 tokens) then one-token steps through the model's cache, against one full
                      forward: max |difference| / max |logit| below 1e-3
            generate  greedy `generate` twice (identical), and top_k=1 sampling equals greedy
            heads     what the spec declares: Medusa (`generate_medusa` returns the greedy tokens), JEPA (training
                      losses, masked losses, `update_target`), the forecaster (`forecast` through the cache equals
                      forecasting by full forwards; sampled paths), the Titans memory (decoding with writes equals
                      one prefill with writes), the symbolic module (truth values, gradients to the extractor).
                      Specs without Medusa heads are also built once with `heads.medusa={kind: medusa, n_heads: 3}`.
  bfloat16  model.to(torch.bfloat16): forward+backward finite, decode parity (tolerance BF16_DECODE_TOL, the number
            is recorded), and the bf16 full forward against the float32 one of the same weights (context only)
  compile   torch.compile(model) forward in float32 (eval, no grad): runs, matches eager within 1e-4; compile time,
            graph and graph-break counts. A failure here is recorded, not raised. Skipped on CPU unless --compile.

Every check records passed, its numbers, and any exception (type, message, last frames) into one JSON file, which
is rewritten after each check, so a run that is killed still leaves what it measured. One failing check never
stops the others.

    python bench/gpu_check.py --device cuda --out gpu_check.json
    python bench/gpu_check.py --device cpu --out /tmp/g.json          # shakes out the script itself
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import platform
import tempfile
import time
import traceback
import uuid
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import ROOT, command_line, run_metadata

from archgen.testing import build_generated, relative_error

DECODE_TOL = 1e-3  # float32, relative to max |logit|
BF16_DECODE_TOL = 3e-2  # bfloat16 (8 significant bits: one rounding is 2**-8 = 3.9e-3), relative to max |logit|
COMPILE_TOL = 1e-4
MEDUSA_OVERRIDE = "heads.medusa={kind: medusa, n_heads: 3}"
TITANS_WRITING = ("memory.chunk_size=8", "memory.learning_rate=1.0")  # as tests/generated/test_titans.py


# ------------------------------------------------------------------------------------------------------ plumbing
def build(spec_path: Path, out_root: Path, preset: str = "tiny", overrides: tuple[str, ...] = ()):
    """Compile and emit spec_path into a fresh directory and import it under a unique name: (package, compiled)."""
    return build_generated(spec_path, out_root / uuid.uuid4().hex, preset, overrides,
                           source=spec_path.relative_to(ROOT).as_posix())


def describe(error: BaseException) -> dict:
    frames = traceback.extract_tb(error.__traceback__)
    return {
        "type": f"{type(error).__module__}.{type(error).__qualname__}",
        "message": str(error)[:3000],
        "last_frames": [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {(f.line or '').strip()}"[:300]
                        for f in frames[-8:]],
        "frames_files": [f"{f.filename}:{f.lineno}" for f in frames[-8:]],
    }


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all().item())


class Runner:
    def __init__(self, out: Path, device: torch.device, header: dict):
        self.out, self.device = out, device
        self.results = dict(header, specs={})
        self.save()

    def save(self) -> None:
        self.results["last_written_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        tmp.replace(self.out)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def check(self, spec: str, name: str, fn) -> dict:
        """Run fn(record) -> bool; record what it measured, passed, seconds and any exception, then save."""
        record: dict = {}
        started = time.perf_counter()
        try:
            record["passed"] = bool(fn(record))
            self.sync()
        except Exception as error:  # noqa: BLE001 — every failure is information
            record["passed"] = False
            record["error"] = describe(error)
        record["seconds"] = round(time.perf_counter() - started, 3)
        self.results["specs"].setdefault(spec, {})[name] = record
        self.save()
        status = "PASS" if record["passed"] else "FAIL"
        detail = record.get("error", {}).get("message", "")[:200].replace("\n", " ")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        print(f"[{status}] {spec:18s} {name:26s} {json.dumps(numbers, default=str)[:300]} {detail}", flush=True)
        return record


# ------------------------------------------------------------------------------------------------------ checks
def make_model(package, device, seed: int, dtype=None):
    torch.manual_seed(seed)
    model = package.Model().to(device)
    return model.to(dtype) if dtype is not None else model


def check_train(package, device, record) -> bool:
    """20 AdamW steps on one batch; the next-token loss must halve and the total (with aux losses) must fall."""
    model = make_model(package, device, 0)
    tokens = torch.randint(0, 256, (2, 33), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, lm_losses = [], []
    for _ in range(20):
        out = model(inputs, targets=targets)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if hasattr(model, "update_target"):
            model.update_target()
        losses.append(out.loss.item())
        lm_losses.append(F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten()).item())
    record.update(loss_first=losses[0], loss_last=losses[-1], lm_loss_first=lm_losses[0], lm_loss_last=lm_losses[-1],
                  aux_losses=sorted(out.aux_losses), grads_finite=all(finite(p.grad) for p in model.parameters()
                                                                       if p.grad is not None))
    return (all(math.isfinite(x) for x in losses) and record["grads_finite"]
            and lm_losses[-1] < 0.5 * lm_losses[0] and losses[-1] < losses[0])


def decode_error(model, tokens, prefill: int, **kwargs) -> tuple[float, torch.Tensor]:
    """max |incremental − full| / max |full| for a prefill of `prefill` tokens then one-token steps."""
    with torch.no_grad():
        full = model(tokens, **kwargs).logits
        cache = model.empty_cache(tokens.size(0), 64)
        steps = [model(tokens[:, :prefill], cache=cache, **kwargs).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache, **kwargs).logits for t in range(prefill, tokens.size(1))]
    return relative_error(torch.cat(steps, dim=1), full), full


def check_decode(package, device, record, dtype=None, tol=DECODE_TOL) -> bool:
    """As tests/generated/test_build_specs.py: 40 tokens cross the tiny presets' 16-token windows."""
    model = make_model(package, device, 1, dtype).eval()
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 40), device=device)
    errors = {}
    for prefill in (1, 7):
        errors[prefill], full = decode_error(model, tokens, prefill)
        record[f"rel_error_prefill{prefill}"] = errors[prefill]
    record["tolerance"] = tol
    record["logits_finite"] = finite(full)
    if dtype is not None:  # the same weights in float32, for context: how far bf16 itself is from float32
        reference = make_model(package, device, 1).eval()
        with torch.no_grad():
            record["bf16_full_vs_float32_full_rel_error"] = relative_error(full, reference(tokens).logits)
    return record["logits_finite"] and max(errors.values()) < tol


def check_generate(package, device, record) -> bool:
    model = make_model(package, device, 2).eval()
    prompt = torch.randint(0, 256, (2, 5), device=device)
    first = model.generate(prompt, max_new_tokens=6, temperature=0)
    again = model.generate(prompt, max_new_tokens=6, temperature=0)
    sampled = model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=1.0, top_k=1)
    record.update(shape=list(first.shape), deterministic=bool(torch.equal(first, again)),
                  top_k1_equals_greedy=bool(torch.equal(sampled, first)), device=str(first.device),
                  prompt_kept=bool(torch.equal(first[:, :5], prompt)))
    return (tuple(first.shape) == (2, 11) and record["deterministic"] and record["top_k1_equals_greedy"]
            and record["prompt_kept"] and first.device.type == device.type)


def check_medusa(package, device, record) -> bool:
    """generate_medusa returns exactly greedy generate's tokens, with the heads as initialised and scrambled."""
    ok = True
    for heads in ("as_initialised", "scrambled"):
        model = make_model(package, device, 0).eval()
        if heads == "scrambled":
            with torch.no_grad():
                for param in model.heads["medusa"].parameters():
                    param.copy_(torch.randn_like(param) * 5)
        for prompt_len in (1, 7, 20):
            prompt = torch.randint(0, 256, (1, prompt_len), device=device)
            greedy = model.generate(prompt, max_new_tokens=20, temperature=0)
            tokens, stats = model.generate_medusa(prompt, max_new_tokens=20)
            same = bool(torch.equal(tokens, greedy))
            key = f"{heads}_prompt{prompt_len}"
            record[key] = {"equals_greedy": same, "mean_accepted_length": float(stats.mean_accepted_length),
                           "reruns": int(stats.reruns)}
            if not same:
                record[key]["first_difference"] = int((tokens != greedy).nonzero()[0, 1].item())
            ok = ok and same
    return ok


def check_jepa(package, device, record) -> bool:
    model = make_model(package, device, 0)
    tokens = torch.randint(0, 256, (2, 16), device=device)
    out = model(tokens, targets=tokens)
    jepa = {k: v.item() for k, v in out.aux_losses.items() if k.startswith("jepa")}
    out.loss.backward()
    record["train_jepa_losses"] = jepa
    record["mask_token_grad"] = model.heads["jepa"].mask_token.weight.grad is not None
    model.update_target()
    target = list(model.heads["jepa"].target.buffers())
    record["target_on_device"] = all(t.device.type == device.type for t in target)
    head = model.heads["jepa"]
    for where in ("cpu", device.type):
        generator = torch.Generator(device=where).manual_seed(7)
        got = head.masked_losses(model, tokens, generator=generator)
        record[f"masked_losses_{where}_generator"] = {k: v.item() for k, v in got.items()}
    model.eval()
    evaluation = model(tokens, targets=tokens)
    record["eval_latents_shape"] = list(evaluation.heads["jepa"].shape)
    record["eval_has_no_jepa_loss"] = not any(k.startswith("jepa") for k in evaluation.aux_losses)
    values = list(jepa.values()) + [v for k in record if k.startswith("masked_losses") for v in record[k].values()]
    return (bool(jepa) and all(math.isfinite(v) for v in values) and record["mask_token_grad"]
            and record["target_on_device"] and record["eval_has_no_jepa_loss"])


def check_forecaster(package, compiled, device, record) -> bool:
    """As tests/generated/test_forecaster.py: forecasting through the cache equals forecasting by full forwards."""
    spec = compiled.ir.spec.heads["forecaster"]
    n_bins, (low, high) = spec.n_bins, spec.value_range
    ops = importlib.import_module(f"{package.__name__}.ops.forecast")
    model = make_model(package, device, 0).eval()
    offset = model.lm_head.weight.size(0) - n_bins
    series = torch.randn(2, 11, generator=torch.Generator().manual_seed(2)).cumsum(1).to(device) + 5.0
    values = model.forecast(series, horizon=6)
    tokens, scale = model.tokenize_series(series)
    with torch.no_grad():
        for _ in range(6):
            bin_logits = model.heads["forecaster"](model.hidden_states(tokens), model.lm_head)
            tokens = torch.cat([tokens, bin_logits[:, -1].argmax(-1, keepdim=True) + offset], dim=1)
    expected = ops.detokenize(tokens[:, 11:] - offset, scale, n_bins, low, high)
    record["shape"] = list(values.shape)
    record["equals_full_forward_forecast"] = bool(torch.equal(values, expected))
    record["max_abs_difference"] = (values - expected).abs().max().item()
    generator = torch.Generator(device=device).manual_seed(0)
    paths = model.forecast(series, horizon=4, num_samples=5, generator=generator)
    again = model.forecast(series, horizon=4, num_samples=5, generator=torch.Generator(device=device).manual_seed(0))
    record["sampled_shape"] = list(paths.shape)
    record["sampled_reproducible"] = bool(torch.equal(paths, again))
    # loss on series rows
    text = torch.randint(0, offset, (1, 17), device=device)
    series_tokens = torch.randint(offset, offset + n_bins, (1, 17), device=device)
    both = torch.cat([text, series_tokens])
    model.train()
    out = model(both[:, :-1], targets=both[:, 1:])
    out.loss.backward()
    record["train_forecaster_loss"] = out.aux_losses["forecaster"].item()
    return (record["equals_full_forward_forecast"] and record["sampled_reproducible"]
            and list(paths.shape) == [2, 5, 4] and math.isfinite(record["train_forecaster_loss"]))


def check_titans(package, device, record) -> bool:
    """Built with chunks of 8 and lr 1 (tests/generated/test_titans.py): decoding with writes equals a prefill with writes."""
    torch.manual_seed(1)
    model = package.Model().to(device).eval()
    with torch.no_grad():
        model.memory.v_proj.weight.normal_(0.0, 1.0)
        model.memory.gate.bias.fill_(3.0)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        without_writes = model(tokens).logits
    for prefill in (1, 13):
        error, full = decode_error(model, tokens, prefill, update_memory=True)
        record[f"rel_error_prefill{prefill}_with_writes"] = error
    record["writes_change_logits_rel"] = relative_error(without_writes, full)
    record["tolerance"] = DECODE_TOL
    model.train()
    model.zero_grad(set_to_none=True)
    model(tokens[:, :-1], targets=tokens[:, 1:], update_memory=True).loss.backward()
    grad = model.memory.k_proj.weight.grad
    record["k_proj_grad_abs_sum"] = None if grad is None else grad.abs().sum().item()
    generated = model.eval().generate(tokens[:, :5], max_new_tokens=8, temperature=0)
    record["generate_with_writes_shape"] = list(generated.shape)
    return (record["rel_error_prefill1_with_writes"] < DECODE_TOL and record["rel_error_prefill13_with_writes"] < DECODE_TOL
            and record["writes_change_logits_rel"] > 1e-2 and bool(record["k_proj_grad_abs_sum"]))


def check_symbolic(package, device, record) -> bool:
    model = make_model(package, device, 0)
    tokens = torch.randint(0, 256, (2, 9), device=device)
    truth = model(tokens).heads["symbolic"]
    record["shape"] = list(truth.shape)
    record["in_unit_interval"] = bool(((truth >= 0) & (truth <= 1)).all().item())
    truth[..., 2].sum().backward()
    grad = model.symbolic.extract.weight.grad
    record["extract_grad_abs_sum"] = None if grad is None else grad.abs().sum().item()
    return record["in_unit_interval"] and bool(record["extract_grad_abs_sum"])


def check_bf16_train(package, device, record) -> bool:
    model = make_model(package, device, 0, torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 33), device=device)
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    out.loss.backward()
    record["loss"] = out.loss.item()
    record["logits_dtype"] = str(out.logits.dtype)
    record["aux_losses"] = {k: v.item() for k, v in out.aux_losses.items()}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    record["n_grads"] = len(grads)
    record["grads_finite"] = all(finite(g) for g in grads)
    record["logits_finite"] = finite(out.logits)
    return math.isfinite(record["loss"]) and record["grads_finite"] and record["logits_finite"] and bool(grads)


def check_compile(package, device, record) -> bool:
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = make_model(package, device, 1).eval()
    tokens = torch.randint(0, 256, (2, 40), device=device)
    compiled = torch.compile(model)
    with torch.no_grad():
        eager = model(tokens).logits
        started = time.perf_counter()
        out = compiled(tokens).logits
        if device.type == "cuda":
            torch.cuda.synchronize()
        record["first_call_s"] = time.perf_counter() - started
        started = time.perf_counter()
        out2 = compiled(tokens).logits
        if device.type == "cuda":
            torch.cuda.synchronize()
        record["second_call_s"] = time.perf_counter() - started
    record["rel_error_vs_eager"] = relative_error(out, eager)
    record["second_call_rel_error_vs_eager"] = relative_error(out2, eager)
    record["unique_graphs"] = counters["stats"].get("unique_graphs")
    record["graph_breaks"] = sum(counters["graph_break"].values())
    record["graph_break_reasons"] = [str(k)[:300] for k in list(counters["graph_break"])[:8]]
    record["tolerance"] = COMPILE_TOL
    return record["rel_error_vs_eager"] < COMPILE_TOL and record["second_call_rel_error_vs_eager"] < COMPILE_TOL


# ------------------------------------------------------------------------------------------------------ main
def header(args, device) -> dict:
    return {
        **run_metadata(command_line(), dry_run=device.type != "cuda"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "tolerances": {"float32_decode": DECODE_TOL, "bfloat16_decode": BF16_DECODE_TOL, "compile_vs_eager": COMPILE_TOL},
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--specs", nargs="*", help="spec stems to run (default: every specs/*.yaml)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="run the torch.compile checks (default: on for CUDA, off for CPU)")
    parser.add_argument("--compile-deadline", type=float, default=240.0,
                        help="start no compile check after this many seconds since the script started")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    do_compile = args.compile if args.compile is not None else device.type == "cuda"
    runner = Runner(args.out, device, header(args, device))
    specs = sorted((ROOT / "specs").glob("*.yaml"))
    if args.specs:
        specs = [s for s in specs if s.stem in args.specs]

    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(tmp)
        packages = {}
        for spec_path in specs:
            name = spec_path.stem
            built = {}

            def do_build(record, spec_path=spec_path, built=built):
                started_build = time.perf_counter()
                built["package"], built["compiled"] = build(spec_path, out_root)
                record["build_s"] = time.perf_counter() - started_build
                return True

            if not runner.check(name, "build", do_build)["passed"]:
                continue
            package, compiled = built["package"], built["compiled"]
            packages[name] = package
            runner.check(name, "f32_train", partial(check_train, package, device))
            runner.check(name, "f32_decode", partial(check_decode, package, device))
            runner.check(name, "f32_generate", partial(check_generate, package, device))
            heads = set(compiled.ir.spec.heads or {})  # which extras the spec declares, read from the spec
            if "medusa" in heads:
                runner.check(name, "f32_medusa", partial(check_medusa, package, device))
            else:
                def medusa_override(record, spec_path=spec_path):
                    extra, _ = build(spec_path, out_root, overrides=(MEDUSA_OVERRIDE,))
                    record["overrides"] = [MEDUSA_OVERRIDE]
                    return check_medusa(extra, device, record)

                runner.check(name, "f32_medusa_override", medusa_override)
            if "jepa" in heads:
                runner.check(name, "f32_jepa", partial(check_jepa, package, device))
            if "forecaster" in heads:
                runner.check(name, "f32_forecaster", partial(check_forecaster, package, compiled, device))
            if getattr(compiled.ir.spec, "memory", None) is not None:
                def titans(record, spec_path=spec_path):
                    writing, _ = build(spec_path, out_root, overrides=TITANS_WRITING)
                    record["overrides"] = list(TITANS_WRITING)
                    return check_titans(writing, device, record)

                runner.check(name, "f32_titans_memory", titans)
            if getattr(compiled.ir.spec, "symbolic", None) is not None:
                runner.check(name, "f32_symbolic", partial(check_symbolic, package, device))
            runner.check(name, "bf16_train_step", partial(check_bf16_train, package, device))
            runner.check(name, "bf16_decode", partial(check_decode, package, device, dtype=torch.bfloat16, tol=BF16_DECODE_TOL))

        if do_compile:
            for name, package in packages.items():
                if time.perf_counter() - started > args.compile_deadline:
                    runner.results["specs"][name]["compile_forward"] = {
                        "passed": False, "skipped": f"compile deadline of {args.compile_deadline:.0f} s reached"}
                    runner.save()
                    continue
                runner.check(name, "compile_forward", partial(check_compile, package, device))
        runner.results["compile_checks_run"] = do_compile

    summary = {name: {check: record.get("passed") for check, record in checks.items()}
               for name, checks in runner.results["specs"].items()}
    runner.results["summary"] = summary
    runner.results["total_s"] = time.perf_counter() - started
    runner.save()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
