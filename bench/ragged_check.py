"""Ragged batches on one GPU: left-padded prompts of different lengths (attention_mask) decode each row exactly as it
decodes alone, through CUDA-graph decoding (the path `generate` takes on CUDA), for every seed spec and the Gated
DeltaNet hybrid at `tiny`, in one run written to one JSON file.

For each spec, in float32 with the kernels the package selects: a batch of 4 prompts of 3, 17, 9 and 5 tokens,
left-padded; the batch's last prompt logits per row against the row alone (relative error, bar 1e-4 on a GPU: TF32
and kernel reductions differ from the CPU's 1e-5), and 16 greedy tokens of `generate(attention_mask=...)` (CUDA
graph) against each row's `generate` alone (CUDA graph) and the batch decoded eagerly (cuda_graph=False). A spec's
failure is recorded and the run goes on; the JSON is rewritten after each spec.

On the GPU machine, from the repository root:
    python bench/ragged_check.py --out "$OUT" --budget-s 90
On a CPU, to exercise the script (eager decoding: CUDA graphs need a GPU):
    python bench/ragged_check.py --dry-run --out /tmp/ragged
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from harness import ROOT, Run

from archgen.testing import build_generated, relative_error

SPECS = {
    "hspmn": ("specs/hspmn.yaml", ()),
    "hymba_plus": ("specs/hymba_plus.yaml", ()),
    "nexus": ("specs/nexus.yaml", ("layout.n_layers=8", "memory.chunk_size=4", "memory.learning_rate=1.0")),
    "hns_ss_jepa_moe": ("specs/hns_ss_jepa_moe.yaml", ()),
    "gated_deltanet_hybrid": ("specs/gated_deltanet_hybrid.yaml", ()),
}
LENGTHS = (3, 17, 9, 5)
NEW_TOKENS = 16
LOGIT_BAR = 1e-4


def check_spec(name: str, spec: str, overrides: tuple[str, ...], device: str, root: Path) -> dict:
    package = build_generated(ROOT / spec, root / name, "tiny", overrides)[0]
    torch.manual_seed(0)
    model = package.Model().to(device).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 256, (n,), generator=generator).to(device) for n in LENGTHS]
    T = max(LENGTHS)
    input_ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, T - len(prompt):], mask[row, T - len(prompt):] = prompt, 1
    graphs = device == "cuda"
    result = {"logit_errors": [], "tokens_equal_alone": [], "graph_equals_eager": None}
    with torch.no_grad():
        batched = model(input_ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None]).logits[0]
            result["logit_errors"].append(relative_error(batched[row, T - len(prompt):], alone))
        start = time.perf_counter()
        decoded = model.generate(input_ids, NEW_TOKENS, temperature=0, attention_mask=mask, cuda_graph=graphs)
        result["batch_generate_s"] = time.perf_counter() - start
        eager = model.generate(input_ids, NEW_TOKENS, temperature=0, attention_mask=mask, cuda_graph=False)
        result["graph_equals_eager"] = bool(torch.equal(decoded, eager))
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], NEW_TOKENS, temperature=0, cuda_graph=graphs)[0, len(prompt):]
            result["tokens_equal_alone"].append(bool(torch.equal(decoded[row, T:], alone)))
    result["ok"] = (max(result["logit_errors"]) <= LOGIT_BAR and all(result["tokens_equal_alone"])
                    and result["graph_equals_eager"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for ragged_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, eager decoding")
    parser.add_argument("--budget-s", type=float, default=90.0, help="stop starting new specs after this many seconds")
    args = parser.parse_args()
    run = Run("ragged_check", args.out, dry_run=args.dry_run or not torch.cuda.is_available(), budget_s=args.budget_s)
    run.meta.update(device=run.meta.get("gpu", "cpu"), cuda_graph=run.device == "cuda", lengths=LENGTHS,
                    new_tokens=NEW_TOKENS, logit_bar=LOGIT_BAR)
    with tempfile.TemporaryDirectory() as root:
        for name, (spec, overrides) in SPECS.items():
            def check(record, name=name, spec=spec, overrides=overrides):
                record.update(check_spec(name, spec, overrides, run.device, Path(root)))

            run.section(name, check).setdefault("ok", False)  # a spec that raised or was skipped


if __name__ == "__main__":
    main()
