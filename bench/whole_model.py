"""Whole-model speed of every seed on one GPU, in one run under a time budget, each figure against a floor or peer
measured in the same run.

Models: bench/specs/bamba_1b.yaml, specs/hymba_plus.yaml, specs/nexus.yaml (base), specs/hns_ss_jepa_moe.yaml (`1b`).
Variants, through `archgen.benchmark` (the code behind `archgen bench`): (a) `kernels`, the package as generated
(Triton kernels on CUDA, CUDA-graph decoding); (b) `reference`, its pure-PyTorch ops eager; (c) `compiled`, (b) under
torch.compile (training and prefill, with compile time and graph breaks; each layer compiled, see
archgen.benchmark.compile_layers); on request `kernels_compiled`, (a) under torch.compile; and for Bamba (d) transformers'
BambaForCausalLM at the same configuration (its torch path): prefill tokens/s and batch-1 decode ms/token.
Figures: training-step tokens/s and MFU (cost-model training FLOPs over the bf16 matmul rate measured in the run) at
8 × 2048 = 16k tokens (HNS 1b: 2 × 2048), prefill tokens/s, batch-1 and batch-32 decode ms/token against the HBM
floor, peak memory. The references, (b) and (c), cannot train at 8 × 2048 where a model has Mamba-1 layers (their scan
keeps ~250 GiB per 2048-token sequence of Hymba+ for the backward): they train from REFERENCE_TRAIN_SHAPES, and a step
that runs out of memory shrinks until it fits (archgen.benchmark.train_figures); their ratio to (a) is taken against
(a) trained at the same shape in the same run. Seed headlines: one HSPMN block at batch 64 × 4096, forward and
forward + backward tokens/s (the seed: 1.41 M and ~980 k tokens/s on an RTX 5090), and HNS-SS-JEPA-MoE `1b` tokens/s
and ms/token with its true parameter count. And for Bamba and Hymba+, bench/decode.py's logit check: per-step logits
of the CUDA-graph decoder and of eager decoding with a tensor position, fed eager greedy's tokens, against eager
decoding (bf16, float32). `--parts` keeps some of training, prefill and decoding, for every variant or per variant.

The work runs in priority order (every (a) and the peer first, then the headlines, (b), and last the compiles); a step
starts only when its estimated cost fits in what is left of --budget-s, inside a step no part starts after the
budget's end, and a compiled variant's part only when its estimate (COMPILED_PART_S) still fits: what did not run says
`skipped`. The compiled variants compile static graphs (a graph per shape). A reference variant measured without
(a) at its shapes gets (a)'s figures at those shapes from the same run (`kernels_in_this_run`).

Run on the GPU from the repository root:
    python bench/whole_model.py --out $OUT --budget-s 330
and the cells that do not fit beside the rest, one command each (--parts takes VARIANT.PART entries; --only's order
ranks the models): (b) training and (c), the references compiled, for the Mamba-1 models (each compile ~30-60 s of
the budget, and (a) measured at (b)'s and (c)'s shapes in the same run for their ratios):
    python bench/whole_model.py --out $OUT --only hymba_plus,hns_ss_jepa_moe_1b --variants reference,compiled
        --parts reference.train,compiled.train,compiled.prefill --budget-s 230        (one line)
Writes $OUT/whole_model.json (after every part: a run stopped from outside keeps what it measured), $OUT/bars.jsonl
(rows in bench/results/bars.json's form: ratio > 1 means archgen is better) and $OUT/whole_model.png. `--dry-run` runs
every step on the CPU at toy sizes (figures meaningless). bench/whole_model_table.py merges the runs' JSON files into
the README's table and plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archgen.benchmark import (  # noqa: E402
    COMPILED_VARIANTS,
    PARTS,
    VARIANTS,
    BenchConfig,
    attempt,
    describe_error,
    free_memory,
    logit_parity,
    measure_peer,
    measure_variant,
    plot_into,
    prepare_bench,
    sync,
    timed,
    timed_once,
)

MODELS = {  # name: (spec, preset, size changes from SIZES)
    "bamba_1b": ("bench/specs/bamba_1b.yaml", None, {}),
    "hymba_plus": ("specs/hymba_plus.yaml", None, {}),
    "nexus": ("specs/nexus.yaml", None, {}),
    "hns_ss_jepa_moe_1b": ("specs/hns_ss_jepa_moe.yaml", "1b", {"batch": 2}),  # 10.8 B parameters: AdamW needs 86 GB
}
# Where the reference variants, (b) and (c), start training: their Mamba-1 scan keeps ~25 full-size float32 tensors per
# layer for the backward (a meta-device count of the saved tensors: ~250 GiB per 2048-token sequence of Hymba+, ~190 of
# Nexus; HNS 1b's 10.8 B parameters leave ~50 GiB beside AdamW's state), so they cannot train at 8 × 2048. Starting
# where they fit saves the compiled variant a recompile per shape that runs out of memory.
REFERENCE_TRAIN_SHAPES = {"hymba_plus": (1, 512), "nexus": (1, 512), "hns_ss_jepa_moe_1b": (1, 256)}
DRY_REFERENCE_TRAIN_SHAPE = (1, 8)  # below DRY_SIZES', so that a dry run takes (a)'s same-shape training too
SIZES = dict(device="cuda", dtype="bfloat16", batch=8, seq_len=2048, decode_batches=(1, 32), prompt_len=128,
             new_tokens=32, train_steps=4)
DRY_SIZES = dict(device="cpu", dtype="float32", batch=1, seq_len=16, decode_batches=(1, 2), prompt_len=4, new_tokens=3,
                 train_steps=1)
DRY_BAMBA = ("model.d_model=64", "model.vocab_size=256", "mixers.ssm.n_heads=2", "mixers.ssm.d_state=16",
             "mixers.attn.n_heads=4", "mixers.attn.head_dim=16", "mixers.attn.n_kv_heads=2", "mixers.attn.rope.rotary_dim=16",
             "ffns.mlp.hidden=128")
# Seconds each step takes on an H200 at SIZES (a guess from earlier runs, a compile included): a step starts only when
# its estimate fits in what is left of the budget.
ESTIMATE_S = {"kernels": 30, "reference": 40, "compiled": 60, "kernels_compiled": 60, "kernels_graphed": 70, "transformers": 40,
              "hspmn_block": 25,
              "logit_parity": 15}
HNS_ESTIMATE_S = {"kernels": 80, "reference": 90, "compiled": 120, "kernels_compiled": 120, "kernels_graphed": 140}
# Seconds of each part of a compiled variant (the compile, then the timing) on an H200. Bamba-1B's are measured
# (session 7: first calls of 37.6 s training and 30.7 s prefill, 82 s for the step); the others' are scaled from them
# by the size of their layer classes' graphs (ATen nodes through dynamo and AOT autograd, counted on a CPU at the tiny
# presets: training forward + backward / prefill forward, Bamba 795 / 327, Hymba+ 1538 / 639, Nexus 652 / 249, HNS
# 1083 / 473), taking Bamba's two first calls as a fixed cost plus one per node (~26 s + 15 ms a node), and rounded up.
# A part starts only when its estimate fits in what is left of the budget: a compile that a job's time limit cuts off
# is time lost.
COMPILED_PART_S = {"bamba_1b": {"train": 45, "prefill": 35}, "hymba_plus": {"train": 60, "prefill": 45},
                   "nexus": {"train": 50, "prefill": 40}, "hns_ss_jepa_moe_1b": {"train": 55, "prefill": 45}}
PLAN = [  # (model, step) in priority order: the bars' figures first, compiles last
    ("bamba_1b", "kernels"), ("bamba_1b", "transformers"), ("hymba_plus", "kernels"), ("hspmn_block", "hspmn_block"),
    ("bamba_1b", "logit_parity"), ("hymba_plus", "logit_parity"),
    ("hns_ss_jepa_moe_1b", "kernels"), ("nexus", "kernels"),
    ("bamba_1b", "reference"), ("hymba_plus", "reference"), ("nexus", "reference"), ("hns_ss_jepa_moe_1b", "reference"),
    ("bamba_1b", "compiled"), ("hymba_plus", "compiled"), ("nexus", "compiled"), ("hns_ss_jepa_moe_1b", "compiled"),
    ("bamba_1b", "kernels_compiled"), ("hymba_plus", "kernels_compiled"), ("nexus", "kernels_compiled"),
    ("hns_ss_jepa_moe_1b", "kernels_compiled"),
    ("bamba_1b", "kernels_graphed"), ("hymba_plus", "kernels_graphed"), ("nexus", "kernels_graphed"),
    ("hns_ss_jepa_moe_1b", "kernels_graphed"),
]
BAMBA_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=8, attn_layer_indices=[3, 7, 11, 15], mamba_n_heads=64, mamba_d_head=64,
                    mamba_d_state=128, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=256, mamba_d_conv=4,
                    tie_word_embeddings=False)
DRY_BAMBA_CONFIG = dict(BAMBA_CONFIG, vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, mamba_n_heads=2, mamba_d_head=64, mamba_d_state=16, mamba_chunk_size=16)
HSPMN_SEED = {"forward_tokens_per_s": 1.41e6, "train_tokens_per_s": 0.98e6, "device": "RTX 5090"}
HNS_SEED = {"tokens_per_s": 1e5, "ms_per_token": 20.0, "model": "7B"}


def variant_parts(parts: tuple[str, ...], variant: str) -> tuple[str, ...]:
    """The parts `variant` measures, from --parts: its own VARIANT.PART entries when it has any, else the plain ones."""
    own = tuple(item.split(".", 1)[1] for item in parts if item.startswith(variant + "."))
    return own or tuple(item for item in parts if "." not in item)


def plan_steps(only: list[str] | None, steps: tuple[str, ...]) -> list[tuple[str, str]]:
    """PLAN's steps among `steps` for the models in `only` (all when None). With `only`, its order ranks the models
    within each kind of step, the kinds keeping PLAN's order of their first step (the bars' figures first)."""
    plan = [(name, step) for name, step in PLAN if (only is None or name in only) and step in steps]
    if only is None:
        return plan
    kinds = list(dict.fromkeys(step for _, step in PLAN))
    return sorted(plan, key=lambda item: (kinds.index(item[1]), only.index(item[0])))


def bench_config(name: str, dry_run: bool, variants: tuple[str, ...], parts: tuple[str, ...] = PARTS) -> BenchConfig:
    spec, preset, changes = MODELS[name]
    if dry_run:
        preset, overrides, sizes = (None, DRY_BAMBA, DRY_SIZES) if name == "bamba_1b" else ("tiny", (), DRY_SIZES)
    else:
        overrides, sizes = (), {**SIZES, **changes}
    return BenchConfig(ROOT / spec, preset, overrides, variants=variants, parts=parts, **sizes)


def transformers_bamba(config: BenchConfig, peer_config: dict, batch: int, deadline: float) -> dict:
    """Peer (d): prefill tokens/s at batch × seq_len (its torch path materialises a 64 GiB scan tensor at 4 × 2048,
    so it runs at 4 where archgen runs at 8: its tokens/s hardly depends on the batch) and batch-1 greedy decode
    ms/token after the same prompt, both as archgen.benchmark measures the package."""
    import transformers
    from transformers import BambaConfig, BambaForCausalLM

    with torch.device(config.device):
        peer = BambaForCausalLM(BambaConfig(**peer_config)).to(getattr(torch, config.dtype)).eval()
    figures: dict = {"version": transformers.__version__, "parameters": sum(p.numel() for p in peer.parameters())}
    vocab = peer_config["vocab_size"]
    tokens = torch.randint(0, vocab, (batch, config.seq_len), device=config.device)
    with torch.no_grad():
        attempt(figures, "prefill", config.device, lambda: {
            "tokens_per_s": batch * config.seq_len / timed(lambda: peer(tokens), config.device, 2, warmup=1),
            "batch": batch}, deadline)
        prompt = tokens[:1, : config.prompt_len]

        def generate(n: int):
            peer.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        def decode() -> dict:
            generate(4)
            one = min(timed_once(lambda: generate(1), config.device) for _ in range(2))
            many = min(timed_once(lambda: generate(config.new_tokens), config.device) for _ in range(2))
            return {"ms_per_token": (many - one) / (config.new_tokens - 1) * 1e3}

        attempt(figures, "decode_batch_1", config.device, decode, deadline)
    return figures


def hspmn_block(dry_run: bool, directory: Path, deadline: float) -> dict:
    """One HSPMN block (`--preset block`: d_model 2048, 16 heads) as generated, forward and forward + backward
    tokens/s at batch 64 × 4096, the seed's benchmark shape; the lm_head is not part of it."""
    from archgen.testing import build_generated

    device, dtype = ("cpu", torch.float32) if dry_run else ("cuda", torch.bfloat16)
    batch, seq_len, steps = (2, 16, 1) if dry_run else (64, 4096, 3)
    package, compiled = build_generated(ROOT / "specs/hspmn.yaml", directory, "tiny" if dry_run else "block")
    with torch.device(device):
        block = package.Model().layers[0].to(dtype)
    figures: dict = {"batch": batch, "seq_len": seq_len, "block_parameters": sum(p.numel() for p in block.parameters()),
                     "seed": HSPMN_SEED}
    x = torch.randn(batch, seq_len, block.mixer_norm.weight.numel(), device=device, dtype=dtype)
    positions = torch.arange(seq_len, device=device)

    def forward():
        with torch.no_grad():
            block(x, positions)

    def train_step():
        y, aux = block(x, positions)  # the layer's output and its auxiliary losses
        (y.float().square().mean() + sum(aux.values())).backward()

    block.eval()
    attempt(figures, "forward", device, lambda: {
        "tokens_per_s": batch * seq_len / timed(forward, device, steps, warmup=1)}, deadline)
    block.train()
    attempt(figures, "forward_backward", device, lambda: {
        "tokens_per_s": batch * seq_len / timed(train_step, device, steps, warmup=1)}, deadline)
    for part, seed_key in (("forward", "forward_tokens_per_s"), ("forward_backward", "train_tokens_per_s")):
        if part in figures:
            figures[part]["of_seed_claim"] = figures[part]["tokens_per_s"] / HSPMN_SEED[seed_key]
    return figures


