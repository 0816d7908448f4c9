"""Checkpoints: written whole or not at all, and enough to continue a run bit for bit.

    <run>/checkpoints/step-00000100/
        model.safetensors, config.json   the generated package's save_pretrained format: Model.from_pretrained(dir)
        optimizer.safetensors            every optimizer state tensor ("state.<index>.<name>") ...
        optimizer.json                   ... and the param groups (one process)
        master.safetensors               fp32 master weights (precision bf16 only)
        rng.safetensors                  torch's CPU generator state and every CUDA device's
        trainer.json                     step, data position (samples consumed), schedule, world size, last metrics
        recipe.yaml, spec.lock.yaml      what was trained, exactly as read
        manifest.json                    data files with sha256, token counts, tokenizer, spec hash, git commit
        tokenizer.json (+ tokenizer.hf.json)  what `archgen generate` decodes with
        package/                         the generated package the weights belong to
        distributed/                     torch.distributed.checkpoint shards of model and optimizer (torchrun runs):
                                         they reload on any number of processes, one included
Everything is written into a hidden sibling directory that is renamed into place last (a rename is atomic), so a
run killed at any instant leaves either the previous checkpoints or the new one, never half of one; `latest` (a
file naming the newest) is replaced atomically after the rename. Hidden leftovers of a killed save are deleted when
the next save starts; a checkpoint beyond `keep` is renamed out of sight before it is deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer.json").exists())


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if (named / "trainer.json").exists():
            return named
    found = list_checkpoints(root)
    return found[-1] if found else None


def staging_directory(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f".{PREFIX}*.saving-*"):  # from a save that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{checkpoint_name(step)}.saving-", dir=root))


def publish(staging: Path, root: Path, step: int, keep: int) -> Path:
    """Rename a complete staging directory into place, point `latest` at it, drop checkpoints beyond `keep`."""
    target = root / checkpoint_name(step)
    if target.exists():  # the same step saved again (a resumed run interrupted at once): the new one replaces it
        retired = hide(target)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)
    pointer = root / f".latest.{os.getpid()}"
    pointer.write_text(target.name + "\n")
    os.replace(pointer, root / "latest")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(hide(old), ignore_errors=True)
    return target


def hide(checkpoint: Path) -> Path:
    """Rename a checkpoint out of sight before deleting it: a run killed while deleting leaves a hidden leftover
    (removed by the next save), never a visible checkpoint with files missing."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.saving-retired-{os.getpid()}")
    checkpoint.rename(hidden)
    return hidden


# ------------------------------------------------------------------------------------------------ state <-> files
def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"state.{index}.{name}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    # a CUDA-graph run's learning rate is a tensor on the device (graphed.py): saved as the number it holds
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in group.items()} for group in state["param_groups"]]
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": groups, "scalars": scalars}, indent=1))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    tensors = load_file(str(directory / "optimizer.safetensors"))
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group in optimizer.param_groups:  # a CUDA-graph run saved capturable groups; this run decides for itself
        if "capturable" in group:
            group["capturable"] = optimizer.defaults.get("capturable", False)


def rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_rng(directory: Path, name: str = "rng.safetensors") -> None:
    save_file({k: v.contiguous() for k, v in rng_state().items()}, str(directory / name))


def load_rng(directory: Path, name: str = "rng.safetensors") -> None:
    path = directory / name
    if path.exists():
        set_rng_state(load_file(str(path)))


def copy_package(package_dir: Path, directory: Path) -> None:
    shutil.copytree(package_dir, directory / "package", ignore=shutil.ignore_patterns("__pycache__"))
