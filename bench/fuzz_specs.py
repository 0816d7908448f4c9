"""The long fuzz run: random mutations of the seed specs, each compiled; every valid one also built and run at `tiny`.

    python bench/fuzz_specs.py --mutations 10000 --out bench/results/fuzz_specs.json [--seed 0] [--no-run]

Each case takes one seed spec from specs/, applies one to three mutations (delete a key, replace a value with a
random scalar, list or mapping, rename a key, insert a key, put hostile text in a string, put an edge number in a
number) and compiles it at the `tiny` preset. The outcome is one of:

- `valid`: it compiled, its cost report computed, and the package it builds imports, runs a forward pass and a
  cached decode step with finite logits; `valid_not_run` when it compiled but --no-run or the --run-seconds budget
  (paced evenly over the run) left it unbuilt;
- `refused`: a CompileError whose every diagnostic has a location and a fix;
- a failure: `unlocated` or `no_fix` diagnostics, `crash` (any other exception while compiling), `build_failed`
  (a spec check accepted but build or run failed), or `slow` (over --case-seconds).

The summary (counts, rates, the first examples of every failure kind with their spec text) is rewritten every
--every cases, so a run stopped by a time limit still leaves a summary of what it covered.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archgen.errors import CompileError  # noqa: E402
from archgen.passes.cost import cost_report  # noqa: E402
from archgen.pipeline import compile_spec  # noqa: E402

SEEDS = sorted((ROOT / "specs").glob("*.yaml"))
KEYS = ["schema_version", "name", "model", "mixers", "ffns", "layout", "kind", "d_model", "n_heads", "vocab_size",
        "n_layers", "presets", "ratio", "offset", "heads", "window", "chunk_size", "count", "max_seq_len", "description"]
HOSTILE_TEXT = ["\x00", "\ud800", "\x1b[2J", "\u202e", '"""', "\\", "{{ 7*7 }}", "{% raw %}", "__import__('os')", "\n" * 3,
                "é" * 50, "a" * 5000, "\udcff", "'; import os; '", "\u2028", ""]
EDGE_NUMBERS = [0, -1, 1, 2, 3, 7, 64, 4096, 2**24, 2**24 + 1, 2**31, 10**18, 1.5, -0.0, 1e-300, 1e300, float("inf"),
                float("nan"), True, False, None]


