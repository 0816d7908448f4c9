"""Probe: which of a decoding step's kernels gain from programmatic dependent launch (PDL)?

PDL lets a kernel's programs start while the kernel ahead of it in the stream still runs: each prefetches its first
weight tile into L2, then waits (gdc_wait) for that kernel's results. Every kernel file that supports it asks
triton_support.programmatic_launch at each launch, and one switch turns it on for all of them; measured that way it
was 1.6% faster on Hymba+ and 7% slower on Bamba-1B in session 18, and 3.0% slower on Hymba+ in session 20 (after
both branches moved to side streams). This probe turns it on for some kernel files only (each file imported
programmatic_launch by name, so its module attribute is what its launches call), captures the step anew and times it,
in alternating rounds in one process (decode.rounds_of_modes), on Hymba+ and on Bamba-1B (MODES):

- `off`, `all`: the switch off, and on for every file;
- `<file>`: PDL on for that kernel file's launches only;
- `gemvs`: the GEMV files together (gemv, combine_projections, in_proj_conv, qkv_rope).

It writes JSON with each mode's ms a token (the greedy loop from the graph, bench/decode.py's figure), and whether
each mode's logits equal the off mode's (PDL changes no arithmetic). Session 20 also measured a trigger placed after
the GEMV loops (commit 8b0ddb3, bench/results/pdl_subsets_probe_s20_triggers.h200.json): slower, and removed.

    python bench/pdl_subsets_probe.py --out DIR            (GPU)
"""

from __future__ import annotations

import json
import sys

import decode as decode_bench
import torch

FILES = ("gemv", "combine_projections", "rmsnorm", "in_proj_conv", "qkv_rope", "state_update", "causal_conv1d",
         "normalized_mean")
GEMVS = ("gemv", "combine_projections", "in_proj_conv", "qkv_rope")
MODES = {"off": (), "all": FILES, **{name: (name,) for name in FILES}, "gemvs": GEMVS}
"""mode -> the kernel files that launch programmatically; the others launch without PDL."""
SPECS = {"hymba_plus": "specs/hymba_plus.yaml", "bamba_1b": "bench/specs/bamba_1b.yaml"}


def modules_of(package) -> dict:
    """The generated package's kernel modules by file name (kernels.<file>_module)."""
    return {name: getattr(package.kernels, f"{name}_module") for name in FILES
            if getattr(package.kernels, f"{name}_module", None) is not None}


def switch_to(modules: dict, originals: dict, mode: str) -> None:
    """PDL allowed in the process, then each module's programmatic_launch forced off unless the mode names it."""
    on = MODES[mode]
    decode_bench.set_programmatic_launch(bool(on))
    for name, module in modules.items():
        module.programmatic_launch = originals[name] if name in on else (lambda device: False)


def model_rounds(spec: str, modes: list[str], rounds: int, deadline: float) -> dict:
    """One model's modes (decode.rounds_of_modes)."""
    with decode_bench.probe_model(spec) as (package, model, prompt):
        modules = modules_of(package)
        originals = {name: module.programmatic_launch for name, module in modules.items()}
        try:
            with torch.no_grad():
                out = decode_bench.rounds_of_modes(model, prompt, modes,
                                                   lambda mode: switch_to(modules, originals, mode), rounds, deadline)
        finally:
            decode_bench.set_programmatic_launch(None)
        out["files"] = sorted(modules)
        del model
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = decode_bench.probe_parser(__doc__, 200.0)
    parser.add_argument("--models", default=",".join(SPECS))
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    deadline, results = decode_bench.probe_start(args)
    for name in args.models.split(","):
        results[name] = model_rounds(SPECS[name], args.modes.split(","), args.rounds, deadline)
        (args.out / "pdl_subsets_probe.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({name: {k: v for k, v in results[name].items() if k.endswith("_ms_per_token")}
                      for name in args.models.split(",")}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
