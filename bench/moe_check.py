"""The MoE layer on one GPU (issue 11): is torch._grouped_mm exact in bf16, does the fused SwiGLU help, and how close
does the layer come to the dense bf16 matmul rate. One process, one JSON file, one bar file.

Sections (each records its own error and the run goes on; the JSON is rewritten after each):
  1. floors: the dense bf16 8192^3 matmul rate and the copy bandwidth, measured in this run.
  2. numerics: every bf16 form of templates/runtime/moe.py's moe_forward against the float32 computation of the same
     math (moe_fixed_buffer in float32 on the float32 master copies), output and every gradient (x, router logits,
     w_in, w_out), relative norm, bar 1e-2. The router logits stay float32 in every form, as the generated model
     passes them (`self.router(tokens).float()`), so all forms route identically. Forms: the per-expert loop, the
     fixed buffer, torch._grouped_mm, each with and without the fused SwiGLU kernel (kernels/swiglu.py). Shapes: one
     with N = 4093 tokens (group sizes not multiples of 8) and one expert that receives no token (its weight
     gradients must be exactly 0: torch._grouped_mm's weight gradient is the 2-D x 2-D form with an empty group).
     Diagnostic, not a bar: the same forms with the router logits rounded to bf16 (what the first GPU run compared,
     relative norm 0.06-0.11): the routing decision flips for near-tied tokens, for the loop as for grouped_mm.
  3. moe: the layer end to end (router matmul, softmax/top-k, permute, experts, combine) at 16 experts top-2 SwiGLU,
     d_model 2048, expert hidden 8192, 32,768 tokens, bf16, Zipf-like routing: logits = router(x) + N(0, 1) -
     s * log(e + 1) for expert e = 0..15 with exponent s = 1 (expected load falls like 1/(e+1), max/mean ~5.6).
     Forms: USE_GROUPED_MM on and off x fused SwiGLU on and off. Forward and forward+backward ms, useful TFLOP/s
     (6 N k d h forward, 3x that forward+backward: only the k assigned experts' matmuls) and that over the dense
     rate (bar 0.6), peak memory; the router's share of the time (what fusing softmax/top-k/aux losses could save);
     a torch.profiler breakdown of the fastest form's forward+backward; and the bf16 forms at this shape against
     the float32 per-expert loop with the same routing (output and every gradient, bar 1e-2).
  4. swiglu: the fused kernel against eager silu(gate) * up at (65,536 rows, 2 x 8,192) bf16, forward and
     forward+backward, ms and GB/s against the copy bandwidth.

Outputs under --out (default $OUT, else bench/results): moe_check.json and moe_check.bars.json (bench/results/
bars.json's row format). The JSON's "verdict" says whether USE_GROUPED_MM (templates/runtime/moe.py) can be turned on.

On the GPU machine, from the repository root (about 60 s on an H200):
    python bench/moe_check.py --out $OUT --budget-s 90
On a CPU, to exercise the script (tiny shapes, Triton's interpreter, torch's CPU _grouped_mm forced):
    python bench/moe_check.py --dry-run --out /tmp/moe_check
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

from harness import ROOT, Run, load_module, median_ms, relative_norm

BF16_BAR = 1e-2  # relative norm against float32 math (issue 11)
RATE_BAR = 0.6  # useful expert FLOP/s over the dense bf16 matmul rate (issue 11)
ZIPF_EXPONENT = 1.0

FULL = {
    "matmul": 8192, "copy_elements": 2**30, "reps": 10,
    "num": [{"N": 4093, "E": 16, "k": 2, "d": 512, "h": 768, "empty_expert": True},
            {"N": 4096, "E": 8, "k": 2, "d": 1024, "h": 1536, "empty_expert": False}],
    "swiglu": {"rows": 65536, "h": 8192},
    "moe": {"N": 32768, "E": 16, "k": 2, "d": 2048, "h": 8192},
}
TINY = {
    "matmul": 128, "copy_elements": 2**20, "reps": 1,
    "num": [{"N": 61, "E": 4, "k": 2, "d": 16, "h": 24, "empty_expert": True}],
    "swiglu": {"rows": 12, "h": 24},
    "moe": {"N": 32, "E": 4, "k": 2, "d": 16, "h": 32},
}
# seconds each section needs at the full shapes (compiles and autotuning included), to stay inside --budget-s
NEEDS_S = {"floors": 3, "numerics": 15, "moe": 45, "swiglu": 15}


class Check(Run):
    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        super().__init__("moe_check", out, dry_run=dry_run, budget_s=budget_s)
        import torch

        self.torch = torch
        self.s = TINY if dry_run else FULL
        # templates/runtime/moe.py by path, as generated packages carry it (ops/moe.py; imports only torch)
        self.moe = load_module("archgen_runtime_moe", "templates/runtime/moe.py")
        self.default_use_grouped_mm = self.moe.USE_GROUPED_MM  # what generated models run; the forms below flip it
        self.meta.update(has_grouped_mm=hasattr(torch, "_grouped_mm"), zipf_exponent=ZIPF_EXPONENT)
        try:
            from archgen.resources import kernels_package

            kernels_package()  # this checkout's kernels/ as archgen_kernels
            self.swiglu_kernel = importlib.import_module("archgen_kernels.swiglu")
        except Exception as error:  # noqa: BLE001 - without triton the torch forms still run
            self.swiglu_kernel = None
            self.meta["swiglu_kernel_error"] = f"{type(error).__name__}: {error}"[:500]

    def section(self, name: str, fn) -> None:
        super().section(name, fn, NEEDS_S[name])

    # -- measuring ------------------------------------------------------------------------------------------------

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_ms(self, fn, warmup: int = 2) -> float:
        """Median milliseconds of fn() (CUDA events on the GPU, the host clock on the CPU)."""
        return median_ms(fn, self.device, self.s["reps"], warmup)

    def peak_reset(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 2) if self.device == "cuda" else None

    def generator(self, seed: int):
        return self.torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, *shape, scale=1.0, generator=None):
        """float32 normal samples on the device (drawn there: 2 GiB of expert weights would take seconds on a CPU)."""
        torch = self.torch
        return torch.randn(*shape, generator=generator, device=self.device, dtype=torch.float32).mul_(scale)

    # -- forms ----------------------------------------------------------------------------------------------------

    def forms(self) -> dict[str, dict]:
        """name -> {"grouped_mm": bool, "fused": bool}: the settings moe_forward runs under."""
        forms = {"loop": {"grouped_mm": False, "fused": False}, "grouped_mm": {"grouped_mm": True, "fused": False}}
        if self.swiglu_kernel is not None:
            forms["loop+fused_swiglu"] = {"grouped_mm": False, "fused": True}
            forms["grouped_mm+fused_swiglu"] = {"grouped_mm": True, "fused": True}
        return forms

    def set_form(self, form: dict) -> None:
        M = self.moe
        M.USE_GROUPED_MM = form["grouped_mm"]
        M.FORCE_GROUPED_MM = form["grouped_mm"] and self.dry_run  # a CPU runs torch's _grouped_mm only when forced

    def moe_forward(self, form: dict, x, logits, w_in, w_out, top_k: int):
        self.set_form(form)
        fused = self.swiglu_kernel.swiglu if form["fused"] else None
        y, stats = self.moe.moe_forward(x, logits, w_in, w_out, top_k=top_k, fused_swiglu=fused)
        return y, stats

    # -- sections -------------------------------------------------------------------------------------------------

    def floors(self, record: dict) -> None:
        torch = self.torch
        n = self.s["matmul"]
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        record["matmul_TFLOPs"] = 2 * n**3 / self.time_ms(lambda: a @ b) / 1e9
        src = torch.empty(self.s["copy_elements"], device=self.device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        record["copy_GBps"] = 2 * src.numel() * 2 / self.time_ms(lambda: dst.copy_(src)) / 1e6

    def numerics(self, record: dict) -> None:
        if self.swiglu_kernel is not None:  # a fixed launch config here: numerics needs no tuning, only compiles
            K = self.swiglu_kernel
            for case in self.s["num"]:
                for dtype in (self.torch.float32, self.torch.bfloat16):
                    key = K.shape_key(case["h"], dtype)
                    for tuner in (K.FORWARD_TUNER, K.BACKWARD_TUNER):
                        tuner.pin({key: K.CONFIGS[2]} if key not in tuner.chosen else {})
        verdict: dict[str, list[bool]] = {}
        for case in self.s["num"]:
            name = f"N{case['N']}_E{case['E']}_k{case['k']}_d{case['d']}_h{case['h']}"
            record[name + ("_empty_expert" if case["empty_expert"] else "")] = out = self.numerics_case(case)
            for form_name, entry in out.items():
                if isinstance(entry, dict):
                    verdict.setdefault(form_name, []).append(entry.get("ok", False))
                    if form_name == "grouped_mm" and entry.get("bf16_path") != "grouped_mm":
                        verdict[form_name].append(False)  # torch._grouped_mm was not what ran
            self.write()
        record["ok_by_form"] = {name: all(oks) for name, oks in verdict.items()}
        grouped_ok = record["ok_by_form"].get("grouped_mm", False)
        self.results["verdict"] = {
            "grouped_mm_exact_in_bf16": grouped_ok,
            "USE_GROUPED_MM": "turn on (templates/runtime/moe.py)" if grouped_ok else "leave off",
            "measured_on": self.meta.get("gpu", "cpu (dry run: says nothing about the GPU)"),
        }

    def numerics_case(self, case: dict) -> dict:
        """Every form at one shape against float32 math: {form: {bf16 relative norms, ok, ...}}."""
        torch, M = self.torch, self.moe
        N, E, k, d, h = case["N"], case["E"], case["k"], case["d"], case["h"]
        g = self.generator(N + E)
        x, logits = self.randn(N, d, generator=g), self.randn(N, E, generator=g)
        if case["empty_expert"]:
            logits[:, E - 1] = -1e4  # expert E-1 receives no token
        w_in = self.randn(E, d, 2 * h, scale=d**-0.5, generator=g)
        w_out = self.randn(E, h, d, scale=h**-0.5, generator=g)
        cot = self.randn(N, d, generator=g)
        out: dict = {}

        def run(fn, dtype, logits_dtype=torch.float32):
            leaves = [x.to(dtype), logits.to(logits_dtype), w_in.to(dtype), w_out.to(dtype)]
            leaves = [t.detach().requires_grad_() for t in leaves]
            y = fn(*leaves)
            y.backward(cot.to(y.dtype))
            return [y.detach(), *(t.grad for t in leaves)]

        def fixed(x_, logits_, w_in_, w_out_):
            routing = M.route_top_k(logits_, k)
            return M.moe_fixed_buffer(x_, routing, w_in_, w_out_, activation="swiglu", capacity=N)[0]

        reference = run(fixed, torch.float32)  # float32 math
        labels = ["out", "d_x", "d_logits", "d_w_in", "d_w_out"]
        candidates = {"fixed_buffer": (None, fixed)}
        for form_name, form in self.forms().items():
            candidates[form_name] = (form, lambda *a, form=form: self.moe_forward(form, *a, top_k=k)[0])
        for form_name, (form, fn) in candidates.items():
            entry = out[form_name] = {}
            try:
                if form is not None:
                    bf = torch.bfloat16
                    entry["bf16_path"] = self.path(form, x.to(bf), w_in.to(bf), w_out.to(bf))
                if "grouped_mm" not in form_name:  # float32 never takes _grouped_mm: one float32 check per form
                    got32 = run(fn, torch.float32)
                    entry["fp32_rel_norm"] = max(relative_norm(a, e) for a, e in zip(got32, reference, strict=True))
                got = run(fn, torch.bfloat16)
                entry["bf16_rel_norm"] = {lab: relative_norm(a, e) for lab, a, e in zip(labels, got, reference, strict=True)}
                entry["finite"] = all(bool(torch.isfinite(t).all()) for t in got)
                if case["empty_expert"]:
                    entry["empty_expert_grads_zero"] = bool((got[3][E - 1] == 0).all() and (got[4][E - 1] == 0).all())
                worst = max(entry["bf16_rel_norm"].values())
                entry["ok"] = entry["finite"] and worst <= BF16_BAR and entry.get("empty_expert_grads_zero", True)
                # the first GPU run's comparison: router logits rounded to bf16 as well (routing flips)
                rounded = run(fn, torch.bfloat16, logits_dtype=torch.bfloat16)
                entry["bf16_logits_diagnostic_rel_norm"] = {lab: relative_norm(a, e) for lab, a, e in
                                                            zip(labels, rounded, reference, strict=True)}
            except Exception as error:  # noqa: BLE001 - one failing form must not hide the others
                entry["error"] = f"{type(error).__name__}: {str(error)[:500]}"
                entry["ok"] = False
        flips = M.route_top_k(logits.bfloat16(), k).expert_index.sort(-1).values
        flips = (flips != M.route_top_k(logits, k).expert_index.sort(-1).values).any(-1).float().mean()
        out["tokens_routed_differently_with_bf16_logits"] = float(flips)
        return out

    def path(self, form: dict, x, w_in, w_out) -> str:
        """Which expert path moe_grouped takes under this form for these tensors: 'grouped_mm' or 'loop'."""
        self.set_form(form)
        return "grouped_mm" if self.moe.grouped_mm_available(x, w_in, w_out) else "loop"

    def swiglu(self, record: dict) -> None:
        torch = self.torch
        if self.swiglu_kernel is None:
            record["skipped"] = "kernels/swiglu.py did not import"
            return
        rows, h = self.s["swiglu"]["rows"], self.s["swiglu"]["h"]
        x = torch.randn(rows, 2 * h, device=self.device, dtype=torch.bfloat16)
        dy = torch.randn(rows, h, device=self.device, dtype=torch.bfloat16)
        copy = self.sections.get("floors", {}).get("copy_GBps")
        record["shape"] = {"rows": rows, "h": h, "dtype": "bf16"}
        variants = {"eager": lambda t: self.moe._activate(t, "swiglu"), "fused": self.swiglu_kernel.swiglu}
        # forward reads 2h and writes h per row; forward+backward adds reading dy and h_in, writing dh
        fwd_bytes, fwd_bwd_bytes = 3 * rows * h * 2, (3 + 5) * rows * h * 2
        for name, fn in variants.items():
            leaf = x.detach().requires_grad_()
            entry = record[name] = {}
            with torch.no_grad():
                entry["fwd_ms"] = self.time_ms(lambda fn=fn: fn(x))

            def fwd_bwd(fn=fn, leaf=leaf):
                fn(leaf).backward(dy)

            entry["fwd_bwd_ms"] = self.time_ms(fwd_bwd)
            entry["fwd_GBps_minimum_traffic"] = fwd_bytes / entry["fwd_ms"] / 1e6
            entry["fwd_bwd_GBps_minimum_traffic"] = fwd_bwd_bytes / entry["fwd_bwd_ms"] / 1e6
            if copy:
                entry["fwd_of_copy"] = entry["fwd_GBps_minimum_traffic"] / copy
                entry["fwd_bwd_of_copy"] = entry["fwd_bwd_GBps_minimum_traffic"] / copy
            self.write()
        record["speedup_fwd"] = record["eager"]["fwd_ms"] / record["fused"]["fwd_ms"]
        record["speedup_fwd_bwd"] = record["eager"]["fwd_bwd_ms"] / record["fused"]["fwd_bwd_ms"]
        leaf = x.detach().requires_grad_()
        y = self.swiglu_kernel.swiglu(leaf)
        y.backward(dy)
        ref_leaf = x.detach().float().requires_grad_()
        y_ref = self.swiglu_kernel.swiglu_reference(ref_leaf)
        y_ref.backward(dy.float())
        record["rel_norm_vs_fp32"] = {"y": relative_norm(y, y_ref), "dh": relative_norm(leaf.grad, ref_leaf.grad)}

    def moe_layer(self, record: dict) -> None:
        torch = self.torch
        c = self.s["moe"]
        N, E, k, d, h = c["N"], c["E"], c["k"], c["d"], c["h"]
        rate = self.sections.get("floors", {}).get("matmul_TFLOPs")
        bf = torch.bfloat16
        g = self.generator(0)
        x = self.randn(N, d, generator=g).to(bf).requires_grad_()
        # small router weights: the imposed Zipf-like preference decides, the router matmul still runs
        w_router = self.randn(d, E, scale=0.01 * d**-0.5, generator=g).to(bf).requires_grad_()
        preference = -ZIPF_EXPONENT * torch.log(torch.arange(1, E + 1, dtype=torch.float32)).to(self.device)
        noise = self.randn(N, E, generator=g) + preference  # (N, E)
        w_in = self.randn(E, d, 2 * h, scale=d**-0.5, generator=g).to(bf).requires_grad_()
        w_out = self.randn(E, h, d, scale=h**-0.5, generator=g).to(bf).requires_grad_()
        useful = 6 * N * k * d * h
        record["shape"] = c | {"activation": "swiglu", "dtype": "bf16"}
        record["routing"] = {"distribution": f"logits = x @ w_router + N(0, 1) - {ZIPF_EXPONENT} * log(e + 1), "
                                             f"top-{k} of {E}, renormalised"}
        record["dense_matmul_TFLOPs"] = rate
        record["generated_models_use"] = {"USE_GROUPED_MM": self.default_use_grouped_mm}

        for form_name, form in self.forms().items():
            def layer(form=form):
                logits = (x @ w_router).float() + noise  # (N, E) the router, plus the imposed preference
                return self.moe_forward(form, x, logits, w_in, w_out, top_k=k)

            entry = record[form_name] = {}
            try:
                with torch.no_grad():
                    _, stats = layer()
                counts = stats["tokens_per_expert"].tolist()
                record["routing"].update({"tokens_per_expert": counts, "max_over_mean": max(counts) / (sum(counts) / E)})
                entry["path"] = self.path(form, x, w_in, w_out)
                cot = torch.randn(N, d, device=self.device, dtype=bf)
                for key, mult, run in (("fwd", 1, lambda layer=layer: layer()),
                                       ("fwd_bwd", 3, lambda layer=layer, cot=cot: layer()[0].backward(cot))):
                    self.peak_reset()
                    ms = self.time_ms(run)
                    entry[f"{key}_ms"] = ms
                    entry[f"{key}_TFLOPs"] = mult * useful / ms / 1e9
                    entry[f"peak_{key}_GiB"] = self.peak_gib()
                    if rate:
                        entry[f"{key}_of_dense"] = entry[f"{key}_TFLOPs"] / rate
                    self.write()
            except Exception as error:  # noqa: BLE001 - a failing form is recorded; the others still run
                entry["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            for t in (x, w_router, w_in, w_out):
                t.grad = None
        self.router_share(record, noise, k)
        self.profile(record, x, w_router, noise, w_in, w_out, k)
        self.numerics_at_timing_shape(record, x, w_router, noise, w_in, w_out, k)
        if rate:
            for key, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
                timed = {n: record[n] for n in self.forms() if f"{key}_TFLOPs" in record.get(n, {})}
                if not timed:
                    continue
                best = max(timed, key=lambda n: timed[n][f"{key}_TFLOPs"])
                tf = timed[best][f"{key}_TFLOPs"]
                self.bar(f"MoE layer {label}, 16 experts top-2 SwiGLU d2048 h8192, 32768 tokens, Zipf-like routing "
                         f"(exponent {ZIPF_EXPONENT:g}), useful FLOPs [{best}]", tf, "TFLOP/s",
                         "dense bf16 8192^3 matmul rate in the run", rate, tf / rate, RATE_BAR)


    def numerics_at_timing_shape(self, record: dict, x, w_router, noise, w_in, w_out, k: int) -> None:
        """The bf16 forms at the timed shape against the float32 per-expert loop on float32 copies, with the same
        (float32) router logits: relative norms of the output and every gradient, bar 1e-2. Large, unbalanced groups
        are where the numerics section's small shapes could miss a tiling problem."""
        torch = self.torch
        logits = ((x @ w_router).float() + noise).detach()
        cot = torch.randn(x.shape, device=self.device, generator=self.generator(1))
        labels = ["out", "d_x", "d_logits", "d_w_in", "d_w_out"]

        def run(form, dtype):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (x, logits, w_in, w_out)]
            leaves[1] = logits.clone().requires_grad_()  # the router logits stay float32, as the model passes them
            y = self.moe_forward(form, *leaves, top_k=k)[0]
            y.backward(cot.to(y.dtype))
            result = [y.detach(), *(t.grad for t in leaves)]
            del leaves, y
            return result

        reference = run({"grouped_mm": False, "fused": False}, torch.float32)
        entry = record["numerics_at_timing_shape"] = {}
        for form_name, form in self.forms().items():
            try:
                got = run(form, torch.bfloat16)
                errors = {lab: relative_norm(a, e) for lab, a, e in zip(labels, got, reference, strict=True)}
                finite = all(bool(torch.isfinite(t).all()) for t in got)
                entry[form_name] = {"bf16_rel_norm": errors, "finite": finite,
                                    "ok": finite and max(errors.values()) <= BF16_BAR}
                del got
            except Exception as error:  # noqa: BLE001 - one failing form must not hide the others
                entry[form_name] = {"error": f"{type(error).__name__}: {str(error)[:500]}", "ok": False}
            self.write()
        del reference
        verdict = self.results.get("verdict")
        if verdict is not None and "grouped_mm" in entry:
            verdict["grouped_mm_exact_at_timing_shape"] = entry["grouped_mm"]["ok"]
            if not entry["grouped_mm"]["ok"]:
                verdict["USE_GROUPED_MM"] = "leave off"

    def profile(self, record: dict, x, w_router, noise, w_in, w_out, k: int) -> None:
        """Where the time of one forward+backward goes, for the fastest form: torch.profiler's kernels by total device
        time (the top 25), so a missed bar comes with the profile that shows why."""
        torch = self.torch
        timed = {n: record[n]["fwd_bwd_ms"] for n in self.forms() if "fwd_bwd_ms" in record.get(n, {})}
        if not timed:
            return
        best = min(timed, key=timed.get)
        form = self.forms()[best]
        cot = torch.randn(x.shape, device=self.device, dtype=x.dtype)

        def step():
            logits = (x @ w_router).float() + noise
            self.moe_forward(form, x, logits, w_in, w_out, top_k=k)[0].backward(cot)

        step()  # warm (autotuning, allocator)
        self.sync()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            self.sync()
        events = prof.key_averages()

        names = ("self_device_time_total", "self_cuda_time_total") if self.device == "cuda" else ("self_cpu_time_total",)

        def device_us(e) -> float:
            return float(next((getattr(e, n) for n in names if hasattr(e, n)), 0.0))

        rows = sorted(events, key=device_us, reverse=True)[:25]
        total = sum(device_us(e) for e in events)
        record["profile_fwd_bwd"] = {
            "form": best, "total_self_ms": total / 1e3,
            "top": [{"name": e.key[:120], "calls": e.count, "self_ms": round(device_us(e) / 1e3, 3),
                     "share": round(device_us(e) / total, 4) if total else None} for e in rows],
        }
        for t in (x, w_router, w_in, w_out):
            t.grad = None

    def router_share(self, record: dict, noise, k: int) -> None:
        """The router's softmax/top-k and its auxiliary losses (load balancing, z-loss), timed alone as the generated
        layer runs them (three passes over the (N, E) logits): what fusing them into one pass could save at most."""
        torch, M = self.torch, self.moe
        E = noise.shape[1]
        logits = noise.detach().clone().requires_grad_()

        def router():
            routing = M.route_top_k(logits, k)
            aux = M.load_balancing_loss(logits, routing.expert_index, E) + M.router_z_loss(logits)
            return routing.expert_weight.sum() + aux

        with torch.no_grad():
            fwd = self.time_ms(router)
        fwd_bwd = self.time_ms(lambda: router().backward())
        entry = record["router_and_aux_losses"] = {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd}
        timed = [record[n] for n in self.forms() if "fwd_ms" in record.get(n, {}) and "fwd_bwd_ms" in record[n]]
        if timed:
            fastest = min(timed, key=lambda r: r["fwd_bwd_ms"])
            entry["share_of_fastest_layer_fwd"] = fwd / fastest["fwd_ms"]
            entry["share_of_fastest_layer_fwd_bwd"] = fwd_bwd / fastest["fwd_bwd_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else bench/results)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    parser.add_argument("--budget-s", type=float, default=90.0, help="skip sections that would run past this")
    args = parser.parse_args()
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench/results")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        os.environ["ARCHGEN_TRITON_ON_CPU"] = "1"  # CPU tensors take the kernel, in the interpreter
    check = Check(out, args.dry_run, args.budget_s)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    check.section("floors", check.floors)
    check.section("numerics", check.numerics)
    check.section("moe", check.moe_layer)  # before the kernel alone: the layer is what the bar is about
    check.section("swiglu", check.swiglu)
    print(json.dumps({"verdict": check.results.get("verdict"), "bars": check.bars}, indent=1))
    print(f"wrote {out / 'moe_check.json'} and {out / 'moe_check.bars.json'} in {check.elapsed():.0f} s")


if __name__ == "__main__":
    main()
