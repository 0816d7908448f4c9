"""Probe: does a decoding step's first layer wait longer since its positions became a view of the step's position?

Session 20 made a decoding step's positions `start.reshape(1)` (no launch) where they were `start + arange(1)` (two
launches: the arange and the add). The step's timeline then showed ~9.7 µs between the embedding's kernel and the
first RMSNorm in every replay, where the two launches and their gaps had taken ~3.4 µs (bench/results/
decode_s20_*.h200.json, `replay_heads`). This probe builds Hymba+ once and runs the step both ways in one process:
`view` as generated, and `arange`, where the generated model's `torch.is_tensor` answers False (a proxy of torch for
that module alone), so hidden_states takes `start + torch.arange(...)`. Each mode is captured anew and timed in
alternating rounds (bench/decode.py's greedy loop from the graph), with a timeline of each, and the logits compared.

    python bench/positions_view_probe.py --out DIR            (GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import decode as decode_bench
import torch
from harness import command_line, run_metadata

from archgen.benchmark import copy_bandwidth


class _TorchWithoutTensorStarts(types.ModuleType):
    """torch for one generated module, except that is_tensor answers False: its hidden_states takes the arange."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def is_tensor(obj) -> bool:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results = {**run_metadata(command_line(), False), "copy_bandwidth_bytes_per_s": copy_bandwidth("cuda"),
               "rounds": {"view": [], "arange": []}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        package, _ = decode_bench.build("specs/hymba_plus.yaml", None, (), Path(tmp))
        with torch.device("cuda"):
            model = package.Model().to(torch.bfloat16).eval()
        vocab = model.lm_head.weight.size(0)
        prompt = torch.randint(0, vocab, (1, 128), device="cuda")
        g = torch.Generator().manual_seed(12)
        tokens = [torch.randint(0, vocab, (1, 1), generator=g).to("cuda") for _ in range(8)]
        module = package.model
        proxy = _TorchWithoutTensorStarts("torch")
        logits = {}
        started = time.monotonic()
        try:
            with torch.no_grad():
                for round_ in range(args.rounds):
                    for mode in ("view", "arange"):
                        module.torch = proxy if mode == "arange" else torch
                        decode_bench.drop_graphs(model)
                        if mode not in logits:
                            logits[mode] = decode_bench.graph_logits(model, prompt, tokens, "cuda")
                            decode_bench.drop_graphs(model)
                            results[f"timeline_{mode}"] = decode_bench.graph_timeline(model, prompt, 64)
                            decode_bench.drop_graphs(model)
                        ms = decode_bench.step_ms_per_token(model, prompt, 64, "cuda", decode_bench.GRAPH)
                        results["rounds"][mode].append(ms)
                        print(mode, round_, ms, round(time.monotonic() - started), flush=True)
        finally:
            module.torch = torch
    for mode, rounds in results["rounds"].items():
        if rounds:
            results[f"{mode}_ms_per_token"] = min(rounds)
    results["logits_equal"] = all(torch.equal(a, b) for a, b in zip(logits["view"], logits["arange"], strict=True))
    (out / "positions_view_probe.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("_ms_per_token") or k == "logits_equal"}))


if __name__ == "__main__":
    sys.exit(main())
