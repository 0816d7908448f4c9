"""Probe: is a Hymba+ decoding step shorter with the block's RMSNorm folded into its branches' first GEMVs?

Since session 22 a parallel layer whose branches both fold it (Kind.folds_input_norm: in_proj_conv_step_ and
qkv_rope_write_kv_ take the norm's weight) is handed x un-normed, and its decoding step hands mixer_norm to both
branches, whose kernels sum x² beside their products and scale the sums by rstd (kernels/gemv.py, "RMSNorm folded
in"): the norm's launch (~1.6 µs and a ~0.45 µs gap on each layer's chain, session 22's steady timeline) leaves the
step. Modes, in one process:

- `folded`: the package as generated;
- `normed_first`: each parallel layer's decoding_step wrapped to norm x first (the rms_norm kernel, rounded to x's
  dtype) and to hand its branches no norm: the step as it was before the fold, the same kernels otherwise.

Each mode captured anew and timed in alternating rounds (bench/decode.py's greedy loop from the graph); the logits
differ within rounding (the folded norm is not rounded to bf16 before the products). The folded step's steady
timeline is recorded too.

    cd bench && python norm_fold_probe.py --out DIR --budget-s 120        (GPU)
"""

from __future__ import annotations

import json
import sys

import decode as decode_bench
import torch


def probe_modes(package) -> tuple[list[str], object, dict]:
    """(the modes, switch(mode), what the JSON records of them) for a built Hymba+ package."""
    folding = [cls for cls in vars(package.model).values()
               if isinstance(cls, type) and "decoding_step" in vars(cls) and "input_norm" in
               cls.decoding_step.__code__.co_varnames[:cls.decoding_step.__code__.co_argcount]]
    if not folding:
        raise ValueError("no parallel layer folds its input norm: build the package at this commit or later")
    as_built = {cls: cls.decoding_step for cls in folding}

    def normed_first(decoding_step):
        def step(self, x, positions, cache, pads, step, residual, norm, input_norm):
            return decoding_step(self, input_norm(x) if input_norm is not None else x, positions, cache, pads, step,
                                 residual, norm, None)
        return step

    def switch(mode):
        for cls, decoding_step in as_built.items():
            cls.decoding_step = decoding_step if mode == "folded" else normed_first(decoding_step)

    return ["folded", "normed_first"], switch, {"folding_classes": [cls.__name__ for cls in folding]}


def main() -> None:
    parser = decode_bench.probe_parser(__doc__, 120.0)
    args = parser.parse_args()
    deadline, results = decode_bench.probe_start(args)
    with decode_bench.probe_model("specs/hymba_plus.yaml") as (package, model, prompt):
        modes, switch, recorded = probe_modes(package)
        results.update(recorded)
        with torch.no_grad():
            results.update(decode_bench.rounds_of_modes(model, prompt, modes, switch, args.rounds, deadline))
            switch("folded")
            decode_bench.drop_graphs(model)
            results["steady_timeline_folded"] = decode_bench.steady_timeline(model, prompt, 64)
    (args.out / "norm_fold_probe.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("_ms_per_token") or k.startswith("logits")}))


if __name__ == "__main__":
    sys.exit(main())