def parity(prepared, dry_run: bool) -> dict:
    """bench/decode.py's logit check at batch 1 after a 128-token prompt, 16 greedy steps: bf16, then float32."""
    config = prepared.config
    model_module = prepared.package.model
    if hasattr(model_module, "USE_KERNELS"):
        model_module.USE_KERNELS = True
    with torch.device(config.device):
        model = prepared.package.Model().to(prepared.dtype).eval()
    prompt = torch.randint(0, model.lm_head.weight.size(0), (1, config.prompt_len), device=config.device)
    figures: dict = {}
    attempt(figures, "bf16" if not dry_run else config.dtype, config.device,
            lambda: logit_parity(model, prompt, 16, config.device))
    if not dry_run:
        model.float()
        attempt(figures, "float32", config.device, lambda: logit_parity(model, prompt, 16, config.device))
    return figures


def kernels_in_this_run(bench, variant: str) -> None:
    """A reference variant's figures get (a)'s from the same run where (a) did not measure them there: training at the
    reference's shape when (a) did not train at it (the references start smaller and may shrink to fit, see
    REFERENCE_TRAIN_SHAPES), and prefill when (a) was not measured in this run (a compiled variant run on its own).
    One fresh (a) model measures both, once for (b) and (c): the ratios' same-run peer."""
    variants = bench.result.variants
    figures, kernels = variants[variant], variants.get("kernels", {})
    train, prefill = figures.get("train"), figures.get("prefill")
    shape = (train["batch"], train["seq_len"]) if train is not None else None
    if shape == (kernels.get("train", {}).get("batch"), kernels.get("train", {}).get("seq_len")):
        shape = None
    need_prefill = prefill is not None and "prefill" not in kernels
    for other in variants.values():  # the other reference variant's peer, from this run
        peer = other.get("train", {}).get("kernels_at_this_shape", {})
        if shape is not None and (peer.get("batch"), peer.get("seq_len")) == shape:
            train["kernels_at_this_shape"], shape = peer, None
        peer = other.get("prefill", {}).get("kernels_in_this_run")
        if need_prefill and peer is not None:
            prefill["kernels_in_this_run"], need_prefill = peer, False
    if shape is None and not need_prefill:
        return
    peer = measure_peer(bench, "kernels", shape, need_prefill)
    for part, figure, key in (("train", train, "kernels_at_this_shape"), ("prefill", prefill, "kernels_in_this_run")):
        if part == "train" and shape is None or part == "prefill" and not need_prefill:
            continue
        figure[key] = peer.get(part) or {k: v for k, v in peer.items() if k.startswith(part)}  # or what failed


