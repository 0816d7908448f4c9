"""A Hugging Face config.json read field by field, so that every field is either mapped, known to be irrelevant to
the computation, or an error naming it.

`HFConfig.take` marks a field as read; `finish()` reports every field nobody read. Nothing is approximated: a field
whose value the spec language cannot express is a diagnostic with the field's name, its value and what would be
needed, never a silently dropped setting.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from archgen.errors import CompileError, Diagnostic, SourceLocation

# Fields that describe the file, the tokenizer or the runtime, not the function the network computes.
METADATA_FIELDS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "_name_or_path",
        "name_or_path",
        "torch_dtype",
        "dtype",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "unk_token_id",
        "use_cache",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "id2label",
        "label2id",
        "num_logits_to_keep",
        "logits_to_keep",
        "output_router_logits",
        "use_return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "tokenizer_class",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "_commit_hash",
        "problem_type",
    }
)

# Fields that only choose how weights start before training; an import replaces the weights, so they do not change
# what the imported model computes. The generated package's own init_weights uses its own defaults for them.
INIT_ONLY_FIELDS = frozenset(
    {
        "initializer_range",
        "rescale_prenorm_residual",
        "time_step_floor",
        "time_step_init_scheme",
        "time_step_scale",
        "time_step_min",
        "time_step_max",
    }
)

# Implementation choices of the reference code that compute the same function (float32 residuals only change the
# rounding in half precision; the scan variants are the same recurrence).
IMPLEMENTATION_FIELDS = frozenset(
    {
        "residual_in_fp32",
        "use_mambapy",
        "use_associative_scan",
        "pretraining_tp",
        "use_kernels",
    }
)


class HFConfig:
    """The fields of one config.json, with a record of which have been read."""

    def __init__(self, fields: dict[str, Any], file: str):
        self.fields = fields
        self.file = file
        self.read: set[str] = set()
        self.problems: list[Diagnostic] = []

    @classmethod
    def load(cls, path: Path) -> HFConfig:
        file = str(path)
        try:
            fields = json.loads(path.read_text(encoding="utf-8"), parse_constant=_json_constant)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CompileError(
                [
                    Diagnostic(
                        "",
                        f"cannot read the Hugging Face config: {error}",
                        "pass a config.json file or a model directory that holds one",
                        SourceLocation(file),
                    )
                ]
            ) from None
        if not isinstance(fields, dict):
            raise CompileError([Diagnostic("", "a config.json must hold a JSON object", None, SourceLocation(file))])
        return cls(fields, file)

    @property
    def model_type(self) -> str | None:
        return self.fields.get("model_type")

    def has(self, key: str) -> bool:
        return self.fields.get(key) is not None

    def take(self, key: str, default: Any = None) -> Any:
        """The value of `key` (or `default` when it is absent or null), marking it read."""
        self.read.add(key)
        value = self.fields.get(key)
        return default if value is None else _decode(value)

    def need(self, key: str, default: Any = None) -> Any:
        """Like take, but a missing value (with no default) is an error."""
        value = self.take(key, default)
        if value is None:
            self.error(key, f"the config has no '{key}', which this model type needs", f"add '{key}' to the config")
        return value

    def expect(self, key: str, allowed: tuple, default: Any, why: str) -> Any:
        """Read `key`, which must be one of `allowed`: other values are outside the spec language (`why` says so)."""
        value = self.take(key, default)
        if value not in allowed:
            shown = " or ".join(repr(a) for a in allowed)
            self.error(key, f"{key}={value!r} is outside the spec language: {why}", f"only {shown} can be imported")
        return value

    def error(self, key: str, message: str, fix: str | None = None) -> None:
        self.problems.append(Diagnostic(key, message, fix, SourceLocation(self.file)))

    def accept(self, *keys: str) -> None:
        """Mark fields as read whose value is irrelevant for this model type (documented at the call)."""
        self.read.update(keys)

    def finish(self) -> None:
        """Raise every problem found, plus one per field that no mapping read."""
        ignorable = METADATA_FIELDS | INIT_ONLY_FIELDS | IMPLEMENTATION_FIELDS
        for key in sorted(set(self.fields) - self.read - ignorable):
            self.error(
                key,
                f"the config field '{key}' (= {_shorten(self.fields[key])}) of model_type "
                f"'{self.model_type}' is not something archgen's importer can map to the spec language",
                "remove it if it does not change the model, or extend archgen/importers for it",
            )
        if self.problems:
            raise CompileError(self.problems)

    def init_only(self) -> list[str]:
        """The initialisation-only fields of this config that no mapping read (the spec notes them)."""
        return sorted(k for k in self.fields if k in INIT_ONLY_FIELDS and k not in self.read)


def _json_constant(name: str) -> float:
    return {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}[name]


def _decode(value: Any) -> Any:
    """transformers writes infinities as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _shorten(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
