"""How fast is the code archgen generates today (the pure-PyTorch reference path, no Triton kernels)?

Measured in one run on one GPU, each figure next to a peer or a hardware floor taken in the same run:
  1. bench/specs/bamba_1b.yaml, generated, against transformers' BambaForCausalLM of the same configuration
     (its torch fallback path, which is what a fresh install runs): forward tokens/s at batch 4 × 2048, and batch-1
     greedy decoding ms/token after a 128-token prompt. Parameter counts of both are recorded too.
  2. Decoding against its floor: weight bytes / device copy bandwidth measured here.
  3. One HSPMN block at the seed's width (specs/hspmn.yaml --preset block): forward tokens/s and the fraction of the
     bf16 matmul rate measured here that its cost-model FLOPs reach.

Run from the repository root on a GPU machine: python bench/reference_path.py --out results.json
Weights are random; nothing here checks accuracy. `--device cpu --smoke` runs every step at toy sizes (same models,
a few tokens) to check the script itself; its figures mean nothing. The JSON is rewritten after every section, so a
run that is stopped keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

# transformers' torch fallback for Mamba-2 materialises a 64 GiB float32 tensor at batch 4 × 2048: with the default
# allocator a cached block split by later small allocations cannot take it again (the first H100 run died so, with
# 65 GiB reserved but free). Expandable segments let freed memory be reused; set before torch touches CUDA.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from harness import ROOT, command_line, median_ms, run_metadata  # noqa: E402


def build(spec: Path, preset: str | None, out_root: Path):
    from archgen.passes.cost import cost_report
    from archgen.testing import build_generated

    package, compiled = build_generated(spec, out_root, preset, source=spec.relative_to(ROOT).as_posix())
    return package, cost_report(compiled.ir, seq_len=4096)


# Sizes of the measurement; --smoke replaces them with toy ones (see SMOKE) to check the script on a CPU.
SIZES = {"device": "cuda", "copy_elements": 2**30, "matmul_n": 8192, "forward_shapes": ((4, 2048), (1, 2048)),
         "prompt_len": 128, "new_tokens": 64, "hspmn_batches": (1, 8), "hspmn_len": 4096, "warmup": 2, "iters": 5}
SMOKE = {"device": "cpu", "copy_elements": 2**22, "matmul_n": 256, "forward_shapes": ((1, 64), (1, 32)),
         "prompt_len": 8, "new_tokens": 3, "hspmn_batches": (1,), "hspmn_len": 64, "warmup": 1, "iters": 1}


def sync() -> None:
    if SIZES["device"] == "cuda":
        torch.cuda.synchronize()


def gpu_time_ms(fn, warmup: int | None = None, iters: int | None = None) -> float:
    """Median of `iters` timed calls after `warmup` untimed ones (CUDA events; wall clock on a CPU)."""
    return median_ms(fn, SIZES["device"], SIZES["iters"] if iters is None else iters,
                     SIZES["warmup"] if warmup is None else warmup)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device copy."""
    a = torch.empty(SIZES["copy_elements"], dtype=torch.bfloat16, device=SIZES["device"])
    b = torch.empty_like(a)
    ms = gpu_time_ms(lambda: b.copy_(a), warmup=3, iters=10)
    return 2 * a.numel() * a.element_size() / (ms / 1e3)


def matmul_rate() -> float:
    n = SIZES["matmul_n"]
    a = torch.randn(n, n, dtype=torch.bfloat16, device=SIZES["device"])
    b = torch.randn(n, n, dtype=torch.bfloat16, device=SIZES["device"])
    ms = gpu_time_ms(lambda: a @ b, warmup=3, iters=10)
    return 2 * n**3 / (ms / 1e3)


def decode_ms_per_token(generate, prompt, new_tokens: int) -> float:
    """(time to generate new_tokens − time to generate 1) / (new_tokens − 1): decoding steps only, no prefill."""
    def run(n):
        sync()
        started = time.perf_counter()
        generate(prompt, n)
        sync()
        return time.perf_counter() - started

    run(4)  # warm-up
    one = min(run(1) for _ in range(2))
    many = min(run(new_tokens) for _ in range(2))
    return (many - one) / (new_tokens - 1) * 1e3


