"""Probe: is a Hymba+ decoding step shorter with the block's RMSNorm folded into its branches' first GEMVs?

Since session 22 a parallel layer whose branches both fold it (Kind.folds_input_norm: in_proj_conv_step_ and
qkv_rope_write_kv_ take the norm's weight) is handed x un-normed, and its decoding step hands mixer_norm to both
branches, whose kernels sum x² beside their products and scale the sums by rstd (kernels/gemv.py, "RMSNorm folded
in"): the norm's launch (~1.6 µs and a ~0.45 µs gap on each layer's chain, session 22's steady timeline) leaves the
step. Modes, in one process:

- `folded`: the package as generated;
- `normed_first`: each parallel layer's decoding_step wrapped to norm x first (the rms_norm kernel, rounded to x's
  dtype) and to hand its branches no norm: the step as it was before the fold, the same kernels otherwise;
- `folded+in_proj_<cfg>`: folded, with the folded in_proj_conv's bucket (6400 × 1600, `-norm`) pinned to another
  tile. At the GEMV's 2 rows of 2,048 columns each of its 3,200 programs read x and the norm's weight from L2, 6.4 KB
  for 6.4 KB of weights: in_proj_conv took 11.0 µs folded against ~8.0 normed first, and the step was no shorter
  (session 22's first run, when the folded kernel ran the GEMV's bucket). Its own default since: 4 × 1,024.

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

IN_PROJ = (6400, 1600)  # Hymba+'s in_proj (N, K)
IN_PROJ_CONFIGS = {"2x2048w4": (2, 2048, 4), "4x2048w8": (4, 2048, 8), "8x1024w8": (8, 1024, 8)}


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

    gemv = package.kernels.gemv_module
    key = gemv.shape_key(*IN_PROJ, 1, torch.bfloat16, False) + "-norm"  # in_proj_conv's folded bucket

    def switch(mode):
        base, _, variant = mode.partition("+")
        for cls, decoding_step in as_built.items():
            cls.decoding_step = decoding_step if base == "folded" else normed_first(decoding_step)
        gemv.FORWARD_TUNER.chosen.pop(key, None)
        gemv.FORWARD_TUNER.defaulted.pop(key, None)
        if variant:
            block_n, block_k, warps = IN_PROJ_CONFIGS[variant.removeprefix("in_proj_")]
            gemv.FORWARD_TUNER.pin({key: {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}})

    modes = ["folded", "normed_first", *(f"folded+in_proj_{config}" for config in IN_PROJ_CONFIGS)]
    return modes, switch, {"folding_classes": [cls.__name__ for cls in folding], "in_proj_key": key}


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
