"""Processes: one, or several started by torchrun (FSDP2 sharding, distributed checkpoints).

`torchrun --nproc-per-node N -m archgen train RECIPE` sets WORLD_SIZE, RANK and LOCAL_RANK; this module turns them
into a process group (NCCL on GPUs, gloo on CPUs), shards the model with `fully_shard` (each layer, then the root)
and a MixedPrecisionPolicy, and saves / loads sharded state with torch.distributed.checkpoint, which reshards on
load: a checkpoint written by N processes resumes on M, or on one process without torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a number over processes."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a signal that reached only some of them)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())


def start_processes(device: str | None = None) -> Processes:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    chosen = torch.device(device) if device else torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Processes(rank, world_size, local_rank, chosen)


def stop_processes(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, compute_dtype: torch.dtype | None, reshard_after_forward: bool) -> nn.Module:
    """FSDP2: every layer is one unit (its parameters gathered just before it runs), the root holds the rest. The
    sharded parameters stay float32 (the master copy); with a compute dtype, layers gather and run in it and
    gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype
              else MixedPrecisionPolicy())
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def save_sharded(model: nn.Module, optimizer, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / "distributed"))


def load_sharded(model: nn.Module, optimizer, directory: Path) -> None:
    """Load distributed/ shards into this run's layout (any number of processes, one included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory / "distributed"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on the main process's CPU (empty elsewhere), named as the package names them, one
    entry per tensor (a tied unembedding is saved once, as `from_pretrained` expects)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor.contiguous() for name, tensor in state.items() if name in names}