class TooSlow(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise TooSlow(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def paths(node, prefix=()):
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        found.append(prefix + (key,))
        found += paths(value, prefix + (key,))
    return found


def random_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth < 2 and roll < 0.15:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 2 and roll < 0.3:
        return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if roll < 0.55:
        return rng.choice(EDGE_NUMBERS)
    if roll < 0.7:
        return rng.choice(HOSTILE_TEXT)
    return rng.choice(["auto", "none", "attn", "ssm", "mlp", "rmsnorm", "attention", "mamba", "mamba2", "moe", "swiglu", "x"])


def mutate(data: dict, rng: random.Random) -> list[str]:
    done = []
    for _ in range(rng.randint(1, 3)):
        everywhere = paths(data)
        if not everywhere:
            break
        where = rng.choice(everywhere)
        parent = data
        for key in where[:-1]:
            parent = parent[key]
        key = where[-1]
        value = parent[key]
        mutation = rng.choice(["delete", "replace", "rename", "insert", "text", "number"])
        if mutation == "text" and not isinstance(value, str):
            mutation = "replace"
        if mutation == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            mutation = "replace"
        if mutation == "delete":
            del parent[key]
        elif mutation == "replace":
            parent[key] = random_value(rng)
        elif mutation == "rename" and isinstance(parent, dict):
            parent[rng.choice(KEYS)] = parent.pop(key)
        elif mutation == "text":
            text = rng.choice(HOSTILE_TEXT)
            cut = rng.randint(0, len(value))
            parent[key] = value[:cut] + text + value[cut:]
        elif mutation == "number":
            parent[key] = rng.choice([value * 2, value + 1, value - 1, -value, value * 1000, rng.choice(EDGE_NUMBERS)])
        elif isinstance(parent, dict):
            parent[rng.choice(KEYS)] = random_value(rng)
        else:
            parent.insert(key, random_value(rng))
        done.append(f"{mutation} {'.'.join(map(str, where))}")
    return done


def dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def build_and_run(compiled, out_root: Path) -> None:
    import torch

    from archgen.emit import emit, write_package
    from archgen.testing import import_generated

    emitted = emit(compiled, "fuzzed.yaml")
    target = out_root / compiled.resolved.name
    write_package(emitted.files, target)
    package = import_generated(target)
    torch.manual_seed(0)
    model = package.Model().eval()
    vocab = compiled.resolved.model.vocab_size if hasattr(compiled.resolved, "model") else 256
    tokens = torch.randint(0, min(vocab, 256), (2, 5))
    with torch.no_grad():
        logits = model(tokens).logits
        cache = model.empty_cache(2, 16)
        model(tokens[:, :4], cache=cache)
        step = model(tokens[:, 4:], cache=cache).logits
    if not (torch.isfinite(logits).all() and torch.isfinite(step).all()):
        raise FloatingPointError("non-finite logits")


def classify(text: bytes, workdir: Path, run, seconds: float) -> tuple[str, str]:
    spec = workdir / "fuzzed.yaml"
    spec.write_bytes(text)
    try:
        with time_limit(seconds):
            try:
                compiled = compile_spec(spec, "tiny")
                cost_report(compiled.ir, seq_len=64)
            except CompileError as error:
                for diagnostic in error.diagnostics:
                    if diagnostic.location is None or not diagnostic.location.file:
                        return "unlocated", diagnostic.render()
                    if not diagnostic.fix:
                        return "no_fix", diagnostic.render()
                return "refused", error.diagnostics[0].message[:120]
    except TooSlow as error:
        return "slow", f"compile {error}"
    except Exception:
        return "crash", traceback.format_exc(limit=4)[-1500:]
    if not run():
        return "valid_not_run", ""
    try:
        with time_limit(seconds * 3):
            build_and_run(compiled, workdir / "out")
    except TooSlow as error:
        return "slow", f"build and run {error}"
    except Exception:
        return "build_failed", traceback.format_exc(limit=4)[-1500:]
    return "valid", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz_specs.json")
    parser.add_argument("--no-run", action="store_true", help="compile only: do not build and run valid outcomes")
    parser.add_argument("--case-seconds", type=float, default=10.0)
    parser.add_argument("--run-seconds", type=float, default=None,
                        help="time budget for building and running valid outcomes, paced over the run (default: no limit); "
                        "valid outcomes past the pace are counted as valid_not_run")
    parser.add_argument("--every", type=int, default=250, help="rewrite the summary every N cases")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    seeds = {path.stem: yaml.safe_load(path.read_text(encoding="utf-8")) for path in SEEDS}
    outcomes: Counter[str] = Counter()
    by_seed: dict[str, Counter[str]] = {name: Counter() for name in seeds}
    mutations_used: Counter[str] = Counter()
    examples: dict[str, list[dict]] = {}
    refusals: Counter[str] = Counter()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="archgen-fuzz-specs-"))
    run_time = [0.0]  # seconds spent building and running valid outcomes

    def write_summary(done: int, finished: bool) -> None:
        failures = {k: v for k, v in outcomes.items() if k not in ("valid", "valid_not_run", "refused")}
        summary = {
            "command": " ".join(["python", "bench/fuzz_specs.py", *sys.argv[1:]]),
            "seed": args.seed, "mutations_planned": args.mutations, "mutations_done": done, "finished": finished,
            "built_and_run_valid_outcomes": not args.no_run, "seconds": round(time.perf_counter() - started, 1),
            "outcomes": dict(outcomes), "failures": sum(failures.values()),
            "seconds_building_and_running": round(run_time[0], 1),
            "by_seed": {name: dict(counts) for name, counts in by_seed.items()},
            "mutation_kinds": dict(mutations_used),
            "most_common_refusals": refusals.most_common(15),
            "failure_examples": examples,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2, ensure_ascii=True) + "\n", encoding="utf-8")

    for case in range(1, args.mutations + 1):
        name = rng.choice(sorted(seeds))
        data = copy.deepcopy(seeds[name])
        applied = mutate(data, rng)
        mutations_used.update(m.split()[0] for m in applied)
        text = dump(data).encode("utf-8", "surrogatepass")
        def may_run(case: int = case) -> bool:
            if args.no_run:
                return False
            return args.run_seconds is None or run_time[0] < args.run_seconds * case / args.mutations

        before = time.perf_counter()
        outcome, detail = classify(text, workdir, may_run, args.case_seconds)
        if outcome in ("valid", "build_failed") or detail.startswith("build and run"):
            run_time[0] += time.perf_counter() - before
        outcomes[outcome] += 1
        by_seed[name][outcome] += 1
        if outcome == "refused":
            refusals[detail.split(":")[0][:60]] += 1
        elif outcome not in ("valid", "valid_not_run") and len(examples.setdefault(outcome, [])) < 5:
            examples[outcome].append({"case": case, "seed_spec": name, "mutations": applied, "detail": detail,
                                      "spec": text.decode("utf-8", "backslashreplace")[:4000]})
        if case % args.every == 0:
            write_summary(case, False)
            print(f"{case}/{args.mutations}: {dict(outcomes)} ({time.perf_counter() - started:.0f} s)", flush=True)
    write_summary(args.mutations, True)
    print(json.dumps(dict(outcomes)))


if __name__ == "__main__":
    main()
