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

import json
import math
import sys
import types

import decode as decode_bench
import torch


class _TorchWithoutTensorStarts(types.ModuleType):
    """torch for one generated module, except that is_tensor answers False: its hidden_states takes the arange."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def is_tensor(obj) -> bool:
        return False


def main() -> None:
    args = decode_bench.probe_parser(__doc__, math.inf).parse_args()
    deadline, results = decode_bench.probe_start(args)
    with decode_bench.probe_model("specs/hymba_plus.yaml") as (package, model, prompt):
        module, proxy = package.model, _TorchWithoutTensorStarts("torch")

        def switch(mode):
            module.torch = proxy if mode == "arange" else torch

        with torch.no_grad():
            results.update(decode_bench.rounds_of_modes(model, prompt, ["view", "arange"], switch, args.rounds, deadline,
                                                        timeline=("view", "arange")))
    (args.out / "positions_view_probe.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("_ms_per_token") or k.startswith("logits")}))


if __name__ == "__main__":
    sys.exit(main())
