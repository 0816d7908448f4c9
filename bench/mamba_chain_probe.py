"""Probe: does a Hymba+ decoding step get shorter when its Mamba branch, the longer of a layer's two, starts first?

Session 20's timeline (bench/results/decode_s20_shipped.h200.json, `fastest_replay_kernels`) put a layer's Mamba
branch (in_proj_conv 9.0, x_proj 3.5, the selective step 4.8, out_proj with the combine 8.2 µs) ~4 µs behind its
attention branch (qkv_rope 7.7, the split-KV attention 9.5, o_proj 5.3), and in every layer in_proj_conv started
~0.7 µs after qkv_rope: the generated decoding_step recorded the attention branch first, and a replay dispatches the
two branches' first kernels in that order. So the layer waits on the branch that starts last. Modes, in one process:

- `<branch>_first` for both orders: the package as generated, and each parallel layer's decoding_step with its two
  `branch_stream` blocks swapped (the same kernels on the same inputs; only the order the graph records the branches
  in changes), from a copy of the generated model.py. The as-built order is the first mode.
- `ssm_first+x_proj_<cfg>`: also x_proj's GEMV (132 × 3200, one row a program over 2,048 columns and 4 warps since
  session 22's run of this probe, 4,096 before; 132 programs) at
  another config, pinned in the package's tuner; `ssm_first+in_proj_<cfg>` in_proj_conv's (6400 × 1600, two rows
  over 2,048 columns, 3,200 programs). In the model, not alone: in_proj_conv shares the GPU with qkv_rope.
- `ssm_first+step_<cfg>`: also the selective step (8 channels a program over 2 warps since session 22's run of this
  probe, 16 over 4 before) at another.
- `ssm_first+out_proj_<cfg>`: also out_proj's combining GEMV (1600 × 3200 with the combine in its tail: 4 rows over
  2,048 columns, 8 warps, 400 programs; kernels/combine_projections.py `launch_config`) at another.
- with `--tail`, only the two orders and `ssm_first+x_proj_tail`: each Mamba layer's decoding step with x_proj in
  in_proj_conv's tail (bench/xproj_tail_probe.py's kernel, which spins: run it in a job of its own). Its logits differ
  from the others within rounding (x_proj's sums in another order).

Each mode is captured anew and timed in alternating rounds (bench/decode.py's greedy loop from the graph), its logits
compared with the first mode's, and the two orders' steady timelines recorded (`steady_timeline`: back-to-back
replays, as the figure times them, where graph_timeline replays from an idle GPU).

    cd bench && python mamba_chain_probe.py --out DIR --budget-s 240            (GPU)
    cd bench && python mamba_chain_probe.py --out DIR --budget-s 80 --tail      (GPU)
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import decode as decode_bench
import torch

GEMV_CONFIGS = {  # (N, K) of the GEMV bucket, then configs other than the one the package runs untuned
    "x_proj": ((132, 3200), {"1x4096w4": (1, 4096, 4), "1x4096w8": (1, 4096, 8), "1x1024w2": (1, 1024, 2)}),
    "in_proj": ((6400, 1600), {"4x1024w4": (4, 1024, 4), "2x1024w2": (2, 1024, 2), "1x2048w2": (1, 2048, 2)}),
}
STEP_CONFIGS = {"16w4": {"BLOCK_D": 16, "num_warps": 4}, "16w2": {"BLOCK_D": 16, "num_warps": 2}}
OUT_PROJ_CONFIGS = {"2x4096w8": (2, 4096, 8), "8x1024w8": (8, 1024, 8)}  # out_proj's (K 3,200) combining GEMV
BRANCH = re.compile(r"^( +)with branch_stream\(x, \d\) as join_(\w+):\n(?:\1 .*\n)+", re.M)
DECODING_STEP = re.compile(r"^    def decoding_step\(.*?(?=^    def |^class |\Z)", re.M | re.S)


def recorded_first(source: str) -> str:
    """The name of the branch the first decoding_step of a generated model.py records first ("attn", "ssm", ...)."""
    step = DECODING_STEP.search(source)
    if step is None:
        raise ValueError("no decoding_step with two branch blocks: is the spec's layout parallel?")
    name = BRANCH.search(step.group(0)).group(2)
    return "ssm" if name == "ssm" else "attn"


def branches_swapped(source: str) -> str:
    """model.py with each decoding_step's two branch_stream blocks in the other order (forward's stay as they are)."""
    pieces, done = [], 0
    for step in DECODING_STEP.finditer(source):
        body = step.group(0)
        first, second = list(BRANCH.finditer(body))[:2]
        if first.end() != second.start():
            raise ValueError("a decoding_step's two branch blocks are not adjacent: the probe cannot swap them")
        swapped = body[:first.start()] + second.group(0) + first.group(0) + body[second.end():]
        pieces += [source[done:step.start()], swapped]
        done = step.end()
    if not pieces:
        raise ValueError("no decoding_step with two branch blocks: is the spec's layout parallel?")
    return "".join(pieces) + source[done:]


def tail_forward(package):
    """Ssm.forward for Hymba+'s decoding steps (batch 1) with x_proj in in_proj_conv's tail (bench/xproj_tail_probe.py's
    kernel), then the package's selective step on its rows; any other call runs the generated forward."""
    from xproj_tail_probe import tail_launch

    generated_forward = package.model.Ssm.forward
    step = package.kernels.state_update_module.mamba_step_low_rank_
    gemv = package.kernels.gemv_module
    counters = {}  # per device, made on the first step (a warm-up, before any capture); the layers run in turn

    def forward(self, x, positions=None, cache=None, pads=None, project=True, input_norm=None):
        if cache is None or x.shape[:2] != (1, 1) or pads is not None or not x.is_cuda:
            return generated_forward(self, x, positions, cache, pads, project, input_norm)
        x = x if input_norm is None else input_norm(x)  # the tail kernel has no folded norm
        if x.device not in counters:  # not setdefault: its zeros would be a launch in every step
            counters[x.device] = torch.zeros(2, dtype=torch.int32, device=x.device)
        counter = counters[x.device]
        config = gemv.shape_config(*self.in_proj.weight.shape, 1, gemv._multiprocessors(x.device))  # in_proj_conv's, untuned
        u, z, projected = tail_launch(x.view(1, -1), self.in_proj.weight, self.conv1d.weight[:, 0], self.conv1d.bias,
                                      cache.conv_state, self.x_proj.weight, counter, config)
        state = self.A_log.shape[1]
        dt, B_ssm, C_ssm = projected.split([self.dt_proj.weight.shape[1], state, state], dim=-1)
        y = step(cache.ssm_state, u, dt, self.dt_proj.weight, self.A_log, B_ssm, C_ssm, self.D, z,
                 self.dt_proj.bias).unsqueeze(1)
        return self.out_proj(y) if project else y

    return forward


