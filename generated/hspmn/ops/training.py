"""
A training step (forward, backward, optimizer step) captured once in a CUDA graph and replayed for every batch.

This file is copied verbatim into generated packages as `ops/training.py` and imports only torch.

    step = CUDAGraphTrainStep(model, optimizer)          # AdamW(..., fused=True) or any optimizer that can be captured
    for input_ids, labels in batches:                    # every batch of one shape and dtype
        loss = step(input_ids, labels)                   # a 0-dim tensor, valid until the next call

At small shapes a step is a few thousand small kernels and the host cannot launch them as fast as the GPU runs them
(Hymba+ at 1 × 512 on an H200: 248 ms of wall for 41 ms of GPU work, session 12). A replay launches the whole step at
once, so the step takes the GPU's time. The first `warmup_steps` calls are ordinary eager steps (on a side stream, as
capture requires): they compile the Triton kernels, pick cuBLAS's algorithms and create the optimizer's state, none of
which may happen while a graph records. The next call records the step and replays it; every later call copies its
batch into the recorded inputs and replays. Every call is a real training step, the warm-up ones included.

What a replay cannot do, and what this class does about it:
- a new shape: the graph recorded one; a batch of another shape or dtype is a ValueError saying what was recorded;
- a learning rate changed on the optimizer after recording: the graph holds the value it recorded, so a changed float
  is a ValueError; give the optimizer a tensor learning rate (`lr=torch.tensor(3e-4, device="cuda")`) and change it in
  place (`group["lr"].fill_(new)`) to schedule it;
- host synchronisation inside the step (`.item()`, data-dependent shapes): the recording fails; the error says so and
  `CUDAGraphTrainStep(..., warmup_steps=...)` cannot help, so train such a model eagerly;
- anything outside `loss_fn` and the optimizer (a JEPA target's momentum update): pass it as `after_step`, which is
  recorded after the optimizer step.
Gradients are recorded as the graph's own tensors: between calls `p.grad` holds the last step's gradients; do not set
them to None. Off CUDA every call is an eager step, so the same loop runs on a CPU.
"""

from collections.abc import Callable

import torch
from torch import Tensor


class CUDAGraphTrainStep:
    """step(*batch) -> the loss (0-dim, valid until the next call): one training step, eager for the first
    `warmup_steps` calls, then replayed from the CUDA graph the next call records (see the module's docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[..., Tensor] | None = None, *, max_grad_norm: float | None = None,
                 after_step: Callable[[], None] | None = None, warmup_steps: int = 3):
        """loss_fn(*batch) -> the scalar loss, by default model(input_ids, labels=labels).loss (labels default to
        input_ids: the model shifts them). max_grad_norm clips the gradients' global norm before the optimizer step."""
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps}: at least one eager step must run before recording "
                             "(it creates the optimizer's state and compiles the kernels)")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn or (lambda input_ids, labels=None: model(
            input_ids, labels=input_ids if labels is None else labels).loss)
        self.max_grad_norm = max_grad_norm
        self.after_step = after_step
        self.warmup_steps = warmup_steps
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor] = []  # the recorded batch, where each call copies its own
        self.loss: Tensor | None = None  # the recorded loss, which every replay rewrites
        self.recorded_lr: list[float | None] = []

    def __call__(self, *batch: Tensor) -> Tensor:
        self.calls += 1
        if not batch[0].is_cuda:
            self.optimizer.zero_grad(set_to_none=True)
            return self._step(*batch).detach()
        if self.calls == 1:
            self._make_capturable()
        if self.graph is None and self.calls <= self.warmup_steps:
            return self._eager_on_side_stream(batch)
        if self.graph is None:
            self._record(batch)
        else:
            self._check_replayable(batch)
            for recorded, given in zip(self.inputs, batch, strict=True):
                recorded.copy_(given)
        self.graph.replay()
        return self.loss

    def _step(self, *batch: Tensor) -> Tensor:
        loss = self.loss_fn(*batch)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm, foreach=True)
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step()
        return loss

    def _eager_on_side_stream(self, batch) -> Tensor:
        # Warm-up on a side stream: a graph records from a stream other than the default one, and what the warm-up
        # leaves in the allocator's pools (per stream) is then where the recording looks first.
        side = torch.cuda.Stream(batch[0].device)
        side.wait_stream(torch.cuda.current_stream(batch[0].device))
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._step(*batch).detach()
        torch.cuda.current_stream(batch[0].device).wait_stream(side)
        return loss

    def _make_capturable(self) -> None:
        """Adam(W)'s `capturable` on before the warm-up, so its step counters are made on the device, which a recorded
        step must update; counters an earlier step left on the host (state loaded from a checkpoint) moved there."""
        for group in self.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
        for param, state in self.optimizer.state.items():
            step = state.get("step")
            if isinstance(step, Tensor) and step.device != param.device:
                state["step"] = step.to(device=param.device, dtype=torch.float32)

    def _record(self, batch) -> None:
        self.inputs = [tensor.clone() for tensor in batch]
        # Recorded as None, the gradients are created inside the graph (its memory) and each replay writes them anew
        # instead of adding to the last step's.
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(batch[0].device)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.loss = self._step(*self.inputs).detach()
        except torch.OutOfMemoryError:
            self.graph = None
            raise  # as itself: a caller may retry at a smaller shape
        except RuntimeError as error:
            self.graph = None
            raise RuntimeError(f"the training step could not be recorded as a CUDA graph ({error}); a step that "
                               "synchronises with the host (.item(), data-dependent shapes such as a mixture of "
                               "experts' token counts) cannot be: train this model with eager steps") from error
        self.recorded_lr = [group["lr"] if not isinstance(group["lr"], Tensor) else None
                            for group in self.optimizer.param_groups]

    def _check_replayable(self, batch) -> None:
        if len(batch) != len(self.inputs):
            raise ValueError(f"the step was recorded with {len(self.inputs)} batch tensors and got {len(batch)}: "
                             "call it with the same arguments every time")
        for index, (recorded, given) in enumerate(zip(self.inputs, batch, strict=True)):
            if (given.shape, given.dtype, given.device) != (recorded.shape, recorded.dtype, recorded.device):
                raise ValueError(f"batch tensor {index} is {tuple(given.shape)} {given.dtype} on {given.device}, but "
                                 f"the step was recorded for {tuple(recorded.shape)} {recorded.dtype} on "
                                 f"{recorded.device}: make one CUDAGraphTrainStep per shape, or pad batches to one")
        for group, lr in zip(self.optimizer.param_groups, self.recorded_lr, strict=True):
            if lr is not None and group["lr"] != lr:
                raise ValueError(f"the learning rate changed from {lr} to {group['lr']} after the step was recorded, "
                                 "and a replay would keep using the recorded value: create the optimizer with a tensor "
                                 "learning rate (lr=torch.tensor(lr, device='cuda')) and change it in place with "
                                 "group['lr'].fill_(new_lr)")
