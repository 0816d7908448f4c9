"""A generated package as the exporter sees it: the imported module, what its spec.lock.yaml says, and which spec
component each module path of the model comes from (for error messages)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

from archgen.testing import import_generated


@dataclass(frozen=True)
class Package:
    module: ModuleType  # the imported generated package
    directory: Path
    name: str  # the spec's name, e.g. "hspmn"
    source: str  # the spec file it was generated from, e.g. "specs/hspmn.yaml"
    preset: str | None
    spec_hash: str
    config: dict  # the resolved spec (config.CONFIG)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.source}{f', preset {self.preset}' if self.preset else ''})"

    def spec_path_of(self, module_path: str) -> str:
        """The spec path a module of the generated model comes from: 'layers.3.mixer.ssm' -> 'mixers.ssm (mamba)'."""
        parts = module_path.split(".") if module_path else []
        if not parts:
            return "model"
        head = parts[0]
        if head == "layers" and len(parts) > 1 and parts[1].isdigit():
            layer = self.config["layers"][int(parts[1])]
            rest = parts[2:]
            if rest[:1] == ["mixer"]:
                names = layer["mixers"]
                name = rest[1] if len(rest) > 1 and rest[1] in names else (names[0] if len(names) == 1 else None)
                if name is None:
                    return f"layers[{parts[1]}].mixers ({' | '.join(names)})"
                return f"mixers.{name} ({self.config['mixers'][name]['kind']})"
            if rest[:1] == ["ffn"] and layer.get("ffn"):
                return f"ffns.{layer['ffn']} ({self.config['ffns'][layer['ffn']]['kind']})"
            if rest[:1] in (["mixer_norm"], ["ffn_norm"]):
                return "model.norm"
            return f"layout (layer {parts[1]})"
        if head == "heads" and len(parts) > 1:
            return f"heads.{parts[1]}"
        if head in ("memory", "symbolic"):
            return head
        if head == "meta_tokens":
            return "meta_tokens"
        return "model"


def load_package(package: str | Path | ModuleType) -> Package:
    """Import a generated package from its directory (or take an imported one) and read its spec.lock.yaml."""
    if isinstance(package, ModuleType):
        module = package
        directory = Path(module.__path__[0])
    else:
        directory = Path(package)
        if not (directory / "__init__.py").exists() or not (directory / "spec.lock.yaml").exists():
            raise FileNotFoundError(f"{directory} is not a generated package (no __init__.py and spec.lock.yaml); "
                                    "build one with `archgen build SPEC`")
        module = import_generated(directory)
    lock = yaml.safe_load((directory / "spec.lock.yaml").read_text(encoding="utf-8"))
    return Package(module=module, directory=directory, name=lock["resolved"]["name"], source=lock.get("source", "?"),
                   preset=lock.get("preset"), spec_hash=lock["spec_hash"], config=module.config.CONFIG)