def describe(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)[-6:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(error).__name__}: {str(error)[:2000]} [at {where}]"


def attempt(entry: dict, key: str, fn) -> None:
    """entry[key] = fn(); on an exception entry[key + '_error'] says what and where, and the benchmark goes on.
    entry[key + '_peak_gib'] is the device memory allocated at most during the part."""
    if SIZES["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        entry[key] = fn()
    except Exception as error:  # noqa: BLE001 — a failed part is a finding; the others still run
        entry[key + "_error"] = describe(error)
        print(f"{key}: {entry[key + '_error']}", flush=True)
    entry[key + "_peak_gib"] = peak_memory_gib()


def free_memory() -> None:
    gc.collect()
    if SIZES["device"] == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if SIZES["device"] == "cuda" else None


def bench_bamba(results: dict, out_root: Path, bandwidth: float) -> None:
    device, new_tokens = SIZES["device"], SIZES["new_tokens"]
    shapes = SIZES["forward_shapes"]  # the first is the headline shape; the others give a ratio if it fails
    entry = results["bamba_1b"] = {"forward_shape": list(shapes[0]), "prompt_len": SIZES["prompt_len"],
                                   "new_tokens": new_tokens}
    package, report = build(ROOT / "bench/specs/bamba_1b.yaml", None, out_root)
    with torch.device(device):
        ours = package.Model().to(torch.bfloat16).eval()
    token_sets = {f"{b}x{t}": torch.randint(0, 32000, (b, t), device=device) for b, t in shapes}
    headline = f"{shapes[0][0]}x{shapes[0][1]}"
    forward = entry["forward"] = {shape: {} for shape in token_sets}
    prompt = torch.randint(0, 32000, (1, SIZES["prompt_len"]), device=device)
    entry.update({"archgen_parameters": sum(p.numel() for p in ours.parameters()), "cost_model_parameters": report.total_params})
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    entry["weight_bytes"] = weight_bytes
    entry["decode_floor_ms_per_token"] = weight_bytes / bandwidth * 1e3

    def forward_tokens_per_s(model, tokens):
        with torch.no_grad():
            ms = gpu_time_ms(lambda: model(tokens))
        return tokens.numel() / (ms / 1e3)

    def measure_forward(who: str, model) -> None:
        for shape, tokens in token_sets.items():
            attempt(forward[shape], f"{who}_tokens_per_s", lambda tokens=tokens: forward_tokens_per_s(model, tokens))
            free_memory()
        if f"{who}_tokens_per_s" in forward[headline]:
            entry[f"{who}_forward_tokens_per_s"] = forward[headline][f"{who}_tokens_per_s"]

    measure_forward("archgen", ours)
    attempt(entry, "archgen_decode_ms_per_token", lambda: decode_ms_per_token(
        lambda p, n: ours.generate(p, max_new_tokens=n, temperature=0), prompt, new_tokens))
    ours = None  # free its memory before the peer loads
    free_memory()

    try:
        import transformers
        from transformers import BambaConfig, BambaForCausalLM

        entry["transformers_version"] = transformers.__version__
        config = BambaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                             num_attention_heads=16, num_key_value_heads=8, attn_layer_indices=[3, 7, 11, 15],
                             mamba_n_heads=64, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_expand=2,
                             mamba_chunk_size=256, mamba_d_conv=4, tie_word_embeddings=False)
        with torch.device(device):
            peer = BambaForCausalLM(config).to(torch.bfloat16).eval()
        entry["transformers_parameters"] = sum(p.numel() for p in peer.parameters())
        measure_forward("transformers", peer)
        attempt(entry, "transformers_decode_ms_per_token", lambda: decode_ms_per_token(
            lambda p, n: peer.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False), prompt, new_tokens))
        peer = None
    except Exception as error:  # the peer is optional; record why it did not run
        entry["transformers_error"] = describe(error)
    free_memory()
    for figures in forward.values():
        if "archgen_tokens_per_s" in figures and "transformers_tokens_per_s" in figures:
            figures["speed_ratio_archgen_over_transformers"] = (figures["archgen_tokens_per_s"]
                                                                / figures["transformers_tokens_per_s"])
    if "archgen_forward_tokens_per_s" in entry and "transformers_forward_tokens_per_s" in entry:
        entry["forward_speed_ratio_archgen_over_transformers"] = (entry["archgen_forward_tokens_per_s"]
                                                                  / entry["transformers_forward_tokens_per_s"])
    if "archgen_decode_ms_per_token" in entry and "transformers_decode_ms_per_token" in entry:
        entry["decode_time_ratio_archgen_over_transformers"] = (entry["archgen_decode_ms_per_token"]
                                                                / entry["transformers_decode_ms_per_token"])
        entry["decode_ratio_transformers_over_floor"] = (entry["transformers_decode_ms_per_token"]
                                                         / entry["decode_floor_ms_per_token"])
    if "archgen_decode_ms_per_token" in entry:
        entry["decode_ratio_archgen_over_floor"] = entry["archgen_decode_ms_per_token"] / entry["decode_floor_ms_per_token"]