def probe_modes(package, tail: bool = False) -> tuple[list[str], object, dict]:
    """(the modes, switch(mode), what the JSON records of them) for a built Hymba+ package: see the module's docstring.
    tail: the two orders and `ssm_first+x_proj_tail` only (a kernel that spins: its own process, its own timeout)."""
    generated = Path(package.model.__file__)
    source = generated.read_text()
    built = recorded_first(source)
    swapped_order = "attn_first" if built == "ssm" else "ssm_first"
    (generated.parent / "model_swapped.py").write_text(branches_swapped(source))
    reordered = importlib.import_module(f"{package.__name__}.model_swapped")
    parallel = [name for name, cls in vars(package.model).items() if isinstance(cls, type) and "decoding_step" in vars(cls)]
    as_built = {name: vars(package.model)[name].decoding_step for name in parallel}
    gemv, state_update = package.kernels.gemv_module, package.kernels.state_update_module
    keys = {name: gemv.shape_key(*shape, 1, torch.bfloat16, False) for name, (shape, _) in GEMV_CONFIGS.items()}
    step_config = dict(state_update.SELECTIVE_STEP_CONFIG)
    combining = package.kernels.combine_projections_module
    combining_config = combining.launch_config
    generated_forward = package.model.Ssm.forward
    with_tail = tail_forward(package) if tail else None

    def out_proj_config(block_n: int, block_k: int, warps: int):
        return lambda N, K: ({"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps} if K == 3200
                             else combining_config(N, K))

    def switch(mode):
        order, _, variant = mode.partition("+")
        for name in parallel:
            chosen = vars(reordered)[name].decoding_step if order == swapped_order else as_built[name]
            getattr(package.model, name).decoding_step = chosen
        for key in keys.values():
            gemv.FORWARD_TUNER.chosen.pop(key, None)
            gemv.FORWARD_TUNER.defaulted.pop(key, None)
        state_update.SELECTIVE_STEP_CONFIG.update(step_config)
        combining.launch_config = combining_config
        package.model.Ssm.forward = generated_forward
        target, _, config = variant.rpartition("_")
        if variant == "x_proj_tail":
            package.model.Ssm.forward = with_tail
        elif target == "out_proj":
            combining.launch_config = out_proj_config(*OUT_PROJ_CONFIGS[config])
        elif target in GEMV_CONFIGS:
            block_n, block_k, warps = GEMV_CONFIGS[target][1][config]
            gemv.FORWARD_TUNER.pin({keys[target]: {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}})
        elif target == "step":
            state_update.SELECTIVE_STEP_CONFIG.update(STEP_CONFIGS[config])

    modes = [f"{built}_first", swapped_order]
    if tail:
        modes.append("ssm_first+x_proj_tail")
    else:
        modes += [*(f"ssm_first+{target}_{config}" for target, (_, configs) in GEMV_CONFIGS.items() for config in configs),
                  *(f"ssm_first+step_{config}" for config in STEP_CONFIGS),
                  *(f"ssm_first+out_proj_{config}" for config in OUT_PROJ_CONFIGS)]
    return modes, switch, {"parallel_classes": parallel, "gemv_keys": keys}


def main() -> None:
    parser = decode_bench.probe_parser(__doc__, 240.0)
    parser.add_argument("--tail", action="store_true", help="the orders and x_proj in in_proj_conv's tail only")
    args = parser.parse_args()
    deadline, results = decode_bench.probe_start(args)
    with decode_bench.probe_model("specs/hymba_plus.yaml") as (package, model, prompt):
        modes, switch, recorded = probe_modes(package, args.tail)
        results.update(recorded)
        with torch.no_grad():
            results.update(decode_bench.rounds_of_modes(model, prompt, modes, switch, args.rounds, deadline))
            for mode in modes[1:] if args.tail else modes[:2]:
                switch(mode)
                decode_bench.drop_graphs(model)
                results[f"steady_timeline_{mode}"] = decode_bench.steady_timeline(model, prompt, 64)
            switch(modes[0])
    (args.out / f"mamba_chain_probe{'_tail' if args.tail else ''}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("_ms_per_token") or k.startswith("logits")}))


if __name__ == "__main__":
    sys.exit(main())
