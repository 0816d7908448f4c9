"""Probe: does prefetching a decoding step's next weights into L2, while its chain is latency-bound, shorten it? And
where should a parallel layer's branches be recorded?

Hymba+'s batch-1 step (issue 12) spends ~9 µs a layer in the attention and selective-step kernels, which read ~1.5 MB
between them: HBM idles while they run. The layer's next reads are o_proj's and out_proj's 15.4 MB, then the SwiGLU
pair's 35 MB; the H200's L2 holds 50 MB. A Hopper thread can ask the copy engine beside its SM to bring a range of
global memory into L2 (`cp.async.bulk.prefetch.L2.global`, sm_90), or a line at a time (`prefetch.global.L2`); a few
small programs on a side stream keep the step's chain free of them.

Sections (GPU, CUDA graphs):
- `micro`: out_proj's GEMV (1,600 × 3,200 bf16, 10.2 MB) over 12 distinct weights, each after a spin of S µs, with
  and without the weight prefetched on a side stream at the spin's start: what a GEMV gains from L2 and how much time
  a prefetch needs to land (S = 0, 2, 4, 8 µs), for the bulk prefetch (16 and 64 KB a lane) and the per-line one;
- `model`: Hymba+ built at full size (random weights), decoded as bench/decode.py times it, in modes (MODES) that
  combine a prefetch (PREFETCH: issued from each parallel layer's Mamba branch after in_proj_conv, on a third stream
  joined before the feed-forward, for o_proj and out_proj, plus the first fraction of the SwiGLU pair's rows or, at
  the down projection, the next layer's qkv and in_proj) with a placement of the branches (STREAMS: session 18's
  attention on a side stream and Mamba on the recording one, Mamba on a side stream too, either at the highest
  stream priority) and programmatic dependent launch; each mode captured anew and timed twice, alternating; logits
  compared with the mode off (neither changes any arithmetic: equal bits).

Session 19 (bench/results/l2_prefetch_probe_s19*.h200.json): a GEMV gains ~0.5 µs of its 5 from L2; a bulk
prefetch's programs stay until their copies land (~6 µs a launch); prefetching o_proj and out_proj gains 0.7% a token,
anything of the feed-forward's loses; Mamba on a side stream of its own gains 1.0%, stream priority nothing.

    python bench/l2_prefetch_probe.py --out DIR            (GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

import decode as decode_bench
import torch
import triton
import triton.language as tl
from harness import command_line, graph_us_per_call, run_metadata

from archgen.benchmark import copy_bandwidth
from archgen.resources import kernels_package  # noqa: E402

kernels_package()  # this checkout's kernels/ folder, as archgen_kernels
from archgen_kernels import gemv  # noqa: E402

BULK_ASM = tl.constexpr("""{
.reg .pred p;
setp.gt.s32 p, $2, 0;
@p cp.async.bulk.prefetch.L2.global [$1], $2;
mov.u32 $0, 0;
}""")
LINE_ASM = tl.constexpr("""{
.reg .pred p;
setp.ne.s32 p, $2, 0;
@p prefetch.global.L2::evict_last [$1];
mov.u32 $0, 0;
}""")


@triton.jit
def _prefetch_bulk_kernel(ptr, n_bytes, CHUNK: tl.constexpr):
    lane = tl.arange(0, 32)
    start = (tl.program_id(0) * 32 + lane).to(tl.int64) * CHUNK
    size = tl.minimum(n_bytes - start, CHUNK).to(tl.int32)
    tl.inline_asm_elementwise(BULK_ASM, "=r,l,r", [ptr + start, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_lines_kernel(ptr, n_lines, LINES: tl.constexpr):
    line = tl.program_id(0) * LINES + tl.arange(0, LINES)
    inside = (line < n_lines).to(tl.int32)
    tl.inline_asm_elementwise(LINE_ASM, "=r,l,r", [ptr + line.to(tl.int64) * 128, inside], dtype=tl.int32,
                              is_pure=False, pack=1)


def prefetch(t: torch.Tensor, how: str = "bulk", chunk: int = 16384, fraction: float = 1.0) -> None:
    """Ask L2 for the first `fraction` of t's bytes (t contiguous)."""
    flat = t.view(-1).view(torch.uint8)
    n_bytes = int(flat.numel() * fraction) // 16 * 16
    if n_bytes <= 0:
        return
    if how == "bulk":
        _prefetch_bulk_kernel[(triton.cdiv(n_bytes, 32 * chunk),)](flat, n_bytes, CHUNK=chunk, num_warps=1)
    else:
        lines = triton.cdiv(n_bytes, 128)
        _prefetch_lines_kernel[(triton.cdiv(lines, 1024),)](flat, lines, LINES=1024, num_warps=4)