def bar_rows(name: str, entry: dict, command: str) -> list[dict]:
    """The figures issue 12 sets bars for, in bench/results/bars.json's form (ratio > 1: archgen is better)."""
    rows = []
    date = datetime.date.today().isoformat()
    variants = entry.get("variants", {})
    kernels = variants.get("kernels", {})
    peer = entry.get("transformers", {})

    def row(figure, archgen, unit, reference, reference_value, ratio, bar):
        rows.append({"figure": figure, "archgen": archgen, "unit": unit, "reference": reference,
                     "reference_value": reference_value, "ratio": ratio, "bar": bar, "device": entry["device"], "date": date,
                     "command": command})

    decode = kernels.get("decode_batch_1")
    if decode:
        row(f"{name} batch-1 decode vs HBM floor", decode["ms_per_token"], "ms/token", "weight + cache bytes / copy bandwidth",
            decode["floor_ms_per_token"], decode["floor_ms_per_token"] / decode["ms_per_token"], 0.5)
        if "decode_batch_1" in peer:
            peer_ms = peer["decode_batch_1"]["ms_per_token"]
            row(f"{name} batch-1 decode vs transformers", decode["ms_per_token"], "ms/token",
                f"transformers {peer['version']} generate", peer_ms, peer_ms / decode["ms_per_token"], 20.0)
    train = kernels.get("train")
    if train and train.get("mfu") is not None:  # None: the measured matmul rate was no peak (archgen.benchmark.add_mfu)
        row(f"{name} training MFU, {train['batch']} x {train['seq_len']} tokens", train["mfu"],
            "fraction of measured bf16 matmul rate", "bf16 matmul rate", entry["matmul_flops_per_s"], train["mfu"], 0.4)
    prefill = kernels.get("prefill")
    if prefill and "prefill" in peer:
        peer_rate = peer["prefill"]["tokens_per_s"]
        row(f"{name} prefill vs transformers", prefill["tokens_per_s"], "tokens/s", f"transformers {peer['version']} forward",
            peer_rate, prefill["tokens_per_s"] / peer_rate, 1.5)
    # (a) at least as good as (b) and (c) on every figure both measured, training at the shape (b) or (c) fitted
    for other in ("reference", "compiled"):
        figures = variants.get(other, {})
        if "train" in figures:
            train = figures["train"]
            peer = train.get("kernels_at_this_shape", kernels.get("train", {}))
            if "tokens_per_s" in peer:
                row(f"{name} train tokens/s at {train['batch']} x {train['seq_len']}, kernels vs {other}",
                    peer["tokens_per_s"], "tokens/s", f"the same package, {other}", train["tokens_per_s"],
                    peer["tokens_per_s"] / train["tokens_per_s"], 1.0)
        kernels_prefill = kernels.get("prefill") or figures.get("prefill", {}).get("kernels_in_this_run", {})
        if "tokens_per_s" in kernels_prefill and "prefill" in figures:
            row(f"{name} prefill tokens/s, kernels vs {other}", kernels_prefill["tokens_per_s"], "tokens/s",
                f"the same package, {other}", figures["prefill"]["tokens_per_s"],
                kernels_prefill["tokens_per_s"] / figures["prefill"]["tokens_per_s"], 1.0)
        for batch in entry["config"]["decode_batches"]:
            part = f"decode_batch_{batch}"
            if part in kernels and part in figures:
                row(f"{name} batch-{batch} decode, kernels vs {other}", kernels[part]["ms_per_token"], "ms/token",
                    f"the same package, {other}", figures[part]["ms_per_token"],
                    figures[part]["ms_per_token"] / kernels[part]["ms_per_token"], 1.0)
    return rows


