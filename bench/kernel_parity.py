"""Do the generated models compute the same thing with their Triton kernels as with their reference ops (issue 10)?

For each spec: bench/specs/bamba_1b.yaml first (its Mamba-2 layers run the SSD, conv1d and decode-step kernels),
then the seeds specs/nexus, hymba_plus and hns_ss_jepa_moe (Mamba-1: scan, conv1d and step kernels; HNS also its
MoE's SwiGLU kernel) and specs/hspmn (no SSM: its sparse attention's packed-query kernel), at the spec's real widths
with fewer layers (the overrides below), in bfloat16 on the GPU:

  parity   one model, the same weights and tokens, forward + backward of the next-token loss twice: with the kernels
           (model.USE_KERNELS = True, what a user gets on CUDA) and with the reference ops (False). Reported: the
           relative norm error ||kernels - references|| / ||references|| of the logits and of every parameter's
           gradient (worst, median, and every one above the tolerance), the losses, and how often each kernel ran
           (a spy: a model that fell back to its references silently would show zero calls).
  decode   with the kernels and with the references: prefill a prompt into a cache, then greedy decoding one token at
           a time; the step logits against one full forward over prompt + generated tokens (relative norm error),
           whether the greedy tokens are the full forward's argmax at every step, and (bf16) the step logits against
           a float32 full forward of the references over the same tokens.

Tolerance: 1e-2 relative norm in bfloat16 (issue 10), 1e-4 in float32 (the dry run). In bfloat16 a whole model's
logits move by about 1e-2 under any change of rounding, the references' own included, so parity there also runs the
references in float32 (the same weights, exactly) and passes when the kernels are as close to that float32 truth as
the bf16 references are (each of logits and gradients within 1.25x + 1e-3 of the references' error, or within the
tolerance); decode likewise passes when the kernels' step logits are within 1.25x + 1e-3 of the references' distance
to the float32 forward. Cached-vs-full in bf16 does not decide: a step runs other kernels than a forward over the
sequence (the GEMV rounds its products once; its fused SwiGLU gate rounds once where cuBLAS and silu_mul round gate
and up first), so it grows when the steps get more precise: Nexus measured 0.0149 with the kernels against 0.0026
with the references on the H200, and on a CPU in bf16 with the GEMV's float32 reference in the steps cached-vs-full
went from 0.0060 to 0.0146 while the steps' distance to float32 went from 0.0138 to 0.0122 (Bamba: 0.0037 -> 0.0105,
and 0.0144 -> 0.0140).
`pass` is per check and overall.
MoE specs can route a token differently when bf16 rounding moves a router score across a tie, which shows as one
expert's gradient off while the rest agree; the JSON lists every gradient over tolerance by name to tell that apart.
HSPMN's router makes a hard choice per token (the tokens that get queries: score + logistic noise > 0), and one token
chosen differently moves every gradient of that layer's attention by a few percent (session 7, GPU call 1: layer 1's
q/k/v/o_proj all 0.037 from float32 with the kernels, 0.009-0.016 with the references, layer 0's at the median), so
parity pins the choices: the kernels' pass records them, the references' and the float32 pass make the same ones
(with their own straight-through gradients), and `selection_flips` counts per layer the tokens each would have
chosen otherwise.

    python bench/kernel_parity.py --out OUT_DIR --budget-s 90          # on the GPU; writes OUT_DIR/kernel_parity.json
    python bench/kernel_parity.py --out /tmp/parity --dry-run          # on a CPU: tiny dims, Triton's interpreter
    python bench/kernel_parity.py --out OUT_DIR --only bamba --seeds 1,2  # other weights and tokens

--budget-s bounds the wall time: a spec is started only while the budget lasts; the ones left are listed as skipped.
A spec's time is mostly Triton compiling its kernels (the packages run untuned default configs: nothing is timed),
one CPU core at a time, so --jobs 2 runs the specs in two processes at once and merges their sections:

    python bench/kernel_parity.py --out OUT_DIR --jobs 2 --budget-s 200   # on the GPU: all five specs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from harness import ROOT, Run

# every kernel function a package may import; "module.function" for one a model calls through its kernel file (the
# decoding steps' in-place state updates)
KERNEL_FUNCTIONS = ("causal_conv1d", "selective_scan", "state_update_module.mamba_step_",
                    "state_update_module.mamba_step_low_rank_", "ssd_scan", "state_update_module.mamba2_step_",
                    "apply_rope_qk", "apply_rope_write_kv", "decode_attention", "packed_query_attention",
                    "sliding_window_attention", "swiglu", "silu_mul", "moe_router", "rms_norm", "normalized_mean",
                    "linear", "swiglu_linear", "qkv_linear")

# (spec, overrides at real widths on the GPU, preset and overrides for the CPU dry run, the GPU parity check's sizes
# where they differ from GPU's)
BAMBA_TINY = ("model.d_model=32", "model.vocab_size=256", "model.max_seq_len=128",
              "mixers.ssm.n_heads=4", "mixers.ssm.head_dim=16", "mixers.ssm.d_state=16", "mixers.ssm.chunk_size=16",
              "mixers.attn.n_heads=2", "mixers.attn.n_kv_heads=1", "mixers.attn.head_dim=16",
              "mixers.attn.rope.rotary_dim=8", "ffns.mlp.hidden=64")
SPECS = [
    ("bench/specs/bamba_1b.yaml", ("layout.mixers=(ssm*3, attn)",), (None, BAMBA_TINY + ("layout.mixers=(ssm, attn)",)),
     {}),
    ("specs/nexus.yaml", ("layout.n_layers=8",),
     ("tiny", ("model.d_model=32", "layout.n_layers=2", "layout.mixers=ssm, attn")), {}),
    ("specs/hymba_plus.yaml", ("layout.n_layers=2", "layout.mixers=global_attn|ssm, attn|ssm"),
     ("tiny", ("model.d_model=32", "layout.n_layers=1", "layout.mixers=global_attn|ssm")), {}),
    # HNS: 14.4 B at 16 experts, and still out of memory at 4 experts (4.7 B: the float32 truth run and the 128k-vocabulary
    # Medusa logits): 2 experts and a 32k vocabulary keep every kernel's real widths at 2.3 B. Its parity check runs one
    # sequence: at 2 x 600 the float32 pass alone held ~100 GB of activations (the reference Mamba-1 scan keeps ~24
    # float32 (B, c, L, 8192, 16) tensors a layer for its backward, 671 MB each at B = 2, and JEPA runs the backbone
    # twice with gradients: 6 scans) beside 55 GB of weights, the EMA target's buffers and three sets of gradients,
    # and ran out of the H200's memory (gpu9/call1). At 1 x 600 the same layers, kernels and chunking run on half the
    # activations.
    ("specs/hns_ss_jepa_moe.yaml", ("layout.n_layers=4", "ffns.moe.n_experts=2", "model.vocab_size=32000"),
     ("tiny", ("model.d_model=32", "layout.n_layers=2", "layout.mixers=ssm, attn")), {"batch": 1}),
    ("specs/hspmn.yaml", ("layout.n_layers=2",), ("tiny", ("model.d_model=32", "layout.n_layers=1")), {}),
]
GPU = {"device": "cuda", "dtype": "bfloat16", "batch": 2, "length": 600, "prompt": 64, "new_tokens": 16,
       "tolerance": 1e-2}  # 600 = 2 chunks of 256 and a partial one for Bamba's SSD
DRY = {"device": "cpu", "dtype": "float32", "batch": 1, "length": 12, "prompt": 5, "new_tokens": 3,
       "tolerance": 1e-4}


CACHE_MARGIN = 512  # cache positions beyond the tokens: a model's meta tokens take some (Hymba's 128)


def relative_norm_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64; 0 when both are zero, inf when the shapes differ."""
    if actual.shape != expected.shape:
        return float("inf")
    actual, expected = actual.detach().double(), expected.detach().double()
    difference, scale = (actual - expected).norm().item(), expected.norm().item()
    return difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))


