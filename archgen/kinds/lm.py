"""`heads: {name: {kind: lm}}`: the next-token head the backbone always has (its weight is the lm_head op's), so
declaring it only sets its loss weight and builds no op of its own."""

from __future__ import annotations

from archgen.kinds.base import Kind
from archgen.spec import models


class LanguageModelHead(Kind[models.LMHeadSpec, None]):
    name = "lm"
    role = "head"
    builds_op = False

    def resolve(self, spec, model) -> None:
        return None


KIND = LanguageModelHead()