SPIN_CYCLES_PER_US = 1980.0
"""torch.cuda._sleep's cycles per µs: the H200's boost clock (1.98 GHz); the spins are approximate by design."""


def micro(args) -> dict:
    weights = [torch.randn(1600, 3200, device="cuda", dtype=torch.bfloat16) for _ in range(12)]
    x = torch.randn(1, 3200, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    out: dict = {"cycles_per_us": SPIN_CYCLES_PER_US, "weight_mb": weights[0].numel() * 2 / 1e6, "rows": []}

    def chain(spin_us: float, how: str | None, chunk: int, with_gemv: bool = True):
        def one(i):
            main = torch.cuda.current_stream()
            if how:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    prefetch(weights[i], how, chunk)
            if spin_us:
                torch.cuda._sleep(int(spin_us * SPIN_CYCLES_PER_US))
            if how:
                main.wait_stream(side)
            if with_gemv:
                gemv.linear(x, weights[i])
        return graph_us_per_call(one, len(weights), dry_run=False, rep_ms=40)

    for spin in (0.0, 2.0, 4.0, 8.0):
        spin_only = chain(spin, None, 0, with_gemv=False) if spin else 0.0
        row = {"spin_us": spin, "spin_only_us": spin_only, "plain_us": chain(spin, None, 0)}
        for how, chunk in (("bulk", 16384), ("bulk", 65536), ("lines", 0)):
            key = f"{how}{chunk // 1024 if chunk else ''}"
            try:
                row[f"{key}_us"] = chain(spin, how, chunk)
            except Exception as error:  # noqa: BLE001 — a probe: record and go on
                row[f"{key}_error"] = f"{type(error).__name__}: {str(error)[:800]}"
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


PREFETCH = {  # name -> (how, SwiGLU fraction, next layer's in_proj fraction or None); o_proj and out_proj whole
    "proj": ("bulk", 0.0, None),
    "lines_proj": ("lines", 0.0, None),
    "proj_ffn25": ("bulk", 0.25, None),
    "proj_ffn50": ("bulk", 0.5, None),
    "proj_ffn100": ("bulk", 1.0, None),
    "lines_proj_ffn50": ("lines", 0.5, None),
    "proj_ffn50_next": ("bulk", 0.5, 0.25),  # and, at the down projection's launch, the next layer's qkv and in_proj
}
STREAMS = {  # how a parallel layer's branches are placed: (Mamba on a side stream, attention priority, Mamba priority)
    "default": (False, 0, 0),  # as generated: attention on a side stream, Mamba on the recording stream
    "attn_hi": (False, -5, 0),
    "ssm_side": (True, 0, 0),
    "ssm_hi": (True, 0, -5),
}
MODES = {"off": {}, **{name: {"prefetch": name} for name in PREFETCH},
         "attn_hi": {"streams": "attn_hi"}, "ssm_side": {"streams": "ssm_side"}, "ssm_hi": {"streams": "ssm_hi"},
         "ssm_hi_proj": {"streams": "ssm_hi", "prefetch": "proj"}, "ssm_side_proj": {"streams": "ssm_side", "prefetch": "proj"},
         "ssm_hi_lines_proj": {"streams": "ssm_hi", "prefetch": "lines_proj"},
         "attn_hi_proj": {"streams": "attn_hi", "prefetch": "proj"},
         "ssm_hi_proj_pdl": {"streams": "ssm_hi", "prefetch": "proj", "pdl": True}}


def attention(mixer):
    return mixer.attn if hasattr(mixer, "attn") else mixer.global_attn


def install(package, model) -> tuple[dict, callable]:
    """Wrap the package's Ssm.step (issue the layer's prefetch; join the previous layer's), Mlp.forward (join it)
    and kernels.residual_linear (the next layer's prefetch at the down projection); returns (state, undo)."""
    classes, kernels = package.model, package.kernels
    state = {"mode": "off", "pending": None, "stream": None, "next": None, "streams_set": False}
    per_ssm, per_mlp = {}, {}
    parallel = [layer for layer in model.layers if hasattr(getattr(layer, "mixer", None), "ssm")]
    for layer, following in zip(parallel, parallel[1:] + [None], strict=True):
        mixer = layer.mixer
        per_ssm[id(mixer.ssm)] = (attention(mixer).o_proj.weight, mixer.ssm.out_proj.weight, layer.ffn.gate_proj.weight,
                                  layer.ffn.up_proj.weight)
        if following is not None:
            attn = attention(following.mixer)
            per_mlp[id(layer.ffn)] = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                      following.mixer.ssm.in_proj.weight)
    step, forward, residual_linear = classes.Ssm.step, classes.Mlp.forward, kernels.residual_linear

    def side_stream():
        main = torch.cuda.current_stream()
        if state["stream"] is None:
            state["stream"] = torch.cuda.Stream()
        state["stream"].wait_stream(main)
        state["pending"] = state["stream"]
        return torch.cuda.stream(state["stream"])

    def join():
        if state["pending"] is not None:
            torch.cuda.current_stream().wait_stream(state["pending"])
            state["pending"] = None

    def prefetching_step(self, x, z, cache):
        join()
        mode = PREFETCH.get(MODES[state["mode"]].get("prefetch"))
        if mode is not None and x.is_cuda and id(self) in per_ssm:
            how, fraction, _ = mode
            o_proj, out_proj, gate, up = per_ssm[id(self)]
            with side_stream():
                prefetch(out_proj, how)
                prefetch(o_proj, how)
                if fraction:
                    prefetch(gate, how, fraction=fraction)
                    prefetch(up, how, fraction=fraction)
        return step(self, x, z, cache)

    def joining_forward(self, x, residual=None):
        join()
        state["next"] = per_mlp.get(id(self))
        try:
            return forward(self, x, residual)
        finally:
            state["next"] = None

    def prefetching_residual_linear(x, weight, bias, residual):
        mode = PREFETCH.get(MODES[state["mode"]].get("prefetch"))
        if mode is not None and mode[2] is not None and state["next"] is not None and x.is_cuda:
            q, k, v, in_proj = state["next"]
            with side_stream():
                for w in (q, k, v):
                    prefetch(w, mode[0])
                prefetch(in_proj, mode[0], fraction=mode[2])
        return residual_linear(x, weight, bias, residual)

    decoding = importlib.import_module(f"{package.__name__}.ops.decoding")
    parallel_classes = [classes.AttnSsmParallel, classes.GlobalAttnSsmParallel]
    steps = [cls.decoding_step for cls in parallel_classes]

    def placed_step(self, x, positions, cache, pads, step, residual, norm):
        """The generated decoding_step's branches, each placed as the mode says ("default" is session 18's placement;
        since session 19 the generated step records both branches on side streams, as "ssm_side" does here)."""
        ssm_side, attn_priority, ssm_priority = STREAMS[MODES[state["mode"]].get("streams", "default")]
        forks = decoding.forks_branches(x)
        if forks and not state["streams_set"]:
            state["streams"] = (torch.cuda.Stream(x.device, priority=attn_priority),
                                torch.cuda.Stream(x.device, priority=ssm_priority))
            state["streams_set"] = True

        def placed(branch):
            if not forks:
                return contextlib.nullcontext(lambda: None)
            return decoding._forked(torch.cuda, torch.cuda.current_stream(x.device), state["streams"][branch])

        name = "attn" if hasattr(self, "attn") else "global_attn"
        attn = getattr(self, name)
        combine = kernels.combine_projections_module.ParallelCombine(
            x, residual, getattr(self, f"{name}_norm"), getattr(self, f"{name}_scale"), self.ssm_norm, self.ssm_scale,
            norm)
        with combine:
            with placed(0) as join_attn:
                attn_in = attn(x, positions, cache[name] if cache is not None else None, pads=pads, step=step,
                               project=False)
                combine.project(0, attn_in, attn.o_proj)
            with placed(1) if ssm_side else contextlib.nullcontext(lambda: None) as join_ssm:
                ssm_in = self.ssm(x, positions, cache["ssm"] if cache is not None else None, pads=pads, project=False)
                combine.project(1, ssm_in, self.ssm.out_proj)
            join_ssm()
            join_attn()
        return combine.h, combine.s

    classes.Ssm.step, classes.Mlp.forward = prefetching_step, joining_forward
    kernels.residual_linear = prefetching_residual_linear
    for cls in parallel_classes:
        cls.decoding_step = placed_step

    def undo():
        classes.Ssm.step, classes.Mlp.forward = step, forward
        kernels.residual_linear = residual_linear
        for cls, original in zip(parallel_classes, steps, strict=True):
            cls.decoding_step = original

    return state, undo