def bench_hspmn_block(results: dict, out_root: Path, peak: float) -> None:
    device, length = SIZES["device"], SIZES["hspmn_len"]
    entry = results["hspmn_block"] = {}
    package, report = build(ROOT / "specs/hspmn.yaml", "block", out_root)
    report = cost_report_at(report, length)
    # model.hidden_states runs the layers and the final norm, not the lm_head: count the layers' FLOPs only. (The
    # first H100 run divided by forward_flops_per_sequence, which includes the lm_head's 2·d·V per token, 59% of
    # this spec's total, and so overstated the fraction about 2.4 times.)
    flops_per_sequence = round(sum(layer.flops_per_token for layer in report.layers if layer.index is not None) * length)
    entry["cost_model_block_flops_per_sequence"] = flops_per_sequence
    entry["cost_model_flops_per_sequence_with_lm_head"] = report.forward_flops_per_sequence
    entry["note"] = ("cost-model FLOPs count the sparse attention at the spec's 20% of queries; the reference op "
                     "computes every query's attention with a masked dense SDPA and zeroes the unselected rows")
    with torch.device(device):
        model = package.Model().to(torch.bfloat16).eval()
    for batch in SIZES["hspmn_batches"]:
        tokens = torch.randint(0, 32000, (batch, length), device=device)

        def measure(tokens=tokens, batch=batch):
            with torch.no_grad():
                ms = gpu_time_ms(lambda: model.hidden_states(tokens))
            flops = flops_per_sequence * batch
            return {
                "tokens_per_s": tokens.numel() / (ms / 1e3),
                "ms": ms,
                "cost_model_flops": flops,
                "fraction_of_measured_bf16_matmul_rate": flops / (ms / 1e3) / peak,
            }

        attempt(entry, f"batch{batch}_len{length}", measure)
        free_memory()


def cost_report_at(report, length: int):
    """The HSPMN block's cost report at `length` (build() makes it at 4096, the measured length)."""
    if length == report.seq_len:
        return report
    from archgen.passes.cost import cost_report
    from archgen.pipeline import compile_spec

    return cost_report(compile_spec(ROOT / "specs/hspmn.yaml", "block").ir, seq_len=length)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script, measures nothing")
    args = parser.parse_args()
    if args.smoke:
        SIZES.update(SMOKE)
    torch.manual_seed(0)
    results = {
        **run_metadata(command_line(), dry_run=args.smoke),
        "device": torch.cuda.get_device_name() if SIZES["device"] == "cuda" else "cpu (smoke run: figures mean nothing)",
        "cuda": torch.version.cuda,
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "sizes": json.loads(json.dumps(SIZES)),
    }

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    bandwidth = copy_bandwidth()
    peak = matmul_rate()
    results["copy_bandwidth_bytes_per_s"] = bandwidth
    results["bf16_matmul_flops_per_s"] = peak
    save()
    with tempfile.TemporaryDirectory() as tmp:
        for name, step in (("bamba", lambda: bench_bamba(results, Path(tmp), bandwidth)),
                           ("hspmn", lambda: bench_hspmn_block(results, Path(tmp), peak))):
            started = time.perf_counter()
            try:
                step()
            except Exception as error:
                results[f"{name}_error"] = describe(error)
            results[f"{name}_seconds"] = time.perf_counter() - started
            free_memory()
            save()
            print(json.dumps(results, indent=2), flush=True)
    save()


if __name__ == "__main__":
    main()
