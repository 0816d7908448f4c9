"""Processes: one, or several started by torchrun (FSDP2 sharding, distributed checkpoints).

`torchrun --nproc-per-node N -m archgen train RECIPE` sets WORLD_SIZE, RANK and LOCAL_RANK; this module turns them
into a process group (NCCL on GPUs, gloo on CPUs), shards the model with `fully_shard` (each layer, then the root)
and a MixedPrecisionPolicy, and saves / loads sharded state with torch.distributed.checkpoint, which reshards on
load: a checkpoint written by N processes resumes on M, or on one process without torchrun.

Tensor parallelism (`distributed.tensor_parallel: N`): the processes form a (world / N) × N mesh, ("data", "tensor").
A generated module class that can be split says how in a `tp_plan` class attribute, {projection: (style, units)}:
"colwise" splits a Linear's outputs, "rowwise" its inputs (partial sums all-reduced), and `units` is what the split
dimension is made of (heads, hidden features), which N must divide. Attention (q/k/v colwise, o rowwise) and MLP
(gate/up colwise, down rowwise) templates have one; every other module (SSMs, MoE, norms, embeddings, heads) stays
replicated within a tensor group. The N processes of a group read the same data; FSDP then shards over "data".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
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
    tensor_parallel: int = 1  # processes per tensor-parallel group, which read the same data

    @property
    def data_size(self) -> int:
        """Data-parallel groups: how many different micro-batches one micro-step reads."""
        return self.world_size // self.tensor_parallel

    @property
    def data_rank(self) -> int:
        """This process's data-parallel group (groups are consecutive ranks, the mesh's inner dimension)."""
        return self.rank // self.tensor_parallel

    def with_tensor_parallel(self, size: int) -> Processes:
        return replace(self, tensor_parallel=size if self.distributed else 1)

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


def device_mesh(processes: Processes):
    """The (data, tensor) mesh over every process."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(processes.device.type, (processes.data_size, processes.tensor_parallel),
                            mesh_dim_names=("data", "tensor"))


def tensor_parallel_plans(model: nn.Module) -> dict[str, dict[str, tuple[str, int]]]:
    """{module path: its class's tp_plan} for every module of the model that has one and has parameters (a copy whose
    weights are buffers, JEPA's target encoder, stays whole on every process)."""
    return {name: type(module).tp_plan for name, module in model.named_modules()
            if getattr(type(module), "tp_plan", None) and next(module.parameters(), None) is not None}


def tensor_parallel_problems(model: nn.Module, size: int) -> list[str]:
    """Why the model cannot be split `size` ways (empty when it can): every planned split must divide evenly."""
    problems = []
    for path, plan in tensor_parallel_plans(model).items():
        for projection, (_, units) in plan.items():
            if units % size:
                problems.append(f"{path}.{projection} ({type(model.get_submodule(path)).__name__}) splits into {units} "
                                f"units (heads or hidden features), not divisible by {size}")
    return problems


@dataclass(frozen=True)
class TensorParallelSplit:
    modules: int  # how many modules were split
    # Parameters inside a split module but outside its plan (a qk-norm's weight): replicated, yet each rank's gradient
    # of them covers only its own heads, a partial sum that `sum_partial_gradients` completes after the backward.
    partial_gradients: tuple[str, ...]


