"""Names in generated code: one namespace per emitted module, as torch.fx does it.

A spec name is already restricted to [a-z_][a-z0-9_]* by the spec language; this module turns it into a class name,
and resolves clashes with keywords, builtins, names the templates use, and names already taken, by adding _1, _2, …
"""

from __future__ import annotations

import builtins
import keyword
import re

# Names the model template defines or imports itself; a generated class must never shadow them. The names imported
# from the runtime ops are added per model, from the plan's import table (emit/plan.py).
TEMPLATE_NAMES = frozenset({
    "Model", "ModelOutput", "Cache", "RMSNorm", "FusedRMSNorm", "ZeroCenteredRMSNorm", "ZeroCenteredFusedRMSNorm",
    "LayerNorm", "ConvCache", "F", "nn", "torch", "math", "json", "dataclass", "field", "Path", "checkpoint", "Tensor",
    "CONFIG", "SPEC_HASH", "SPEC_NAME", "INIT_STD", "OUTPUT_STD",
    "USE_KERNELS", "use_kernel", "kernels", "add_losses", "fields", "SPEC", "pick_greedy",
})


class Namespace:
    def __init__(self, reserved: frozenset[str] = TEMPLATE_NAMES):
        self._used: set[str] = set(reserved)

    def create(self, candidate: str) -> str:
        name = re.sub(r"[^0-9A-Za-z_]", "_", candidate) or "_"
        if name[0].isdigit():
            name = f"_{name}"
        base, suffix = name, 0
        while name in self._used or keyword.iskeyword(name) or hasattr(builtins, name):
            suffix += 1
            name = f"{base}_{suffix}"
        self._used.add(name)
        return name


def camel(name: str) -> str:
    """'global_attn' -> 'GlobalAttn'."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or "Component"