def model_ab(args, out_root: Path) -> dict:
    package, _ = decode_bench.build("specs/hymba_plus.yaml", None, (), out_root)
    with torch.device("cuda"):
        model = package.Model().to(torch.bfloat16).eval()
    vocab = model.lm_head.weight.size(0)
    prompt = torch.randint(0, vocab, (1, 128), device="cuda")
    g = torch.Generator().manual_seed(12)
    tokens = [torch.randint(0, vocab, (1, 1), generator=g).to("cuda") for _ in range(8)]
    state, undo = install(package, model)
    out: dict = {"rounds": {mode: [] for mode in args.modes}, "errors": {}}

    def switch(mode):
        state["mode"], state["streams_set"] = mode, False
        decode_bench.set_programmatic_launch(bool(MODES[mode].get("pdl")))
        decode_bench.drop_graphs(model)

    logits = {}
    try:
        with torch.no_grad():
            for round_ in range(2):
                for mode in args.modes:
                    if mode in out["errors"] or time.monotonic() > args.deadline:
                        continue
                    switch(mode)
                    try:
                        if mode not in logits:
                            logits[mode] = decode_bench.graph_logits(model, prompt, tokens, "cuda")
                            decode_bench.drop_graphs(model)
                        ms = decode_bench.step_ms_per_token(model, prompt, 64, "cuda", decode_bench.GRAPH)
                        out["rounds"][mode].append(ms)
                        print(mode, round_, ms, flush=True)
                    except Exception as error:  # noqa: BLE001
                        out["errors"][mode] = f"{type(error).__name__}: {str(error)[:1500]}"
                        print(mode, out["errors"][mode], flush=True)
            best = min(args.modes, key=lambda m: min(out["rounds"][m]) if out["rounds"][m] else 1e9)
            if best != "off" and time.monotonic() < args.deadline:
                switch(best)
                out["timeline_" + best] = decode_bench.graph_timeline(model, prompt, 64)
    finally:
        undo()
        decode_bench.set_programmatic_launch(None)
    for mode, rounds in out["rounds"].items():
        if rounds:
            out[f"{mode}_ms_per_token"] = min(rounds)
    if "off" in logits:
        out["logits_equal_to_off"] = {m: all(torch.equal(a, b) for a, b in zip(logits["off"], v, strict=True))
                                      for m, v in logits.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="micro,model")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--budget-s", type=float, default=240.0)
    args = parser.parse_args()
    args.deadline = time.monotonic() + args.budget_s
    args.modes = args.modes.split(",")
    results = {**run_metadata(command_line(), False), "copy_bandwidth_bytes_per_s": copy_bandwidth("cuda")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "l2_prefetch_probe.json").write_text(json.dumps(results, indent=2))

    import tempfile

    for section in args.sections.split(","):
        try:
            if section == "micro":
                results["micro"] = micro(args)
            elif section == "model":
                with tempfile.TemporaryDirectory() as tmp:
                    results["model"] = model_ab(args, Path(tmp))
        except Exception as error:  # noqa: BLE001
            results[f"{section}_error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        save()
    print(json.dumps({k: v for k, v in results.items() if k != "model"}, indent=2)[:4000])


if __name__ == "__main__":
    sys.exit(main())