def headlines(results: dict) -> dict:
    """The seeds' claims beside what this run measured."""
    out: dict = {}
    if "figures" in results["models"].get("hspmn_block", {}):
        out["hspmn_block"] = results["models"]["hspmn_block"]["figures"]
    hns = results["models"].get("hns_ss_jepa_moe_1b", {})
    kernels = hns.get("variants", {}).get("kernels", {})
    if kernels:
        decode = kernels.get("decode_batch_1", {})
        out["hns_ss_jepa_moe_1b"] = {
            "parameters": hns["parameters"], "active_parameters": hns["active_parameters"],
            "seed": f"{HNS_SEED['model']}: >{HNS_SEED['tokens_per_s']:.0f} tokens/s, <{HNS_SEED['ms_per_token']:.0f} ms/token",
            "train_tokens_per_s": kernels.get("train", {}).get("tokens_per_s"),
            "prefill_tokens_per_s": kernels.get("prefill", {}).get("tokens_per_s"),
            "decode_batch_1_ms_per_token": decode.get("ms_per_token"),
            # The arithmetic of the claim at this preset: training at the seed's rate would need this many times the
            # bf16 matmul rate measured in the run (at 100% MFU); a decode step cannot beat the weight + cache bytes
            # over the run's copy bandwidth.
            "seed_training_rate_in_matmul_rates": HNS_SEED["tokens_per_s"] * hns["train_flops_per_token"]
            / hns["matmul_flops_per_s"],
            "decode_batch_1_floor_ms_per_token": decode.get("floor_ms_per_token")}
    return out


