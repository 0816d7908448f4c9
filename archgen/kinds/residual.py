"""The residual addition after each mixer, feed-forward and model-level extra: no parameters, no cost."""

from __future__ import annotations

from archgen.kinds.base import Kind


class Residual(Kind):
    name = "add"
    role = "model"


KIND = Residual()
