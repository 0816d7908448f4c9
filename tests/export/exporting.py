"""Helpers of the export tests: building and exporting one spec (in a worker process), and reading the result.

A module of its own (not conftest.py) so that worker processes can import `export_spec` by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from archgen.testing import import_generated
from tests.conftest import build_package

WEIGHTS_SEED = 1234


def export_spec(spec_path: str, root: str) -> dict:
    """Build `spec_path` at the tiny preset under root/, save seeded weights, export; runs in a worker process."""
    torch.set_num_threads(1)
    from archgen.export import export_package

    root = Path(root)
    package = build_package(spec_path, root / "package")
    torch.manual_seed(WEIGHTS_SEED)
    package.Model().save_pretrained(root / "weights")
    result = export_package(package, root / "export", weights=root / "weights", check=False)
    return {"package": str(Path(package.__path__[0])), "export": str(result.directory)}


@dataclass
class Exported:
    """One spec's exported graphs, loaded lazily, and the eager model they came from."""

    name: str
    package_dir: Path
    directory: Path
    _sessions: dict = field(default_factory=dict)
    _programs: dict = field(default_factory=dict)

    @cached_property
    def package(self):
        return import_generated(self.package_dir)

    @cached_property
    def model(self):
        return self.package.Model.from_pretrained(self.directory.parent / "weights").eval()

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.directory / "manifest.json").read_text())

    def program(self, graph: str):
        if graph not in self._programs:
            self.package  # noqa: B018 - importing it registers the custom ops (Triton kernels) the program may hold
            self._programs[graph] = torch.export.load(self.directory / f"{graph}.pt2").module()
        return self._programs[graph]

    def session(self, graph: str):
        from archgen.export.onnx_export import onnx_session

        if graph not in self._sessions:
            self._sessions[graph] = onnx_session(self.directory / f"{graph}.onnx")
        return self._sessions[graph]

    def run(self, graph: str, fmt: str, *args: torch.Tensor) -> list[torch.Tensor]:
        """Run the exported `graph` ("prefill" / "decode") in `fmt` ("pt2" / "onnx") on flat inputs."""
        if fmt == "pt2":
            with torch.no_grad():
                return list(self.program(graph)(*args))
        session = self.session(graph)
        names = [i["name"] for i in self.manifest["graphs"][graph]["inputs"]]
        outputs = session.run(None, {name: t.detach().numpy() for name, t in zip(names, args, strict=True)})
        return [torch.from_numpy(o) for o in outputs]