def plot_all(results: dict, prepared: dict, path: Path) -> None:
    """One PNG, a row per model: decode ms/token per variant against the floor, and training / prefill tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    names = [name for name in prepared if prepared[name].result.variants]
    if not names:
        return
    figure, axes = pyplot.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for (decode_axis, throughput_axis), name in zip(axes, names, strict=True):
        plot_into(prepared[name].result, decode_axis, throughput_axis)
        decode_axis.set_title(f"{name}: decoding")
    figure.suptitle(f"archgen whole-model benchmark, {results['device']}, {results['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--only", default=None, help="comma-separated names: " + ", ".join([*MODELS, "hspmn_block"]))
    parser.add_argument("--variants", default="kernels,reference,compiled,transformers",
                        help="comma-separated: kernels (with the logit check), reference, compiled, kernels_compiled, "
                             "kernels_graphed, transformers")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated parts of each variant (" + ", ".join(PARTS) + "), or VARIANT.PART for one "
                             "variant, which then measures only those: `reference.train,compiled.train,compiled.prefill`")
    parser.add_argument("--no-parity", action="store_true", help="leave out the graph-vs-eager logit check")
    parser.add_argument("--budget-s", type=float, default=330.0, help="no step or part starts after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script only")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/whole_model.py " + " ".join(sys.argv[1:])
    chosen_variants, parts = tuple(args.variants.split(",")), tuple(args.parts.split(","))
    model_variants = tuple(v for v in chosen_variants if v in VARIANTS)
    all_parts = tuple(dict.fromkeys(part for variant in model_variants for part in variant_parts(parts, variant)))
    with_parity = "kernels" in chosen_variants and "decode" in variant_parts(parts, "kernels") and not args.no_parity
    steps = (*chosen_variants, "hspmn_block", *(["logit_parity"] if with_parity else []))
    plan = plan_steps(args.only.split(",") if args.only else None, steps)
    results: dict = {"date": datetime.date.today().isoformat(), "command": command, "torch": torch.__version__,
                     "device": torch.cuda.get_device_name() if not args.dry_run else "cpu (dry run)",
                     "budget_s": args.budget_s, "models": {}, "steps": []}
    prepared: dict = {}
    bars: list[dict] = []

    def progress(step: str, name: str = "") -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {name}: {step}", flush=True)

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        results["headlines"] = headlines(results)
        (out / "whole_model.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "bars.jsonl").write_text("".join(json.dumps(row) + "\n" for row in bars))

    with tempfile.TemporaryDirectory() as tmp:
        def prepare(name: str, entry: dict):
            """The model's package built and its floors measured, once per run."""
            if name not in prepared:
                config = bench_config(name, args.dry_run, model_variants, all_parts)
                prepared[name] = prepare_bench(config, Path(tmp) / name, lambda s, n=name: progress(s, n))
                entry.update({k: v for k, v in prepared[name].result.to_json().items() if k != "variants"})
                entry["variants"] = prepared[name].result.variants
            return prepared[name]

        for name, step in plan:
            step_parts = variant_parts(parts, step)
            if step in VARIANTS and not step_parts:
                continue  # --parts names none of this variant's
            part_seconds = COMPILED_PART_S.get(name, COMPILED_PART_S["bamba_1b"]) if step in COMPILED_VARIANTS else {}
            estimate = (HNS_ESTIMATE_S if name.startswith("hns") else ESTIMATE_S).get(step, ESTIMATE_S.get(step, 30))
            if part_seconds:  # the step starts when its first part fits; each later part checks its own estimate
                estimate = next((part_seconds[part] for part in PARTS if part in step_parts and part in part_seconds), 0)
            left = deadline - time.perf_counter()
            record = {"model": name, "step": step, "started_s": round(time.perf_counter() - started, 1)}
            results["steps"].append(record)
            if not args.dry_run and left < estimate:
                record["skipped"] = f"{left:.0f} s left of the budget, the step takes about {estimate} s"
                progress(record["skipped"], f"{name} {step}")
                save()
                continue
            entry = results["models"].setdefault(name, {})
            try:
                if step == "hspmn_block":
                    progress("one block at the seed's shape", name)
                    entry["figures"] = hspmn_block(args.dry_run, Path(tmp) / "hspmn_block", deadline)
                elif step == "logit_parity":
                    progress("graph vs eager logits, fed the same tokens", name)
                    entry["logit_parity"] = parity(prepare(name, entry), args.dry_run)
                elif step == "transformers":
                    config = (prepared[name].config if name in prepared
                              else bench_config(name, args.dry_run, model_variants, all_parts))
                    peer_config = DRY_BAMBA_CONFIG if args.dry_run else BAMBA_CONFIG
                    progress("transformers BambaForCausalLM", name)
                    entry["transformers"] = transformers_bamba(config, peer_config, 1 if args.dry_run else 4, deadline)
                else:
                    bench = prepare(name, entry)
                    train_shape = None
                    if step in ("reference", "compiled"):
                        train_shape = DRY_REFERENCE_TRAIN_SHAPE if args.dry_run else REFERENCE_TRAIN_SHAPES.get(name)

                    def part_started(label: str, n: str = name) -> None:
                        progress(label, n)
                        save()  # the parts done so far survive a run stopped from outside

                    figures = bench.result.variants.setdefault(step, {})
                    measure_variant(bench, step, part_started, deadline, train_shape, step_parts, figures,
                                    {} if args.dry_run else part_seconds)
                    if step in ("reference", "compiled"):
                        progress(f"{step}: kernels in this run, at the same shapes", name)
                        kernels_in_this_run(bench, step)
            except Exception as error:  # noqa: BLE001 — one step failing must not lose the others
                record["error"] = describe_error(error)
                progress(record["error"], f"{name} {step}")
            finally:
                free_memory("cpu" if args.dry_run else "cuda")
            record["seconds"] = round(time.perf_counter() - started - record["started_s"], 1)
            bars = [row for model, e in results["models"].items() if "variants" in e for row in bar_rows(model, e, command)]
            save()
        try:
            plot_all(results, prepared, out / "whole_model.png")
        except Exception as error:  # noqa: BLE001
            results["plot_error"] = describe_error(error)
        save()
    sync("cpu" if args.dry_run else "cuda")
    print(json.dumps({"headlines": results["headlines"], "bars": [(r["figure"], round(r["ratio"], 3), r["bar"]) for r in bars],
                      "steps": results["steps"]}, indent=1, default=str)[:8000])


if __name__ == "__main__":
    main()
