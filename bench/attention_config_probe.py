"""Probe: which split-KV attention config makes a Hymba+ decoding step fastest, in the step rather than alone?

In a Hymba+ layer the attention branch (qkv_rope, then kernels/decode_attention.py's split kernel) and the Mamba
branch (in_proj_conv, x_proj, the selective step) end within ~0.5 µs of each other, ~21 µs after the layer's norm,
and the two output projections start there. The split kernel takes ~10 µs in the step (H200, session 20 timelines)
against ~5.3 alone, where the tuner times its configs (`archgen build --autotune`): in the step it runs beside the
Mamba branch's kernels and the tail of in_proj_conv. An attention branch that ended earlier would let o_proj run
beside the Mamba branch's latency-bound kernels rather than beside out_proj. This probe runs the step with every
config of decode_attention.CONFIGS as the kernel's config for every bucket (the tuner's default swapped, nothing
tuned), each captured anew and timed in alternating rounds in one process (decode.rounds_of_modes), and writes
JSON with each config's ms a token and whether its logits equal the shipped default's.

    python bench/attention_config_probe.py --out DIR            (GPU)
"""

from __future__ import annotations

import json
import sys

import decode as decode_bench
import torch


def main() -> None:
    parser = decode_bench.probe_parser(__doc__, 150.0)
    args = parser.parse_args()
    deadline, results = decode_bench.probe_start(args)
    with decode_bench.probe_model("specs/hymba_plus.yaml") as (package, model, prompt):
        attention = package.kernels.decode_attention_module
        configs = {"default": attention.DEFAULT_CONFIG,
                   **{"BLOCK_S={BLOCK_S},WAVES={WAVES},warps={num_warps}".format(**c): c for c in attention.CONFIGS
                      if c != attention.DEFAULT_CONFIG}}
        results["configs"] = configs

        def switch(mode):
            attention.TUNER.default = configs[mode]
            attention.TUNER.chosen.clear()
            attention.TUNER.defaulted.clear()

        with torch.no_grad():
            results.update(decode_bench.rounds_of_modes(model, prompt, list(configs), switch, args.rounds, deadline))
    (args.out / "attention_config_probe.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("_ms_per_token")}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
