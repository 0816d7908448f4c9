"""`kind: none`: an empty mixer or feed-forward slot. Resolve drops it from the layout, so it never becomes an op."""

from __future__ import annotations

from archgen.kinds.base import Kind


class Empty(Kind):
    name = "none"
    role = "empty"


KIND = Empty()
