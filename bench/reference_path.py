"""How fast is the code archgen generates today (the pure-PyTorch reference path, no Triton kernels)?

Measured in one run on one GPU, each figure next to a peer or a hardware floor taken in the same run:
  1. bench/specs/bamba_1b.yaml, generated, against transformers' BambaForCausalLM of the same configuration
     (its torch fallback path, which is what a fresh install runs): forward tokens/s at batch 4 × 2048, and batch-1
     greedy decoding ms/token after a 128-token prompt. Parameter counts of both are recorded too.
  2. Decoding against its floor: weight bytes / device copy bandwidth measured here.
  3. One HSPMN block at the seed's width (specs/hspmn.yaml --preset block): forward tokens/s and the fraction of the
     bf16 matmul rate measured here that its cost-model FLOPs reach.

Run from the repository root on a GPU machine: python bench/reference_path.py --out results.json
Weights are random; nothing here checks accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(spec: Path, preset: str | None, out_root: Path):
    from archgen.emit import emit, write_package
    from archgen.passes.cost import cost_report
    from archgen.pipeline import compile_spec

    compiled = compile_spec(spec, preset)
    emitted = emit(compiled, spec.relative_to(ROOT).as_posix())
    target = out_root / compiled.resolved.name
    write_package(emitted.files, target)
    module_spec = importlib.util.spec_from_file_location(compiled.resolved.name, target / "__init__.py",
                                                         submodule_search_locations=[str(target)])
    package = importlib.util.module_from_spec(module_spec)
    sys.modules[compiled.resolved.name] = package
    module_spec.loader.exec_module(package)
    return package, cost_report(compiled.ir, seq_len=4096)


def gpu_time_ms(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device copy."""
    a = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = gpu_time_ms(lambda: b.copy_(a), warmup=3, iters=10)
    return 2 * a.numel() * a.element_size() / (ms / 1e3)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = gpu_time_ms(lambda: a @ b, warmup=3, iters=10)
    return 2 * 8192**3 / (ms / 1e3)


def decode_ms_per_token(generate, prompt, new_tokens: int) -> float:
    """(time to generate new_tokens − time to generate 1) / (new_tokens − 1): decoding steps only, no prefill."""
    def run(n):
        torch.cuda.synchronize()
        started = time.perf_counter()
        generate(prompt, n)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(4)  # warm-up
    one = min(run(1) for _ in range(2))
    many = min(run(new_tokens) for _ in range(2))
    return (many - one) / (new_tokens - 1) * 1e3


def bench_bamba(results: dict, out_root: Path, bandwidth: float) -> None:
    package, report = build(ROOT / "bench/specs/bamba_1b.yaml", None, out_root)
    with torch.device("cuda"):
        ours = package.Model().to(torch.bfloat16).eval()
    tokens = torch.randint(0, 32000, (4, 2048), device="cuda")
    prompt = torch.randint(0, 32000, (1, 128), device="cuda")
    entry = {"archgen_parameters": sum(p.numel() for p in ours.parameters()), "cost_model_parameters": report.total_params}
    with torch.no_grad():
        ms = gpu_time_ms(lambda: ours(tokens))
    entry["archgen_forward_tokens_per_s"] = tokens.numel() / (ms / 1e3)
    entry["archgen_decode_ms_per_token"] = decode_ms_per_token(
        lambda p, n: ours.generate(p, max_new_tokens=n, temperature=0), prompt, 64)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    entry["decode_floor_ms_per_token"] = weight_bytes / bandwidth * 1e3
    del ours
    torch.cuda.empty_cache()

    try:
        from transformers import BambaConfig, BambaForCausalLM

        config = BambaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                             num_attention_heads=16, num_key_value_heads=8, attn_layer_indices=[3, 7, 11, 15],
                             mamba_n_heads=64, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_expand=2,
                             mamba_chunk_size=256, mamba_d_conv=4, tie_word_embeddings=False)
        with torch.device("cuda"):
            peer = BambaForCausalLM(config).to(torch.bfloat16).eval()
        entry["transformers_parameters"] = sum(p.numel() for p in peer.parameters())
        with torch.no_grad():
            ms = gpu_time_ms(lambda: peer(tokens))
        entry["transformers_forward_tokens_per_s"] = tokens.numel() / (ms / 1e3)
        entry["transformers_decode_ms_per_token"] = decode_ms_per_token(
            lambda p, n: peer.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False), prompt, 64)
        entry["forward_speed_ratio_archgen_over_transformers"] = entry["archgen_forward_tokens_per_s"] / entry["transformers_forward_tokens_per_s"]
        entry["decode_time_ratio_archgen_over_transformers"] = entry["archgen_decode_ms_per_token"] / entry["transformers_decode_ms_per_token"]
        del peer
    except Exception as error:  # the peer is optional; record why it did not run
        entry["transformers_error"] = f"{type(error).__name__}: {error}"
    entry["decode_ratio_archgen_over_floor"] = entry["archgen_decode_ms_per_token"] / entry["decode_floor_ms_per_token"]
    results["bamba_1b"] = entry
    torch.cuda.empty_cache()


def bench_hspmn_block(results: dict, out_root: Path, peak: float) -> None:
    package, report = build(ROOT / "specs/hspmn.yaml", "block", out_root)
    with torch.device("cuda"):
        model = package.Model().to(torch.bfloat16).eval()
    entry = {}
    for batch in (1, 8):
        tokens = torch.randint(0, 32000, (batch, 4096), device="cuda")
        with torch.no_grad():
            ms = gpu_time_ms(lambda: model.hidden_states(tokens))
        flops = report.forward_flops_per_sequence * batch
        entry[f"batch{batch}_len4096"] = {
            "tokens_per_s": tokens.numel() / (ms / 1e3),
            "ms": ms,
            "cost_model_flops": flops,
            "fraction_of_measured_bf16_matmul_rate": flops / (ms / 1e3) / peak,
        }
    results["hspmn_block"] = entry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python bench/reference_path.py --out " + str(args.out),
    }
    bandwidth = copy_bandwidth()
    peak = matmul_rate()
    results["copy_bandwidth_bytes_per_s"] = bandwidth
    results["bf16_matmul_flops_per_s"] = peak
    with tempfile.TemporaryDirectory() as tmp:
        for name, step in (("bamba", lambda: bench_bamba(results, Path(tmp), bandwidth)),
                           ("hspmn", lambda: bench_hspmn_block(results, Path(tmp), peak))):
            try:
                step()
            except Exception as error:
                results[f"{name}_error"] = f"{type(error).__name__}: {error}"
            print(json.dumps(results, indent=2), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
