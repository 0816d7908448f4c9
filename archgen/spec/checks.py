"""Shape guards: rules that relate several fields of a validated spec. Every rule that fails adds a Diagnostic with
its spec path and a fix that names acceptable values; all rules run, so a person sees every problem at once.
"""

from __future__ import annotations

import keyword

from archgen.errors import Diagnostic
from archgen.spec import models


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_spec(spec: models.Spec) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    d_model = spec.model.d_model
    for family in ("mixers", "ffns", "heads"):
        for name in getattr(spec, family):
            if name in models.RESERVED_NAMES or keyword.iskeyword(name) or name.startswith("_"):
                problems.append(Diagnostic(f"{family}.{name}", f"'{name}' is reserved and cannot name a component",
                                           f"rename it, e.g. '{name}_{family[:-1]}'"))
    for name, mixer in spec.mixers.items():
        path = f"mixers.{name}"
        if isinstance(mixer, (models.AttentionSpec, models.SparseAttentionSpec)):
            problems += _check_attention(mixer, path, d_model)
        elif isinstance(mixer, models.Mamba2Spec):
            problems += _check_mamba2(mixer, path, d_model)
        elif isinstance(mixer, models.MambaSpec) and mixer.dt_min >= mixer.dt_max:
            problems.append(Diagnostic(f"{path}.dt_min", f"dt_min={mixer.dt_min} must be below dt_max={mixer.dt_max}",
                                       "swap them, or use the defaults 0.001 and 0.1"))
    for name, ffn in spec.ffns.items():
        path = f"ffns.{name}"
        if isinstance(ffn, models.MLPSpec):
            problems += _check_ffn_shape(ffn, path)
        elif isinstance(ffn, models.MoESpec):
            problems += _check_ffn_shape(ffn.expert, f"{path}.expert")
            if ffn.expert.bias:
                problems.append(Diagnostic(f"{path}.expert.bias",
                                           "biases in routed experts are not supported "
                                           "(the experts run as stacked weight matmuls)",
                                           "remove expert.bias, or set it to false"))
            if ffn.top_k > ffn.n_experts:
                problems.append(Diagnostic(f"{path}.top_k", f"top_k={ffn.top_k} exceeds n_experts={ffn.n_experts}",
                                           f"use top_k between 1 and {ffn.n_experts}"))
    if spec.symbolic is not None:
        declared = set(spec.symbolic.predicates)
        for i, rule in enumerate(spec.symbolic.rules):
            for field, names in (("premises", rule.premises), ("conclusion", [rule.conclusion])):
                for predicate in names:
                    if predicate not in declared:
                        problems.append(Diagnostic(f"symbolic.rules[{i}].{field}", f"predicate '{predicate}' is not declared",
                                                   f"add it to symbolic.predicates ({', '.join(sorted(declared))})"))
    for name, head in spec.heads.items():
        if isinstance(head, models.ForecasterHeadSpec) and head.value_range[0] >= head.value_range[1]:
            problems.append(Diagnostic(f"heads.{name}.value_range", f"value_range {list(head.value_range)} is empty",
                                       "write [low, high] with low < high, e.g. [-15, 15]"))
        if isinstance(head, models.ForecasterHeadSpec) and head.n_bins > spec.model.vocab_size:
            # The series are fed back as the last n_bins token ids of the vocabulary.
            problems.append(Diagnostic(f"heads.{name}.n_bins",
                                       f"n_bins={head.n_bins} exceeds model.vocab_size={spec.model.vocab_size}: "
                                       "each bin is read back as one of the vocabulary's token ids",
                                       f"use n_bins of at most {spec.model.vocab_size}, or a larger vocabulary"))
    kinds = [head.kind for head in spec.heads.values()]
    for kind in sorted(set(kinds)):
        if kinds.count(kind) > 1:
            problems.append(Diagnostic("heads", f"{kinds.count(kind)} heads of kind '{kind}'", "declare each head kind once"))
    return problems


