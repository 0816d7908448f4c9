"""Whole-model speed of generated packages on one GPU, each figure against a floor or peer measured in the same run.

For each model: (a) the package as generated (kernels, CUDA-graph decoding), (b) its reference ops eager, (c) (b) under
torch.compile — all through `archgen.benchmark.run_bench`, the code behind `archgen bench` — and for Bamba-1B (d)
transformers' BambaForCausalLM at the same configuration (its torch path): forward tokens/s and batch-1 decode
ms/token. Training MFU is the cost model's training FLOPs over the bf16 matmul rate measured in the run.

Run on the GPU from the repository root:
    python bench/whole_model.py --out $OUT [--only bamba_1b,hymba_plus] [--budget-s 540]
`--dry-run` runs the same code on the CPU at toy sizes (figures meaningless). Results go to $OUT/whole_model.json
(rewritten after each model) with the PNG of each model; bars to $OUT/bars.jsonl in bench/results/bars.json's form.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archgen.benchmark import BenchConfig, plot, run_bench  # noqa: E402

MODELS = {  # name: (spec, preset, overrides)
    "bamba_1b": ("bench/specs/bamba_1b.yaml", None, ()),
    "hymba_plus": ("specs/hymba_plus.yaml", None, ()),
    "nexus": ("specs/nexus.yaml", None, ()),
    "hns_ss_jepa_moe_1b": ("specs/hns_ss_jepa_moe.yaml", "1b", ()),
}
BAMBA_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=8, attn_layer_indices=[3, 7, 11, 15], mamba_n_heads=64, mamba_d_head=64,
                    mamba_d_state=128, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=256, mamba_d_conv=4,
                    tie_word_embeddings=False)


def transformers_bamba(device: str, batch: int, seq_len: int, prompt_len: int, new_tokens: int) -> dict:
    """Peer (d): forward tokens/s at batch × seq_len and batch-1 greedy decode ms/token after the same prompt length."""
    import transformers
    from transformers import BambaConfig, BambaForCausalLM

    from archgen.benchmark import timed, timed_once

    with torch.device(device):
        peer = BambaForCausalLM(BambaConfig(**BAMBA_CONFIG)).to(torch.bfloat16).eval()
    tokens = torch.randint(0, 32000, (batch, seq_len), device=device)
    with torch.no_grad():
        forward_s = timed(lambda: peer(tokens), device, 3)
        prompt = tokens[:1, :prompt_len]

        def generate(n):
            peer.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        generate(4)
        one = min(timed_once(lambda: generate(1), device) for _ in range(2))
        many = min(timed_once(lambda: generate(new_tokens), device) for _ in range(2))
    return {"version": transformers.__version__, "prefill_tokens_per_s": batch * seq_len / forward_s,
            "decode_batch_1_ms_per_token": (many - one) / (new_tokens - 1) * 1e3,
            "parameters": sum(p.numel() for p in peer.parameters())}


def bar_rows(name: str, result: dict, peer: dict | None, command: str) -> list[dict]:
    """The figures issue 12 sets bars for, in bench/results/bars.json's form (ratio > 1: archgen is better)."""
    rows = []
    date = datetime.date.today().isoformat()
    kernels = result["variants"].get("kernels", {})

    def row(figure, archgen, unit, reference, reference_value, ratio, bar):
        rows.append({"figure": figure, "archgen": archgen, "unit": unit, "reference": reference,
                     "reference_value": reference_value, "ratio": ratio, "bar": bar, "device": result["device"], "date": date,
                     "command": command})

    decode = kernels.get("decode_batch_1")
    if decode:
        row(f"{name} batch-1 decode vs HBM floor", decode["ms_per_token"], "ms/token", "weight + cache bytes / copy bandwidth",
            decode["floor_ms_per_token"], decode["floor_ms_per_token"] / decode["ms_per_token"], 0.5)
        if peer and "decode_batch_1_ms_per_token" in peer:
            row(f"{name} batch-1 decode vs transformers", decode["ms_per_token"], "ms/token",
                f"transformers {peer['version']} generate",
                peer["decode_batch_1_ms_per_token"], peer["decode_batch_1_ms_per_token"] / decode["ms_per_token"], 20.0)
    train = kernels.get("train")
    if train:
        row(f"{name} training MFU", train["mfu"], "fraction of measured bf16 matmul rate", "bf16 matmul rate",
            result["matmul_flops_per_s"], train["mfu"], 0.4)
    prefill = kernels.get("prefill")
    if prefill and peer and "prefill_tokens_per_s" in peer:
        row(f"{name} prefill vs transformers", prefill["tokens_per_s"], "tokens/s", f"transformers {peer['version']} forward",
            peer["prefill_tokens_per_s"], prefill["tokens_per_s"] / peer["prefill_tokens_per_s"], 1.5)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--only", default=None, help="comma-separated model names")
    parser.add_argument("--variants", default="kernels,reference,compiled")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip models that would start after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script only")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    command = "python bench/whole_model.py " + " ".join(sys.argv[1:])
    sizes = dict(device="cuda", dtype="bfloat16", batch=4, seq_len=2048, decode_batches=(1, 32), prompt_len=128, new_tokens=64)
    if args.dry_run:
        sizes = dict(device="cpu", dtype="float32", batch=1, seq_len=16, decode_batches=(1,), prompt_len=4, new_tokens=3,
                     train_steps=1)
    results, bars = {"date": datetime.date.today().isoformat(), "command": command, "models": {}}, []
    for name, (spec, preset, overrides) in MODELS.items():
        if args.only and name not in args.only.split(","):
            continue
        if time.perf_counter() - started > args.budget_s:
            results["models"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        if args.dry_run:
            preset = "tiny" if name != "bamba_1b" else None
            overrides = ("model.d_model=64", "model.vocab_size=256", "mixers.ssm.n_heads=2", "mixers.ssm.d_state=16",
                         "mixers.attn.n_heads=4", "mixers.attn.head_dim=16", "mixers.attn.n_kv_heads=2",
                         "mixers.attn.rope.rotary_dim=16", "ffns.mlp.hidden=128") if name == "bamba_1b" else ()
        try:
            config = BenchConfig(ROOT / spec, preset, overrides, variants=tuple(args.variants.split(",")), **sizes)
            def progress(step, name=name):
                print(f"[{time.perf_counter() - started:6.0f}s] {name}: {step}", flush=True)

            result = run_bench(config, progress=progress)
            plot(result, out / f"{name}.png")
            entry = result.to_json()
        except Exception as error:  # noqa: BLE001 — one model failing must not lose the others
            entry = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        peer = None
        if name == "bamba_1b" and not args.dry_run:
            try:
                peer = entry["transformers"] = transformers_bamba("cuda", 4, 2048, 128, 64)
            except Exception as error:  # noqa: BLE001
                entry["transformers_error"] = f"{type(error).__name__}: {error}"
        results["models"][name] = entry
        if "variants" in entry:
            bars += bar_rows(name, entry, peer, command)
        (out / "whole_model.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "bars.jsonl").write_text("".join(json.dumps(row) + "\n" for row in bars))
    print(json.dumps({name: {v: {k: f for k, f in figs.items()} for v, figs in m.get("variants", {}).items()}
                      for name, m in results["models"].items()}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
