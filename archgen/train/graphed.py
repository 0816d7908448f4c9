"""`cuda_graph: true`: the loop's optimizer step recorded once as a CUDA graph and replayed for every later step.

At small shapes a training step is host-bound: Hymba+ at 1 × 512 is ~3,460 kernel launches and 41 ms of GPU work in
250-380 ms of wall (session 12). A replay launches the whole step at once. `GraphedStep` wraps the loop's
`train_step(batch, step)` (every micro-batch's forward and backward, clipping, optimizer step, master weights,
the adapter's after-step hook): the first `warmup_steps` calls run it eagerly on a side stream (Triton compiles,
cuBLAS picks algorithms, the optimizer creates its state: none of it may happen while a graph records), the next
records it and replays it, every later one copies its micro-batches into the recorded inputs, sets the learning rate
and replays. Every call is a real training step.

Why not the package's `CUDAGraphTrainStep` (ops/training.py): it runs one `loss_fn` and one backward per step and
clips `model.parameters()`, where the loop runs one backward per micro-batch, clips the float32 master copies when
precision is bf16, and logs every micro-batch's losses and the gradient norm; bending its single loss into all of
that would change the package's public class for the loop's sake.

What a replay keeps from the recording, and how the loop copes:
- the learning rate: each param group gets a 0-dim float32 tensor on the device as its `lr` (fused and capturable
  AdamW take one), filled before every call, so the schedule reaches the replays;
- Python values computed while recording (the `step` argument, a JEPA momentum schedule's value): the momentum
  schedule is refused with cuda_graph in checks.py; the spec's constant momentum is fine;
- the outputs (losses, gradient norm) are the recording's tensors, rewritten by every replay: read them before the
  next call, as the loop does when it writes a record;
- host synchronisation inside the step (`.item()`, data-dependent shapes): recording fails, with an error that says
  to train with `cuda_graph: false`.
Off CUDA every call is the eager step, exactly as without the option.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

WARMUP_STEPS = 3  # eager steps before recording: kernels compiled and the optimizer's state created


@dataclass
class StepOutputs:
    sums: dict[str, list[Tensor]]  # each logged loss, one 0-dim tensor per micro-batch
    grad_norm: Tensor | float | None  # before clipping; None when the recipe does not clip
    momentum: float | None  # the JEPA target's momentum the adapter chose


class GraphedStep:
    def __init__(self, step: Callable[[list[Tensor], int], StepOutputs], optimizer: torch.optim.Optimizer,
                 device: torch.device, warmup_steps: int = WARMUP_STEPS):
        self.step = step
        self.optimizer = optimizer
        self.device = device
        self.cuda = device.type == "cuda"
        self.warmup_steps = warmup_steps
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Tensor | None = None  # (micro-batches, micro_batch, seq_len + 1): where each replay reads its data
        self.outputs: StepOutputs | None = None
        self.recorded_at: int | None = None  # the step (0-based) that was recorded
        self.lrs: list[Tensor] = []
        if self.cuda:
            self.lrs = [torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
                        for group in optimizer.param_groups]
            make_capturable(optimizer)
            self.side = torch.cuda.Stream(device)

    def __call__(self, batch: list[Tensor], lr: float, at_step: int) -> StepOutputs:
        """batch: the step's micro-batches (host tensors of one shape); lr: this step's learning rate."""
        self.calls += 1
        if not self.cuda:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            return self.step([tokens.to(self.device, non_blocking=True) for tokens in batch], at_step)
        for group, rate in zip(self.optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = rate  # again every call: loading a checkpoint puts the saved float back
            rate.fill_(lr)
        if self.graph is None and self.calls <= self.warmup_steps:
            return self._eager_on_side_stream(batch, at_step)
        stacked = torch.stack(batch)
        if self.graph is None:
            self._record(stacked, at_step)
        else:
            if stacked.shape != self.inputs.shape:
                raise ValueError(f"a step of micro-batches {tuple(stacked.shape)}, but the CUDA graph recorded "
                                 f"{tuple(self.inputs.shape)}: every step of a run has one shape")
            self.inputs.copy_(stacked, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def _eager_on_side_stream(self, batch: list[Tensor], at_step: int) -> StepOutputs:
        # A graph records on a side stream; warming up on one leaves the allocator's per-stream pools, cuBLAS's
        # workspaces and the like where the recording looks for them (PyTorch's "whole-network capture" recipe).
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            outputs = self.step([tokens.to(self.device, non_blocking=True) for tokens in batch], at_step)
        main.wait_stream(self.side)
        return outputs

    def _record(self, stacked: Tensor, at_step: int) -> None:
        self.inputs = stacked.to(self.device)
        # The step ends with zero_grad(set_to_none=True), so the gradients are created inside the graph (its memory)
        # and each replay's first backward writes them anew instead of adding to the last step's.
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(list(self.inputs.unbind(0)), at_step)
        except torch.OutOfMemoryError:
            self.graph = None
            raise
        except RuntimeError as error:
            self.graph = None
            raise RuntimeError(f"the training step could not be recorded as a CUDA graph ({error}); a step that "
                               "synchronises with the host (.item(), data-dependent shapes such as a mixture of "
                               "experts' token counts) cannot be: train this recipe with cuda_graph: false") from error
        self.recorded_at = at_step


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Let the optimizer's step be recorded: Adam(W)'s `capturable` on (its step counters on the device, updated by
    the device), and any step counter an earlier non-capturable state left on the host moved to its parameter's
    device (as load_state_dict places it for a capturable group)."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True
    for param, state in optimizer.state.items():
        step = state.get("step")
        if torch.is_tensor(step) and step.device != param.device:
            state["step"] = step.to(device=param.device, dtype=torch.float32)