def _check_attention(mixer: models.AttentionFields, path: str, d_model: int) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    n_kv = mixer.n_kv_heads or mixer.n_heads
    if mixer.n_heads % n_kv:
        options = ", ".join(map(str, divisors(mixer.n_heads)))
        problems.append(Diagnostic(f"{path}.n_kv_heads", f"n_heads={mixer.n_heads} is not divisible by n_kv_heads={n_kv}",
                                   f"use one of {options}"))
    head_dim = mixer.head_dim
    if head_dim is None:
        if d_model % mixer.n_heads:
            options = ", ".join(str(d) for d in divisors(d_model) if d <= 256)
            problems.append(Diagnostic(f"{path}.n_heads",
                                       f"d_model={d_model} is not divisible by n_heads={mixer.n_heads}, "
                                       "so head_dim cannot be derived",
                                       f"set head_dim explicitly, or use n_heads in {options}"))
            return problems
        head_dim = d_model // mixer.n_heads
    if mixer.rope is not None:
        rotary = mixer.rope.rotary_dim or head_dim
        if rotary > head_dim:
            problems.append(Diagnostic(f"{path}.rope.rotary_dim", f"rotary_dim={rotary} exceeds head_dim={head_dim}",
                                       f"use an even rotary_dim <= {head_dim}"))
        if rotary % 2:
            field = "rope.rotary_dim" if mixer.rope.rotary_dim else "head_dim"
            problems.append(Diagnostic(f"{path}.{field}",
                                       f"RoPE rotates pairs of dimensions, so {field.split('.')[-1]}={rotary} must be even",
                                       f"use {rotary - 1} or {rotary + 1}"))
        if mixer.rope.scaling == "yarn" and mixer.rope.original_max_position is None:
            problems.append(Diagnostic(f"{path}.rope.original_max_position",
                                       "YaRN scaling needs the context length the model was trained at",
                                       "set rope.original_max_position, e.g. 4096"))
        if mixer.rope.scaling != "none" and mixer.rope.factor == 1.0:
            problems.append(Diagnostic(f"{path}.rope.factor",
                                       f"rope scaling '{mixer.rope.scaling}' with factor 1.0 changes nothing",
                                       "set factor > 1 or scaling: none", severity="warning"))
    return problems


def _check_mamba2(mixer: models.Mamba2Spec, path: str, d_model: int) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    d_inner = mixer.expand * d_model
    if mixer.n_heads is None:
        if d_inner % mixer.head_dim:
            options = ", ".join(str(d) for d in divisors(d_inner) if 8 <= d <= 256)
            problems.append(Diagnostic(f"{path}.head_dim",
                                       f"d_inner = expand·d_model = {d_inner} is not divisible by head_dim={mixer.head_dim}",
                                       f"use head_dim in {options}"))
            return problems
        n_heads = d_inner // mixer.head_dim
    else:
        n_heads = mixer.n_heads
        if n_heads * mixer.head_dim != d_inner:
            problems.append(Diagnostic(f"{path}.n_heads",
                                       f"n_heads·head_dim = {n_heads}·{mixer.head_dim} = {n_heads * mixer.head_dim} "
                                       f"!= d_inner = expand·d_model = {d_inner}",
                                       f"use n_heads={d_inner // mixer.head_dim}" if d_inner % mixer.head_dim == 0
                                       else "omit n_heads to derive it"))
    if n_heads % mixer.n_groups:
        options = ", ".join(map(str, divisors(n_heads)))
        problems.append(Diagnostic(f"{path}.n_groups", f"n_heads={n_heads} is not divisible by n_groups={mixer.n_groups}",
                                   f"use n_groups in {options}"))
    return problems


def _check_ffn_shape(shape: models.FeedForwardShape, path: str) -> list[Diagnostic]:
    if (shape.hidden is None) == (shape.multiplier is None):
        given = "both" if shape.hidden is not None else "neither"
        return [Diagnostic(path, f"{given} of 'hidden' and 'multiplier' given",
                           "give exactly one: hidden: 14336, or multiplier: 4")]
    return []