def split_tensor_parallel(model: nn.Module, mesh) -> TensorParallelSplit:
    """Apply every module's tp_plan over the mesh's tensor dimension."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plans = tensor_parallel_plans(model)
    partial = []
    for path, plan in plans.items():
        module = model.get_submodule(path)
        parallelize_module(module, mesh, {projection: styles[style]() for projection, (style, _) in plan.items()})
        module.tensor_parallel = True  # a module that stacks its projections' weights (attention) runs each one then
        partial += [f"{path}.{name}" for name, _ in module.named_parameters() if name.split(".")[0] not in plan]
    return TensorParallelSplit(len(plans), tuple(partial))


@torch.no_grad()
def sum_partial_gradients(parameters: list[torch.Tensor], group) -> None:
    """Sum each parameter's gradient over the tensor-parallel group, in place (on this process's FSDP shard of it,
    when FSDP shards it: its reduce-scatter over the data dimension is linear, so the order does not matter). Done
    on the gradients once the backward is over, not in a hook: FSDP2 hands the sharded parameter its gradient
    outside autograd, where a hook on it never runs."""
    for parameter in parameters:
        grad = parameter.grad
        if grad is not None:
            dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=group)


def shard_model(model: nn.Module, compute_dtype: torch.dtype | None, reshard_after_forward: bool, mesh=None,
                ignored: set[nn.Parameter] | None = None) -> nn.Module:
    """FSDP2: every layer is one unit (its parameters gathered just before it runs), the root holds the rest. The
    sharded parameters stay float32 (the master copy); with a compute dtype, layers gather and run in it and
    gradients are reduced in float32. `mesh`: the data dimension of a (data, tensor) mesh (default: every process).
    `ignored`: parameters FSDP leaves as they are (experts already spread over the processes)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype
              else MixedPrecisionPolicy())
    ignored = ignored or set()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored & set(layer.parameters()) or None)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored or None)
    return model


@torch.no_grad()
def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for parameters that are DTensors on different meshes (tensor-parallel splits,
    FSDP shards) or plain tensors: each gradient's norm is a full (reduced) one, then all are scaled together. The
    norm and the scale stay on the device (no host sync); each DTensor's local piece is scaled in place."""
    grads = [p.grad for p in parameters if p.grad is not None]
    squares = []
    for grad in grads:
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        squares.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).square())
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        (grad.to_local() if hasattr(grad, "to_local") else grad).mul_(scale)
    return total


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


def expert_plans(model: nn.Module) -> dict[str, dict[str, int]]:
    """{module path: its class's expert_plan, {parameter: experts stacked along its dim 0}} for every module of the
    model that has one and has parameters (JEPA's target copy of an MoE holds buffers and is never spread)."""
    return {name: type(module).expert_plan for name, module in model.named_modules()
            if getattr(type(module), "expert_plan", None) and next(module.parameters(), None) is not None}


def expert_parallel_problems(model: nn.Module, size: int) -> list[str]:
    """Why the experts cannot be spread over `size` processes (empty when they can): each process holds E / size."""
    return [f"{path} ({type(model.get_submodule(path)).__name__}) has {experts} experts, not divisible by {size} processes"
            for path, plan in expert_plans(model).items() for experts in sorted(set(plan.values())) if experts % size]


def spread_experts(model: nn.Module, mesh) -> list[str]:
    """Expert parallelism over a 1-D mesh of P processes: every module with an expert_plan keeps the rank-th E / P
    block of its expert-stacked parameters, as DTensors sharded along dim 0 (so checkpoints and gradient clipping see
    the whole tensors), and its forward exchanges rows with the other processes (its `expert_group`). Returns the
    names of those parameters: data parallelism must leave them alone, and `average_expert_gradients` finishes them."""
    from torch.distributed.tensor import Shard, distribute_tensor

    names = []
    for path, plan in expert_plans(model).items():
        module = model.get_submodule(path)
        for name in plan:
            whole = module.get_parameter(name)
            module.register_parameter(name, nn.Parameter(distribute_tensor(whole.detach(), mesh, [Shard(0)])))
            names.append(f"{path}.{name}")
        module.expert_group = mesh.get_group()
    return names


@torch.no_grad()
def average_expert_gradients(parameters: list[torch.Tensor], processes: int) -> None:
    """Each process's experts are trained by every process's tokens (the backward's all_to_all brings their
    gradients home), so their gradient is the sum over processes of each one's mean loss; the other parameters'
    gradients are averaged over processes (DDP, FSDP). Divide, so that both are the gradient of the mean loss."""
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.div_(processes)
