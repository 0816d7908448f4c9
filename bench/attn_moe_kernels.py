"""Issue 11's kernels on one GPU, in one run: numerics first, then timings against peers measured in the same run.

Sections (each in its own try/except; results and errors go to one JSON file, rewritten after every section):
  floors      copy bandwidth (2 GiB copy_, bytes read + written) and the dense bf16 matmul rate (8192^3)
  attn_num    templates/runtime/attention.py's maskless paths (SDPA causal, FlexAttention and banded sliding window)
              against its masked reference, fp32 (1e-5) and bf16 (1e-2 relative norm vs the fp32 reference), output
              and every gradient, odd sizes; the ring-buffer cache decoding 3x the window against the full forward
  attn        causal GQA, B 4, 32 q / 8 kv heads, L 4096, D 128, bf16: attention() against SDPA's best causal backend
              (flash / cuDNN / efficient, each tried); FLOPs 4*B*H*L^2*D/2 forward, x3.5 forward+backward
  window      sliding window 1024 at that shape: attention(window=1024) (FlexAttention path; also the banded-SDPA
              path) against torch.compile(flex_attention) with a sliding-window block mask built here
  moe_num     templates/runtime/moe.py: the grouped form (torch._grouped_mm in bf16; the per-expert loop in fp32)
              against the fixed-buffer form, output and gradients of x, router logits, w_in, w_out
  moe         the MoE layer end to end (router matmul, softmax/top-k, permute, grouped experts, combine) at 16 experts
              top-2 SwiGLU, d 2048, hidden 8192, 32,768 tokens, Zipf-like routing: router logits = N(0, 1) noise +
              log(1 / (e + 1)) for expert e (Zipf exponent 1 on the logits; the realised tokens-per-expert histogram
              is recorded). Useful FLOPs only: 6*N*k*d*h forward (gate+up and down), x3 forward+backward, against
              the dense matmul rate of `floors`. Peak memory. The fixed-buffer form's forward for context.
  sparse_num  templates/runtime/routing.py: the packed sparse-query path (chunked SDPA; FlexAttention) against the
              masked dense form, fp32 and bf16, every gradient
  sparse      HSPMN sparse-query attention, B 8, 16 heads x 128, L 4096, 20% of queries selected (Bernoulli 0.2
              per token): sparse_query_attention against causal SDPA over ALL queries (best backend)
  hspmn_262k  one generated HSPMN block (specs/hspmn.yaml --preset block, d 2048) in bf16 eval on a 262,144-token
              batch-1 sequence, router bias set so ~20% of tokens are selected: peak memory and tokens/s
  rmsnorm     fused RMSNorm (+ residual) 32768 x 4096 bf16, forward and backward: kernels/rmsnorm.py (when present)
              against the copy bandwidth, Liger-Kernel's LigerRMSNormFunction / LigerFusedAddRMSNormFunction (read:
              liger-kernel 0.8.5), F.rms_norm and torch.compile of a plain RMSNorm

Outputs under --out (default $OUT, else bench/results): attn_moe_kernels.json (everything) and
attn_moe_kernels.bars.json (the bar rows, in bench/results/bars.json's format, to append there).

Run from the repository root on the GPU machine (liger-kernel's wheel carried along, installed --no-deps):
    pip install --no-deps liger_kernel-0.8.5-py3-none-any.whl; python bench/attn_moe_kernels.py --out $OUT
Only some sections:   python bench/attn_moe_kernels.py --only attn,window --out $OUT
On a CPU, tiny shapes, timings meaningless (exercises every code path):
    TRITON_INTERPRET=1 python bench/attn_moe_kernels.py --dry-run --out /tmp/amk
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

from harness import ROOT, Run, load_module, median_ms, package_version, relative_max, relative_norm

SECTIONS = ("floors", "attn_num", "attn", "window", "moe_num", "moe", "sparse_num", "sparse", "hspmn_262k", "rmsnorm")

FULL = {
    "copy_bytes": 2 << 30, "matmul": 8192,
    "attn": {"B": 4, "Hq": 32, "Hkv": 8, "T": 4096, "D": 128}, "window": 1024,
    "num_attn": {"B": 2, "Hq": 8, "Hkv": 2, "T": 1000, "D": 64}, "num_window": 257,
    "moe": {"N": 32768, "E": 16, "k": 2, "d": 2048, "h": 8192}, "num_moe": {"N": 4096, "E": 16, "k": 2, "d": 512, "h": 768},
    "sparse": {"B": 8, "H": 16, "T": 4096, "D": 128}, "num_sparse": {"B": 2, "H": 8, "T": 1500, "D": 64},
    "context": 262144, "rms": (32768, 4096), "reps": 20,
}
TINY = {
    "copy_bytes": 1 << 20, "matmul": 128,
    "attn": {"B": 1, "Hq": 4, "Hkv": 2, "T": 256, "D": 16}, "window": 64,
    "num_attn": {"B": 1, "Hq": 4, "Hkv": 2, "T": 100, "D": 16}, "num_window": 17,
    "moe": {"N": 256, "E": 4, "k": 2, "d": 32, "h": 64}, "num_moe": {"N": 64, "E": 4, "k": 2, "d": 16, "h": 24},
    "sparse": {"B": 2, "H": 4, "T": 256, "D": 16}, "num_sparse": {"B": 2, "H": 4, "T": 200, "D": 16},
    "context": 2048, "rms": (64, 256), "reps": 1,
}


class Bench(Run):
    def __init__(self, out: Path, dry_run: bool, budget_s: float, only: set[str]):
        super().__init__("attn_moe_kernels", out, dry_run=dry_run, budget_s=budget_s)
        import torch

        self.torch = torch
        self.only = only
        self.s = TINY if dry_run else FULL
        self.attn_ops = load_module("amk_attention", "templates/runtime/attention.py")
        self.moe_ops = load_module("amk_moe", "templates/runtime/moe.py")
        self.routing_ops = load_module("amk_routing", "templates/runtime/routing.py")
        self.meta["liger_kernel"] = package_version("liger-kernel")
        self.meta["has_grouped_mm"] = hasattr(torch, "_grouped_mm")

    def section(self, name: str, fn, needs_s: float = 0.0) -> None:
        if not self.only or name in self.only:
            super().section(name, fn, needs_s)

    # -- timing ---------------------------------------------------------------------------------------------------

    def time_ms(self, fn, reps: int | None = None, warmup: int = 2) -> float:
        """Median milliseconds of fn() over reps runs after warm-ups (CUDA events; host clock on the CPU)."""
        return median_ms(fn, self.device, reps or self.s["reps"], warmup)

    def fwd_bwd(self, fn, inputs):
        """A closure running fn(*inputs) forward and backward with a fixed cotangent (grads accumulate; harmless)."""
        torch = self.torch
        cot = {}

        def run():
            y = fn(*inputs)
            if "g" not in cot:
                cot["g"] = torch.randn_like(y)
            y.backward(cot["g"])

        return run

    def peak_reset(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if self.device == "cuda":
            return round(self.torch.cuda.max_memory_allocated() / 2**30, 2)
        return None

    def randn(self, *shape, dtype=None, requires_grad=False, scale=1.0):
        torch = self.torch
        t = torch.randn(*shape, device=self.device, dtype=torch.float32) * scale
        return t.to(dtype or torch.float32).requires_grad_(requires_grad)

    def grads_of(self, fn, inputs, cotangent, dtype):
        """(output, [grad of every input]) of fn on copies of inputs cast to dtype."""
        leaves = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
        y = fn(*leaves)
        y.backward(cotangent.to(y.dtype))
        return y.detach(), [t.grad for t in leaves if t.is_floating_point()]

    def compare(self, record: dict, name: str, fn, reference, inputs, fp32_tol=1e-5, bf16_tol=1e-2,
                dtypes=("fp32", "bf16")) -> None:
        """fn against reference: fp32 against fp32 (max relative 1e-5), bf16 against the fp32 reference (relative
        norm 1e-2), output and every gradient; NaN fails; the verdict goes into record[name]."""
        torch = self.torch
        with torch.no_grad():
            shape = reference(*[t.detach() if t.is_floating_point() else t for t in inputs]).shape
        cot = torch.randn(shape, device=self.device, dtype=torch.float32)
        y_ref, g_ref = self.grads_of(reference, inputs, cot, torch.float32)
        expected = [y_ref, *g_ref]
        names = ["out"] + [f"d{i}" for i in range(len(g_ref))]
        out = {label: {} for label in names}
        for dtype_name in dtypes:
            y, g = self.grads_of(fn, inputs, cot, torch.float32 if dtype_name == "fp32" else torch.bfloat16)
            for label, a, e in zip(names, [y, *g], expected, strict=True):
                finite = bool(torch.isfinite(a).all())
                if dtype_name == "fp32":
                    err, tol, measure = relative_max(a, e), fp32_tol, "fp32_rel_max"
                else:
                    err, tol, measure = relative_norm(a, e), bf16_tol, "bf16_rel_norm"
                out[label][measure] = err
                out[label][f"{dtype_name}_ok"] = finite and err <= tol
        for label in names:
            out[label]["ok"] = all(v for k, v in out[label].items() if k.endswith("_ok"))
        out["ok"] = all(out[label]["ok"] for label in names)
        record[name] = out

    # -- sections -------------------------------------------------------------------------------------------------

    def floors(self, record):
        torch = self.torch
        n = self.s["copy_bytes"] // 2
        src = torch.randn(n, device=self.device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        record["copy_TBps"] = 2 * n * 2 / (ms * 1e-3) / 1e12
        m = self.s["matmul"]
        a = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        ms = self.time_ms(lambda: a @ b)
        record["matmul_TFLOPs"] = 2 * m**3 / (ms * 1e-3) / 1e12
        self.copy_TBps, self.matmul_TFLOPs = record["copy_TBps"], record["matmul_TFLOPs"]

    def _floors(self):
        if not hasattr(self, "copy_TBps"):
            self.floors({})
        return self.copy_TBps, self.matmul_TFLOPs

    def attn_num(self, record):
        torch, A = self.torch, self.attn_ops
        c = self.s["num_attn"]
        B, Hq, Hkv, T, D = c["B"], c["Hq"], c["Hkv"], c["T"], c["D"]
        q, k, v = self.randn(B, Hq, T, D), self.randn(B, Hkv, T, D), self.randn(B, Hkv, T, D)
        pos = torch.arange(T, device=self.device)

        def masked(window):
            return lambda q, k, v: A.masked_attention(q, k, v, q_positions=pos, k_positions=pos, window=window)

        self.compare(record, "causal", lambda q, k, v: A.attention(q, k, v, q_positions=pos, k_positions=pos),
                     masked(None), [q, k, v])
        W = self.s["num_window"]
        self.compare(record, "window_banded", lambda q, k, v: A.banded_sliding_window_attention(q, k, v, W),
                     masked(W), [q, k, v])
        if self.device == "cuda" and A.flex_attention_available():
            self.compare(record, "window_flex_fp32", lambda q, k, v: A.flex_sliding_window_attention(q, k, v, W),
                         masked(W), [q, k, v], dtypes=("fp32",))
            # bf16 at the timing shape: the window section then reuses these compiled kernels
            Bt, Hqt, Hkvt, Tt, Dt = self._attention_shape()
            Wt = self.s["window"]
            qt, kt, vt = self.randn(Bt, Hqt, Tt, Dt), self.randn(Bt, Hkvt, Tt, Dt), self.randn(Bt, Hkvt, Tt, Dt)
            post = torch.arange(Tt, device=self.device)
            self.compare(record, "window_flex_bf16_timing_shape",
                         lambda q, k, v: A.flex_sliding_window_attention(q, k, v, Wt),
                         lambda q, k, v: A.masked_attention(q, k, v, q_positions=post, k_positions=post, window=Wt),
                         [qt, kt, vt], dtypes=("bf16",))
        # ring cache: decode 3 windows past a prefill, one token at a time, against the full forward
        Wr = 16
        Tr = 3 * Wr + 5
        q, k, v = self.randn(B, Hq, Tr, D), self.randn(B, Hkv, Tr, D), self.randn(B, Hkv, Tr, D)
        pos = torch.arange(Tr, device=self.device)
        full = A.attention(q, k, v, q_positions=pos, k_positions=pos, window=Wr)
        ring = A.RingKVCache.empty(B, Hkv, Wr, D, device=self.device)
        k_all, v_all, kp = ring.update(k[:, :, :5], v[:, :, :5], 0)
        outs = [A.attention(q[:, :, :5], k_all, v_all, q_positions=pos[:5], k_positions=kp, window=Wr)]
        for t in range(5, Tr):
            k_all, v_all, kp = ring.update(k[:, :, t : t + 1], v[:, :, t : t + 1], t)
            outs.append(A.attention(q[:, :, t : t + 1], k_all, v_all, q_positions=pos[t : t + 1], k_positions=kp,
                                    window=Wr))
        err = relative_max(torch.cat(outs, dim=2), full)
        record["ring_decode_3x_window"] = {"rel_max": err, "cache_slots": ring.k.shape[2], "ok": err <= 1e-5}

    def _attention_shape(self):
        c = self.s["attn"]
        return c["B"], c["Hq"], c["Hkv"], c["T"], c["D"]

    def attn(self, record):
        torch, A = self.torch, self.attn_ops
        import torch.nn.functional as F

        B, Hq, Hkv, T, D = self._attention_shape()
        dt = torch.bfloat16
        q, k, v = (self.randn(B, h, T, D, dtype=dt, requires_grad=True) for h in (Hq, Hkv, Hkv))
        pos = torch.arange(T, device=self.device)
        flops = 4 * B * Hq * T * T * D / 2

        def ours(q, k, v):
            return A.attention(q, k, v, q_positions=pos, k_positions=pos)

        peers = {}
        backends = {}
        if self.device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}
        for name, backend in backends.items():
            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            try:
                fwd = self.time_ms(lambda: sdpa(q, k, v))
                both = self.time_ms(self.fwd_bwd(sdpa, (q, k, v)))
                peers[name] = {"fwd_ms": fwd, "fwd_bwd_ms": both}
            except Exception as error:  # noqa: BLE001 - a failing peer or section is recorded, never fatal
                peers[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        if not backends:  # dry run: the default dispatch
            def sdpa(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            peers["default"] = {"fwd_ms": self.time_ms(lambda: sdpa(q, k, v)),
                                "fwd_bwd_ms": self.time_ms(self.fwd_bwd(sdpa, (q, k, v)))}
        fwd = self.time_ms(lambda: ours(q, k, v))
        both = self.time_ms(self.fwd_bwd(ours, (q, k, v)))
        record["shape"] = {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D, "dtype": "bf16"}
        record["peers"] = peers
        record["archgen"] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_TFLOPs": flops / fwd / 1e9,
                             "fwd_bwd_TFLOPs": 3.5 * flops / both / 1e9}
        # what the generated packages ran before (explicit (B, 1, T, T) mask)
        def old(q, k, v):
            return A.masked_attention(q, k, v, q_positions=pos, k_positions=pos)
        record["masked_reference_fwd_ms"] = self.time_ms(lambda: old(q, k, v), reps=3)
        ok = {n: p for n, p in peers.items() if "fwd_ms" in p}
        if ok:
            best_f = min(ok, key=lambda n: ok[n]["fwd_ms"])
            best_b = min(ok, key=lambda n: ok[n]["fwd_bwd_ms"])
            rf, rb = flops / ok[best_f]["fwd_ms"] / 1e9, 3.5 * flops / ok[best_b]["fwd_bwd_ms"] / 1e9
            record["best"] = {"fwd": best_f, "fwd_bwd": best_b}
            self.bar("causal GQA attention fwd (B4 32q/8kv L4096 D128 bf16)", record["archgen"]["fwd_TFLOPs"],
                     "TFLOP/s", f"SDPA best causal backend ({best_f})", rf, record["archgen"]["fwd_TFLOPs"] / rf, 0.9)
            self.bar("causal GQA attention fwd+bwd (B4 32q/8kv L4096 D128 bf16)", record["archgen"]["fwd_bwd_TFLOPs"],
                     "TFLOP/s", f"SDPA best causal backend ({best_b})", rb,
                     record["archgen"]["fwd_bwd_TFLOPs"] / rb, 0.9)

    def window(self, record):
        torch, A = self.torch, self.attn_ops
        B, Hq, Hkv, T, D = self._attention_shape()
        W = self.s["window"]
        dt = torch.bfloat16
        q, k, v = (self.randn(B, h, T, D, dtype=dt, requires_grad=True) for h in (Hq, Hkv, Hkv))
        record["shape"] = {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D, "window": W, "dtype": "bf16"}
        record["generated_models_use"] = "flex" if A.USE_FLEX_ATTENTION else "banded_sdpa"

        def banded(q, k, v):
            return A.banded_sliding_window_attention(q, k, v, W)

        def flex(q, k, v):  # the block mask from block indices, as attention() builds it with USE_FLEX_ATTENTION
            return A.flex_sliding_window_attention(q, k, v, W)

        variants = {"archgen_banded_sdpa": banded}
        if self.device == "cuda":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def sliding(b, h, qi, ki):
                return (ki <= qi) & (qi - ki < W)

            mask = create_block_mask(sliding, B=None, H=None, Q_LEN=T, KV_LEN=T, device=self.device)
            compiled = torch.compile(flex_attention)
            variants["archgen_flex"] = flex
            variants["peer_flex"] = lambda q, k, v: compiled(q, k, v, block_mask=mask, enable_gqa=True)
        for name, fn in variants.items():
            try:
                record[name] = {"fwd_ms": self.time_ms(lambda fn=fn: fn(q, k, v))}
                record[name]["fwd_bwd_ms"] = self.time_ms(self.fwd_bwd(fn, (q, k, v)))
            except Exception as error:  # noqa: BLE001 - a failing peer or section is recorded, never fatal
                record.setdefault(name, {})["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            self.write()
        peer = record.get("peer_flex", {})
        for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
            ours = {n: record[n][key] for n in ("archgen_banded_sdpa", "archgen_flex") if key in record.get(n, {})}
            if key in peer and ours:
                best = min(ours, key=ours.get)
                self.bar(f"sliding window 1024 attention {label} (B4 32q/8kv L4096 D128 bf16) [{best}]", ours[best],
                         "ms", "torch.compile(flex_attention), sliding-window block mask", peer[key],
                         peer[key] / ours[best], 1.0)

    def moe_num(self, record):
        _torch, M = self.torch, self.moe_ops
        c = self.s["num_moe"]
        N, E, k, d, h = c["N"], c["E"], c["k"], c["d"], c["h"]
        x, logits = self.randn(N, d), self.randn(N, E)
        w_in, w_out = self.randn(E, d, 2 * h, scale=d**-0.5), self.randn(E, h, d, scale=h**-0.5)
        for cf in (None, 1.0):
            def form(f, cf=cf):
                def run(x, logits, w_in, w_out):
                    routing = M.route_top_k(logits, k)
                    y, _ = f(x, routing, w_in, w_out, activation="swiglu", capacity=M.expert_capacity(N, E, k, cf))
                    return y

                return run

            self.compare(record, f"grouped_vs_fixed_cf{cf}", form(M.moe_grouped), form(M.moe_fixed_buffer),
                         [x, logits, w_in, w_out])
        if self.device == "cuda":
            xb, wib, wob = x.bfloat16(), w_in.bfloat16(), w_out.bfloat16()
            record["grouped_mm_taken_bf16"] = M.grouped_mm_available(xb, wib, wob)

    def _zipf_logits(self, N, E):
        torch = self.torch
        bias = -torch.log(torch.arange(1, E + 1, device=self.device, dtype=torch.float32))  # log(1 / (e + 1))
        return self.randn(N, E) + bias

    def moe(self, record):
        torch, M = self.torch, self.moe_ops
        _, rate = self._floors()
        c = self.s["moe"]
        N, E, k, d, h = c["N"], c["E"], c["k"], c["d"], c["h"]
        dt = torch.bfloat16
        x = self.randn(N, d, dtype=dt, requires_grad=True)
        # the router matmul runs (it is part of the layer); small weights, so the added Zipf-like logits decide
        w_router = self.randn(d, E, dtype=dt, requires_grad=True, scale=0.01 * d**-0.5)
        zipf = self._zipf_logits(N, E)
        w_in = self.randn(E, d, 2 * h, dtype=dt, requires_grad=True, scale=d**-0.5)
        w_out = self.randn(E, h, d, dtype=dt, requires_grad=True, scale=h**-0.5)

        def layer(x, w_router, w_in, w_out, form=M.moe_forward):
            logits = (x @ w_router).float() + zipf  # (N, E) the router, plus the imposed Zipf-like preference
            y, _stats = form(x, logits, w_in, w_out, top_k=k)
            return y

        with torch.no_grad():
            _, stats = M.moe_forward(x, (x @ w_router).float() + zipf, w_in, w_out, top_k=k)
        counts = stats["tokens_per_expert"].tolist()
        record["routing"] = {"distribution": "logits N(0,1) + log(1/(e+1)), top-2 of 16, renormalised",
                             "tokens_per_expert": counts, "max_over_mean": max(counts) / (sum(counts) / E)}
        useful = 6 * N * k * d * h
        inputs = (x, w_router, w_in, w_out)
        record["shape"] = c | {"activation": "swiglu", "dtype": "bf16"}
        record["grouped_mm_taken"] = M.grouped_mm_available(x, w_in, w_out)
        record["dense_matmul_TFLOPs"] = rate
        ours = record["archgen"] = {}
        for key, label, mult, run in (("fwd", "fwd", 1, lambda: layer(*inputs)),
                                      ("fwd_bwd", "fwd+bwd", 3, self.fwd_bwd(layer, inputs))):
            self.peak_reset()
            ms = self.time_ms(run)
            tf = mult * useful / ms / 1e9
            ours.update({f"{key}_ms": ms, f"{key}_TFLOPs": tf, f"peak_{key}_GiB": self.peak_gib()})
            self.write()  # a failure in the backward keeps the forward's figures
            self.bar(f"MoE layer {label}, 16 experts top-2 SwiGLU d2048 h8192, 32768 tokens, Zipf-like routing, "
                     "useful FLOPs", tf, "TFLOP/s", "dense bf16 8192^3 matmul rate in the run", rate, tf / rate, 0.6)

        def fixed(x, logits, w_in, w_out, top_k):
            routing = M.route_top_k(logits, top_k)
            return M.moe_fixed_buffer(x, routing, w_in, w_out, activation="swiglu", capacity=N)

        with torch.no_grad():  # what the generated packages ran before, forward only (its backward needs ~50 GiB)
            self.peak_reset()
            record["fixed_buffer_fwd_ms"] = self.time_ms(lambda: layer(x, w_router, w_in, w_out, form=fixed), reps=3)
            record["fixed_buffer_peak_fwd_GiB"] = self.peak_gib()

    def sparse_num(self, record):
        torch, R = self.torch, self.routing_ops
        c = self.s["num_sparse"]
        B, H, T, D = c["B"], c["H"], c["T"], c["D"]
        q, k, v = self.randn(B, H, T, D), self.randn(B, H, T, D), self.randn(B, H, T, D)
        selected = torch.rand(B, T, device=self.device) < 0.2
        pos = torch.arange(T, device=self.device)

        def packed(q, k, v):
            return R.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)

        def masked(q, k, v):
            return R.masked_sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)

        self.compare(record, "packed_chunked_sdpa", packed, masked, [q, k, v])
        if self.device == "cuda":  # FlexAttention (opt-in): bf16 at the timing shape, whose compile `sparse` reuses
            c = self.s["sparse"]
            B, H, T, D = c["B"], c["H"], c["T"], c["D"]
            q, k, v = self.randn(B, H, T, D), self.randn(B, H, T, D), self.randn(B, H, T, D)
            selected_t = self.sparse_selection(B, T)
            pos_t = torch.arange(T, device=self.device)
            R.USE_FLEX_ATTENTION = True
            try:
                self.compare(record, "packed_flex_bf16_timing_shape",
                             lambda q, k, v: R.sparse_query_attention(q, k, v, selected_t, q_positions=pos_t,
                                                                      k_positions=pos_t),
                             lambda q, k, v: R.masked_sparse_query_attention(q, k, v, selected_t, q_positions=pos_t,
                                                                             k_positions=pos_t),
                             [q, k, v], dtypes=("bf16",))
            finally:
                R.USE_FLEX_ATTENTION = False

    def sparse_selection(self, B: int, T: int):
        """Bernoulli(0.2) per token, the same draw every call (so packed shapes, and compiled kernels, repeat)."""
        g = self.torch.Generator(device=self.device).manual_seed(20)
        return self.torch.rand(B, T, device=self.device, generator=g) < 0.2

    def sparse(self, record):
        torch, R = self.torch, self.routing_ops
        import torch.nn.functional as F

        c = self.s["sparse"]
        B, H, T, D = c["B"], c["H"], c["T"], c["D"]
        dt = torch.bfloat16
        q, k, v = (self.randn(B, H, T, D, dtype=dt, requires_grad=True) for _ in range(3))
        selected = self.sparse_selection(B, T)
        pos = torch.arange(T, device=self.device)
        record["shape"] = c | {"selected_fraction": float(selected.float().mean()), "dtype": "bf16"}

        def ours(q, k, v):
            return R.sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)

        def dense(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def masked(q, k, v):
            return R.masked_sparse_query_attention(q, k, v, selected, q_positions=pos, k_positions=pos)

        variants = {"dense_causal_all_queries": dense, "archgen_chunked_sdpa": ours, "masked_reference": masked}
        for name, fn in variants.items():
            record[name] = {"fwd_ms": self.time_ms(lambda fn=fn: fn(q, k, v))}
            if name != "masked_reference":
                record[name]["fwd_bwd_ms"] = self.time_ms(self.fwd_bwd(fn, (q, k, v)))
        if self.device == "cuda":
            R.USE_FLEX_ATTENTION = True
            try:
                record["archgen_flex"] = {"fwd_ms": self.time_ms(lambda: ours(q, k, v)),
                                          "fwd_bwd_ms": self.time_ms(self.fwd_bwd(ours, (q, k, v)))}
            except Exception as error:  # noqa: BLE001 - a failing peer or section is recorded, never fatal
                record["archgen_flex"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            finally:
                R.USE_FLEX_ATTENTION = False
        peer = record["dense_causal_all_queries"]
        for key, label in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd+bwd")):
            candidates = {n: record[n][key] for n in ("archgen_chunked_sdpa", "archgen_flex") if key in record.get(n, {})}
            best = min(candidates, key=candidates.get)
            self.bar(f"HSPMN sparse-query attention {label}, 20% selected (B8 16x128 L4096 bf16) [{best}]",
                     candidates[best], "ms", "causal SDPA over all queries", peer[key], peer[key] / candidates[best],
                     3.0)

    def hspmn_262k(self, record):
        torch = self.torch
        import tempfile

        from tests.conftest import build_package

        T = self.s["context"]
        with tempfile.TemporaryDirectory() as tmp:
            preset = "tiny" if self.dry_run else "block"
            package = build_package(ROOT / "specs/hspmn.yaml", Path(tmp), preset)
            model = package.Model().to(device=self.device, dtype=torch.bfloat16).eval()
            block = model.layers[0]
            d = model.lm_head.weight.shape[1] if hasattr(model, "lm_head") else None
            d = d or block.mixer_norm.weight.shape[0]
            x = self.randn(1, T, d, dtype=torch.bfloat16)
            positions = torch.arange(T, device=self.device)
            context = block.mixer.context
            with torch.no_grad():  # router bias so that ~20% of tokens are selected
                logits = context.router(block.mixer_norm(x[:, :8192])).float().flatten()
                context.router.bias -= torch.quantile(logits, 0.8).to(context.router.bias.dtype)
                selected = (context.router(block.mixer_norm(x)).squeeze(-1).float() > 0).float().mean()
            record["selected_fraction"] = float(selected)
            record["d_model"], record["context"] = d, T
            self.peak_reset()
            with torch.no_grad():
                ms = self.time_ms(lambda: block(x, positions), reps=3, warmup=1)
            record["peak_GiB"] = self.peak_gib()
            record["ms"] = ms
            record["tokens_per_s"] = T / (ms * 1e-3)
            record["seed_claim"] = "262,144-token context at batch 1, d_model 2048, in 11.94 GB"

    def rmsnorm(self, record):
        torch = self.torch
        import torch.nn.functional as F

        copy_TBps, _ = self._floors()
        R, C = self.s["rms"]
        dt = torch.bfloat16
        eps = 1e-6
        kernel = None
        if (ROOT / "kernels/rmsnorm.py").exists():
            try:
                from archgen.resources import kernels_package

                kernels_package()  # this checkout's kernels/ as archgen_kernels (rmsnorm.py imports .triton_support)
                kernel = importlib.import_module("archgen_kernels.rmsnorm")
            except Exception as error:  # noqa: BLE001 - a failing peer or section is recorded, never fatal
                record["kernel_import"] = f"{type(error).__name__}: {error}"
        if kernel is not None:  # numerics: odd sizes, fp32 (1e-5) and bf16 (1e-2), output and every gradient
            xs, rs, ws = self.randn(777, 1000, scale=3.0), self.randn(777, 1000), 1 + 0.1 * self.randn(1000)
            self.compare(record, "numerics_rms_norm", lambda x, w: kernel.rms_norm(x, w, eps),
                         lambda x, w: kernel.rms_norm_reference(x, w, eps), [xs, ws])

            def fused(x, r, w):
                return torch.cat(kernel.add_rms_norm(x, r, w, eps), dim=-1)

            def fused_reference(x, r, w):
                return torch.cat(kernel.add_rms_norm_reference(x, r, w, eps), dim=-1)

            self.compare(record, "numerics_add_rms_norm", fused, fused_reference, [xs, rs, ws])

        x = self.randn(R, C, dtype=dt, requires_grad=True)
        res = self.randn(R, C, dtype=dt, requires_grad=True)
        w = (1 + 0.1 * self.randn(C)).to(dt).requires_grad_()

        def plain(x, w):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)

        variants = {"F.rms_norm": lambda x, w: F.rms_norm(x, (C,), w, eps)}
        if self.device == "cuda":
            variants["torch.compile(plain)"] = torch.compile(plain)
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            variants["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
        except Exception as error:  # noqa: BLE001 - a failing peer or section is recorded, never fatal
            record["liger_import"] = f"{type(error).__name__}: {error}"
        if kernel is not None:
            variants["archgen"] = lambda x, w: kernel.rms_norm(x, w, eps)
        # bytes: forward reads x, writes y; backward reads dy and x, writes dx (w, rstd, dw: negligible)
        fwd_bytes, bwd_bytes = 2 * R * C * 2, 3 * R * C * 2
        for name, fn in variants.items():
            try:
                f = self.time_ms(lambda fn=fn: fn(x, w))
                b = self.time_ms(self.fwd_bwd(fn, (x, w)))
                record[name] = {"fwd_ms": f, "fwd_bwd_ms": b, "fwd_TBps": fwd_bytes / (f * 1e-3) / 1e12,
                                "fwd_bwd_TBps": (fwd_bytes + bwd_bytes) / (b * 1e-3) / 1e12}
            except Exception as error:  # noqa: BLE001 - a failing peer or section is recorded, never fatal
                record[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        # fused residual add: (y, s) = (rmsnorm(x + res), x + res). Bytes: forward reads x, res, writes y, s;
        # backward reads dy, ds_out, s, writes dx (= dres, one tensor)
        fused_variants = {}
        if kernel is not None:
            fused_variants["archgen"] = lambda x, r, w: kernel.add_rms_norm(x, r, w, eps)
        try:
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

            fused_variants["liger"] = lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, eps, 0.0, "llama",
                                                                                         False)
        except Exception as error:  # noqa: BLE001 - a failing peer or section is recorded, never fatal
            record["liger_fused_import"] = f"{type(error).__name__}: {error}"
        fused_variants["eager (x + res, F.rms_norm)"] = lambda x, r, w: (F.rms_norm(x + r, (C,), w, eps), x + r)
        cot = [torch.randn_like(x), torch.randn_like(x)]
        for name, fn in fused_variants.items():
            def run(fn=fn):
                torch.autograd.backward(list(fn(x, res, w)), cot)

            try:
                f = self.time_ms(lambda fn=fn: fn(x, res, w))
                b = self.time_ms(run)
                record[f"add_{name}"] = {"fwd_ms": f, "fwd_bwd_ms": b,
                                         "fwd_TBps": 4 * R * C * 2 / (f * 1e-3) / 1e12,
                                         "fwd_bwd_TBps": (4 + 4) * R * C * 2 / (b * 1e-3) / 1e12}
            except Exception as error:  # noqa: BLE001 - a failing peer or section is recorded, never fatal
                record[f"add_{name}"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        record["copy_TBps"] = copy_TBps
        liger_version = self.meta.get("liger_kernel")
        for prefix, what in (("", "RMSNorm"), ("add_", "RMSNorm + residual add")):
            ours, liger = record.get(f"{prefix}archgen", {}), record.get(f"{prefix}liger", {})
            for key, label in (("fwd_TBps", "fwd"), ("fwd_bwd_TBps", "fwd+bwd")):
                if key not in ours:
                    continue
                self.bar(f"{what} {label} 32768x4096 bf16", ours[key], "TB/s", "copy bandwidth in the run",
                         copy_TBps, ours[key] / copy_TBps, 0.9)
                if key in liger:
                    self.bar(f"{what} {label} 32768x4096 bf16 vs Liger", ours[key], "TB/s",
                             f"Liger-Kernel {liger_version} ({'fused add ' if prefix else ''}RMSNorm)", liger[key],
                             ours[key] / liger[key], 1.0)

    def summary(self) -> str:
        lines = [super().summary()]
        for name, record in self.sections.items():
            bad = [k for k, v in record.items() if isinstance(v, dict) and v.get("ok") is False]
            if bad:
                lines.append(f"NUMERICS FAILED in {name}: {bad}")
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench/results")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, timings meaningless")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting sections after this many seconds")
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    bench = Bench(args.out, args.dry_run, args.budget_s, only)
    # estimated seconds each section needs (compiles included), so a late section is skipped, not cut off
    needs = {"floors": 5, "attn_num": 40, "attn": 20, "window": 60, "moe_num": 10, "moe": 40, "sparse_num": 60,
             "sparse": 60, "hspmn_262k": 40, "rmsnorm": 60}
    for name in SECTIONS:
        bench.section(name, getattr(bench, name), 0 if args.dry_run else needs[name])
    print(bench.summary())
    print(f"wrote {args.out / 'attn_moe_kernels.json'} and {args.out / 'attn_moe_kernels.bars.json'} "
          f"in {bench.elapsed():.0f}s")


if __name__ == "__main__":
    main()
