"""The one place the training loop meets a generated package's calling convention.

A package's forward takes `labels=` (Hugging Face's convention, shifted inside) or `targets=` (already shifted,
nanoGPT's); the loop passes targets (tokens[:, 1:] for inputs tokens[:, :-1]), which scores every input position.
Its output holds `lm_loss` (the next-token cross-entropy) and `aux_losses` (already weighted by the spec) apart;
the loop reweights them with the recipe rather than taking the package's `loss` (their spec-weighted sum).

The optional hooks a package may have are found here too: `update_target` (JEPA's EMA target, called after every
optimizer step) and the `update_memory` keyword (Titans writes during training).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StepLosses:
    total: torch.Tensor  # what backward runs on: the recipe's weighted sum
    next_token: torch.Tensor  # cross-entropy, unweighted (perplexity is its exp)
    aux: dict[str, torch.Tensor]  # each auxiliary loss as the model returned it (spec-weighted), before recipe weights


class ModelAdapter:
    def __init__(self, model: nn.Module, head_kinds: dict[str, str], objectives):
        self.model = model
        self.objectives = objectives
        self.head_kinds = head_kinds  # head name -> kind, from the resolved spec
        forward = inspect.signature(type(model).forward).parameters
        self.writes_memory = "update_memory" in forward and objectives.titans_writes
        self.has_ema_target = hasattr(model, "update_target")

    def aux_weight(self, name: str) -> float:
        """The recipe's multiplier of one auxiliary loss: its head's weight, else aux_losses."""
        head = self.head_of(name, self.head_kinds)
        if head is not None:
            return self.objectives.heads.get(head, 1.0)
        return self.objectives.aux_losses

    @staticmethod
    def head_of(name: str, head_kinds: dict[str, str]) -> str | None:
        """Which head produced a loss: JEPA names its losses after the head, Medusa calls its loss 'medusa'."""
        for head, kind in head_kinds.items():
            if name == head or name.startswith(head + "_") or (kind == "medusa" and name == "medusa"):
                return head
        return None

    def forward(self, module: nn.Module, tokens: torch.Tensor) -> StepLosses:
        """tokens (B, L + 1) -> the losses of predicting tokens[:, 1:] from tokens[:, :-1] with `module` (the model,
        or its compiled / sharded wrapper)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        kwargs = {"update_memory": True} if self.writes_memory else {}
        out = module(inputs, targets=targets, **kwargs)
        aux = dict(out.aux_losses)
        next_token = out.lm_loss
        total = self.objectives.next_token * next_token
        for name, value in aux.items():
            total = total + self.aux_weight(name) * value
        return StepLosses(total, next_token, aux)

    def after_optimizer_step(self, step: int, total_steps: int) -> float | None:
        """Move the JEPA target (if any) with the recipe's momentum schedule (None: each head's ema_momentum from the
        spec); returns the momentum the schedule chose."""
        if not self.has_ema_target:
            return None
        schedule = self.objectives.jepa.momentum
        if schedule is None:
            momentum = None
        else:  # cosine from start to end over the run, as I-JEPA does
            progress = min(1.0, step / max(1, total_steps))
            momentum = schedule.end - (schedule.end - schedule.start) * (math.cos(math.pi * progress) + 1) / 2
        self.model.update_target(momentum)
        return momentum