def spy_on_kernels(package) -> Counter:
    """Wrap every kernel function the package imported so that each call is counted."""
    calls: Counter = Counter()
    for name in KERNEL_FUNCTIONS:
        owner_name, _, function_name = name.rpartition(".")
        owner = getattr(package, "kernels", None)
        owner = getattr(owner, owner_name, None) if owner_name else owner
        function = getattr(owner, function_name, None)
        if function is None:
            continue

        def counted(*args, _function=function, _name=function_name, **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        setattr(owner, function_name, counted)
    return calls


def _forward_backward(package, model, tokens, use_kernels: bool, calls: Counter) -> dict:
    """One pass: the logits, the loss, the kernel calls, every parameter's gradient as the backward left it (in the
    model's dtype: relative_norm_error widens it, and a float32 copy of each bf16 set would double what the later
    passes run beside), and the pass's seconds and, on the GPU, its peak memory."""
    import torch

    package.model.USE_KERNELS = use_kernels
    calls.clear()
    model.zero_grad(set_to_none=True)
    cuda = tokens.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    torch.manual_seed(1)  # the same random draws every pass (a JEPA head masks at random in training)
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    out.loss.backward()
    # zero_grad(set_to_none) below drops the model's references: these are the only ones, no copy is needed
    result = {"logits": out.logits.detach().float(), "loss": out.loss.item(), "calls": dict(calls),
              "grads": {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None},
              "pass": {"seconds": round(time.perf_counter() - started, 2)}}
    if cuda:
        result["pass"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    model.zero_grad(set_to_none=True)
    package.model.USE_KERNELS = True
    return result


class PinnedSelection:
    """While active, a generated model's token selection (ops/routing.py's select_tokens, which HSPMN's sparse
    attention calls once per layer and forward) is recorded in the first pass and pinned in the later ones: each makes
    the recorded choices, with the gate's value the recorded 0/1 and its gradient the pass's own (straight-through),
    and counts per call the tokens it would have chosen otherwise. A package without select_tokens is left as is."""

    def __init__(self, package):
        self.module = package.model
        self.select_tokens = getattr(self.module, "select_tokens", None)
        self.active = self.select_tokens is not None
        self.recorded: list = []
        self.pinning = False
        self.differing: list[int] = []

    def __enter__(self):
        if self.active:
            self.module.select_tokens = self._select
        return self

    def __exit__(self, *_exc_info):
        if self.active:
            self.module.select_tokens = self.select_tokens

    def make_recorded_choices(self) -> None:
        self.pinning = True

    def flips(self) -> list[int]:
        """The tokens the pass since the last call would have chosen otherwise, per select_tokens call (layer)."""
        flips, self.differing = self.differing, []
        return flips

    def _select(self, router_logits, **kwargs):
        gate, selected = self.select_tokens(router_logits, **kwargs)
        if not self.pinning:
            self.recorded.append(selected)
            return gate, selected
        pinned = self.recorded[len(self.differing)]
        self.differing.append(int((pinned != selected).sum()))
        return gate + (pinned.to(gate.dtype) - selected.to(gate.dtype)), pinned


def _errors(side: dict, truth: dict) -> dict:
    errors = {"logits": relative_norm_error(side["logits"], truth["logits"])}
    errors.update({name: relative_norm_error(grad, truth["grads"][name]) if name in truth["grads"] else float("inf")
                   for name, grad in side["grads"].items()})
    return errors


def parity(package, model, sizes, calls: Counter) -> dict:
    """Kernels against references in the model's dtype, and (in bf16) both against a float32 run of the references:
    whole-model bf16 logits differ by about 1e-2 from any rounding change, so the verdict is whether the kernels are
    as close to float32 as the references are. Every pass makes the kernels' pass's token selections
    (PinnedSelection)."""
    import torch

    vocab = model.lm_head.weight.shape[0] if hasattr(model, "lm_head") else model.embed.weight.shape[0]
    tokens = torch.randint(0, vocab, (sizes["batch"], sizes["length"] + 1), device=sizes["device"])
    with PinnedSelection(package) as pinned:
        kernels = _forward_backward(package, model, tokens, True, calls)
        pinned.make_recorded_choices()
        references = _forward_backward(package, model, tokens, False, calls)
        flips = {"references": pinned.flips()}
        report = _compare(package, model, tokens, sizes, calls, kernels, references)
        if "against_float32" in report:
            flips["float32"] = pinned.flips()
    if pinned.active:
        report["selection_flips"] = flips
    return report


def _compare(package, model, tokens, sizes, calls: Counter, kernels: dict, references: dict) -> dict:
    """parity's report from the kernels' and the references' passes, and in bf16 a float32 pass of the references."""
    import torch

    tolerance = sizes["tolerance"]
    direct = _errors(kernels, references)
    logits_error = direct.pop("logits")
    missing = sorted(set(references["grads"]) - set(kernels["grads"]))
    worst = max(direct, key=direct.get) if direct else None
    over = {name: error for name, error in sorted(direct.items(), key=lambda item: -item[1]) if error > tolerance}
    report = {
        "batch": sizes["batch"], "length": sizes["length"],
        "passes": {"kernels": kernels["pass"], "references": references["pass"]},
        "kernel_calls_with_kernels": kernels["calls"], "kernel_calls_with_references": references["calls"],
        "loss_kernels": kernels["loss"], "loss_references": references["loss"],
        "logits_relative_norm_error": logits_error,
        "gradients_compared": len(direct), "gradients_missing_with_kernels": missing,
        "worst_gradient": {"parameter": worst, "relative_norm_error": direct[worst]} if worst else None,
        "median_gradient_relative_norm_error": sorted(direct.values())[len(direct) // 2] if direct else None,
        "gradients_over_tolerance": over,
    }
    sound = not missing and not references["calls"]
    if next(model.parameters()).dtype == torch.float32:
        report["pass"] = sound and logits_error <= tolerance and not over
        return report
    dtype = next(model.parameters()).dtype
    model.float()  # bf16 values are exact in float32: the same weights, every op in float32
    # An error leaves the model in float32: run_checks converts it back once the error is dropped (converting here,
    # while the error's frames still hold the failed pass's activations, can itself run out of memory part-way)
    truth = _forward_backward(package, model, tokens, False, calls)
    model.to(dtype)
    report["passes"]["float32"] = truth["pass"]
    kernel_errors, reference_errors = _errors(kernels, truth), _errors(references, truth)
    # no worse than the references: within 25% (+1e-3) of their own distance to float32, or within the tolerance
    worse = {name: {"kernels": error, "references": reference_errors[name]} for name, error in kernel_errors.items()
             if error > max(tolerance, 1.25 * reference_errors[name] + 1e-3)}
    report["against_float32"] = {
        "logits": {"kernels": kernel_errors["logits"], "references": reference_errors["logits"]},
        "median_gradient": {side: sorted(v for k, v in errors.items() if k != "logits")[len(errors) // 2 - 1]
                            for side, errors in (("kernels", kernel_errors), ("references", reference_errors))},
        "worse_than_references": worse,
    }
    # Every gradient's two distances, to tell a systematic loss (the same parameters worse on every seed) from the
    # scatter of one small tensor's error (Bamba's 64-element dt_bias: ~0.02 on both sides, either one ahead).
    report["gradients_against_float32"] = {name: {"kernels": error, "references": reference_errors[name]}
                                           for name, error in kernel_errors.items() if name != "logits"}
    report["pass"] = sound and not worse
    return report


def cached_decode(package, model, sizes, calls: Counter) -> dict:
    """Cached decoding against one full forward, with the kernels and with the references; in bf16 both also against
    a float32 full forward of the references over the same tokens, which decides: a decoding step runs other kernels
    than a forward over the sequence (the GEMV and its fused SwiGLU gate round once where cuBLAS and silu_mul round
    gate and up first), so cached-vs-full measures how differently two bf16 computations round, not how far either is
    from the float32 result."""
    import torch

    report, decoded = {}, {}
    for label, use in (("kernels", True), ("references", False)):
        package.model.USE_KERNELS = use
        report[label], decoded[label] = _cached_decode(model, sizes, calls)
    package.model.USE_KERNELS = True
    report.update(report["kernels"])
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        report["pass"] = report["logits_relative_norm_error"] <= sizes["tolerance"]
        return report
    model.float()  # bf16 values are exact in float32: the same weights, every op in float32 (an error: see _compare)
    errors = {label: relative_norm_error(stepped, _full_logits(package, model, tokens, sizes["prompt"]))
              for label, (tokens, stepped) in decoded.items()}
    model.to(dtype)
    package.model.USE_KERNELS = True
    report["against_float32"] = errors
    report["pass"] = errors["kernels"] <= max(sizes["tolerance"], 1.25 * errors["references"] + 1e-3)
    return report


def _full_logits(package, model, sequence, prompt_length: int):
    """The references' logits of one forward over prompt + generated tokens, at the positions that chose each new
    token."""
    import torch

    package.model.USE_KERNELS = False
    with torch.no_grad():
        return model(sequence[:, :-1]).logits[:, prompt_length - 1:].float()


def _cached_decode(model, sizes, calls: Counter) -> tuple[dict, tuple]:
    """(report, (prompt + generated tokens (B, prompt + new), step logits (B, new, V)))."""
    import torch

    batch, prompt_length, new_tokens = sizes["batch"], sizes["prompt"], sizes["new_tokens"]
    vocab = model.lm_head.weight.shape[0] if hasattr(model, "lm_head") else model.embed.weight.shape[0]
    prompt = torch.randint(0, vocab, (batch, prompt_length), device=sizes["device"],
                           generator=torch.Generator(sizes["device"]).manual_seed(3))
    calls.clear()
    with torch.no_grad():
        cache = model.empty_cache(batch, CACHE_MARGIN + prompt_length + new_tokens)
        step_logits = [model(prompt, cache=cache).logits[:, -1:].float()]
        generated = [step_logits[-1].argmax(-1)]  # (B, 1)
        for _ in range(new_tokens - 1):
            step_logits.append(model(generated[-1], cache=cache).logits.float())
            generated.append(step_logits[-1].argmax(-1))
        decode_calls = dict(calls)
        sequence = torch.cat([prompt, *generated], dim=1)  # (B, prompt + new)
        full = model(sequence[:, :-1]).logits[:, prompt_length - 1:].float()  # the logits that chose each new token
    stepped = torch.cat(step_logits, dim=1)
    agree = (full.argmax(-1) == torch.cat(generated, dim=1)).float().mean().item()
    report = {"batch": batch, "prompt": prompt_length, "new_tokens": new_tokens, "kernel_calls": decode_calls,
              "logits_relative_norm_error": relative_norm_error(stepped, full), "greedy_tokens_agree": agree}
    return report, (sequence, stepped)


def run_checks(package, model, sizes: dict, calls: Counter, parity_sizes: dict | None = None) -> dict:
    """{"parity": ..., "decode": ...} on one model: parity at sizes updated by parity_sizes, then decode at sizes;
    a check that raises is recorded (its error and trace) and the other still runs. After each the model is put back
    as it was (its tensors' dtypes, the kernels on), once the check's error is dropped: a check that failed in its
    float32 pass leaves the model in float32, and on the GPU its error's traceback holds that pass's activations
    until then. A model that cannot be put back is not decoded with (gpu9/call1: HNS's float32 pass ran out of
    memory, so did converting back while its error was in flight, and decode then met a bf16 input and a float32
    expert weight)."""
    dtypes = _dtypes(model)
    results: dict = {}
    for name, check, check_sizes in (("parity", parity, {**sizes, **(parity_sizes or {})}),
                                     ("decode", cached_decode, sizes)):
        try:
            model.train(name == "parity")
            results[name] = check(package, model, check_sizes, calls)
        except Exception as error:  # one check failing keeps the other's figures
            results[name] = {"error": f"{type(error).__name__}: {error}"[:2000],
                             "trace": traceback.format_exc()[-3000:], "pass": False}
        package.model.USE_KERNELS = True
        unrestored = _restore(model, dtypes)
        if unrestored:
            results[name]["model_not_restored"] = unrestored
            for later in ("parity", "decode")[len(results):]:
                results[later] = {"error": f"not run: after {name} the model could not be put back as it was: "
                                           f"{unrestored}", "pass": False}
            break
    return results


def _dtypes(model) -> dict:
    """{name: dtype} of the model's parameters and floating buffers."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {name: t.dtype for name, t in tensors if t.is_floating_point()}


def _restore(model, dtypes: dict) -> str | None:
    """Convert the model back to the dtypes `dtypes` recorded; None when every tensor has its dtype again, else what
    went wrong."""
    import gc

    import torch

    gc.collect()  # anything a failed check left in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _dtypes(model) == dtypes:
        return None
    try:
        for prefix, module in model.named_modules():
            prefix = f"{prefix}." if prefix else ""
            for name, p in module.named_parameters(recurse=False):
                if dtypes.get(prefix + name, p.dtype) != p.dtype:
                    p.data = p.data.to(dtypes[prefix + name])  # as Module.to converts a parameter
            for name, b in module.named_buffers(recurse=False):
                if b.is_floating_point() and dtypes.get(prefix + name, b.dtype) != b.dtype:
                    module._buffers[name] = b.to(dtypes[prefix + name])
    except Exception as error:  # e.g. out of memory: reported by the caller, the model is not used again
        return f"{type(error).__name__}: {error}"[:500]
    wrong = {name: str(dtype) for name, dtype in _dtypes(model).items() if dtype != dtypes.get(name)}
    return f"{len(wrong)} tensors in another dtype, e.g. {dict(list(wrong.items())[:3])}" if wrong else None


def run_spec(spec: str, overrides: tuple[str, ...], preset: str | None, sizes: dict, out_root: Path,
             seed: int = 0, parity_sizes: dict | None = None) -> dict:
    import torch

    from archgen.testing import build_generated

    started = time.perf_counter()
    package = build_generated(ROOT / spec, out_root, preset, overrides)[0]
    entry: dict = {"spec": spec, "preset": preset, "overrides": list(overrides), "seed": seed}
    kernels_module = getattr(package, "kernels", None)
    entry["kernels"] = [name for name in KERNEL_FUNCTIONS if getattr(kernels_module, name, None) is not None]
    torch.manual_seed(seed)  # the weights, and the tokens drawn after them
    with torch.device(sizes["device"]):
        model = package.Model()
    model = model.to(getattr(torch, sizes["dtype"]))
    if sizes["device"] == "cpu":  # kernels take CPU tensors only in Triton's interpreter (the dry run)
        package.model.use_kernel = lambda kernel, x: package.model.USE_KERNELS and kernel is not None
    calls = spy_on_kernels(package)
    entry["parameters"] = sum(p.numel() for p in model.parameters())
    entry.update(run_checks(package, model, sizes, calls, parity_sizes))
    entry["pass"] = entry["parity"]["pass"] and entry["decode"]["pass"]
    entry["seconds"] = time.perf_counter() - started
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="directory for kernel_parity.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny dims on the CPU in Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=90.0, help="start no spec after this many seconds")
    parser.add_argument("--only", help="run the specs whose path contains this text (comma-separated: any of these)")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds of the weights and tokens, each spec once per seed (sections after "
                             "the first seed are named 'SPEC seed N')")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the specs in this many processes at once, a share each, and merge their sections into "
                             "one kernel_parity.json (a spec's time is mostly Triton compiling its kernels, on one CPU "
                             "core a process)")
    args = parser.parse_args()
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {args.seeds!r}")
    if args.out is None:
        parser.error("--out DIR (or $OUT) is required")
    only = args.only.split(",") if args.only else [""]
    specs = [spec for spec, *_ in SPECS if any(text in spec for text in only)]
    if args.jobs > 1:
        run_jobs(args, specs)
        return
    if args.dry_run:  # before triton is imported (by the generated package's kernels)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"
    import torch

    sizes = DRY if args.dry_run else GPU
    if sizes["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    run = Run("kernel_parity", args.out, dry_run=args.dry_run, budget_s=args.budget_s)
    run.meta.update(device=run.meta.get("gpu", "cpu (Triton interpreter)"), sizes=sizes, budget_s=args.budget_s)
    runs = [(index, spec, seed) for index, (spec, *_) in enumerate(SPECS) if spec in specs for seed in seeds]
    with tempfile.TemporaryDirectory() as tmp:
        for index, spec, seed in runs:
            _, gpu_overrides, (dry_preset, dry_overrides), gpu_parity_sizes = SPECS[index]
            preset, overrides = (dry_preset, dry_overrides) if args.dry_run else (None, gpu_overrides)
            parity_sizes = {} if args.dry_run else gpu_parity_sizes

            def check(record, spec=spec, overrides=overrides, preset=preset, seed=seed, parity_sizes=parity_sizes,
                      root=Path(tmp) / f"{index}-{seed}"):
                record.update(run_spec(spec, overrides, preset, sizes, root, seed, parity_sizes))

            entry = run.section(spec if seed == seeds[0] else f"{spec} seed {seed}", check)
            entry.setdefault("pass", False)  # a spec whose build or run raised
            run.results["pass"] = all(e["pass"] for e in run.sections.values())
            run.write()
            summary = {k: entry.get(k) for k in ("pass", "seconds", "kernels", "error", "skipped")}
            for part in ("parity", "decode"):
                if isinstance(entry.get(part), dict):
                    summary[part] = {k: v for k, v in entry[part].items()
                                     if k not in ("trace", "gradients_against_float32")}
            print(json.dumps(summary, indent=1, default=str), flush=True)
    print(f"wrote {args.out / 'kernel_parity.json'}: pass={run.results.get('pass')}, {len(run.sections)} specs in "
          f"{run.elapsed():.0f} s, skipped {[spec for spec, e in run.sections.items() if 'skipped' in e]}", flush=True)


def run_jobs(args, specs: list[str]) -> None:
    """--jobs N: the specs dealt round-robin (in SPECS order) to N processes of this script, each writing OUT/jobI/
    (its kernel_parity.json and log.txt) under the same budget; their sections, in SPECS order, make
    OUT/kernel_parity.json, and their logs are printed once all have ended."""
    import subprocess
    import sys

    groups = [group for group in (specs[i::args.jobs] for i in range(args.jobs)) if group]
    jobs = []
    for i, group in enumerate(groups):
        out = args.out / f"job{i}"
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, __file__, "--out", str(out), "--only", ",".join(group), "--seeds", args.seeds,
                   "--budget-s", str(args.budget_s), *(["--dry-run"] if args.dry_run else [])]
        log = (out / "log.txt").open("w")
        jobs.append((group, out, log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
    run = Run("kernel_parity", args.out, dry_run=args.dry_run, budget_s=args.budget_s)
    run.meta.update(jobs=[])
    sections = {}
    for group, out, log, process in jobs:
        returncode = process.wait()
        log.close()
        print((out / "log.txt").read_text(), end="", flush=True)
        path = out / "kernel_parity.json"
        job = json.loads(path.read_text()) if path.exists() else {"meta": {}, "sections": {}}
        run.meta["jobs"].append({"specs": group, "returncode": returncode, "elapsed_s": job["meta"].get("elapsed_s"),
                                 "log": str(out / "log.txt")})
        run.meta.update({key: job["meta"][key] for key in ("device", "sizes") if key in job["meta"]})
        sections.update(job["sections"])
        for spec in group:  # a process that died before its spec's section
            if not any(name == spec or name.startswith(f"{spec} seed ") for name in job["sections"]):
                sections[spec] = {"error": f"its process ended (return code {returncode}) without a section for it: "
                                           f"see {out / 'log.txt'}", "pass": False}
    run.sections.update({name: sections[name] for spec in specs for name in sections
                         if name == spec or name.startswith(f"{spec} seed ")})
    run.results["pass"] = all(entry.get("pass", False) for entry in run.sections.values())
    run.meta["elapsed_s"] = round(run.elapsed(), 1)
    run.write()
    print(f"wrote {args.out / 'kernel_parity.json'}: pass={run.results['pass']}, {len(run.sections)} specs in "
          f"{run.elapsed():.0f} s by {len(jobs)} processes, skipped "
          f"{[spec for spec, e in run.sections.items() if 'skipped' in e]}", flush=True)


if __name__ == "__main__":
    main()
