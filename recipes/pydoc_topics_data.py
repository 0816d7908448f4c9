"""Write the documentation topics that ship with Python (pydoc_data) as JSONL for recipes/pydoc_topics.yaml: one
topic a line, the topics nested in others left out.

Many topics are sections of larger ones (`with` is part of `compound`, `augassign` of `assignment`): with every
topic, 48% of the 64-byte windows of a 10% held-out split also occur in the training topics, so a held-out loss
would mostly measure recall. Going from the longest topic down, a topic is kept when at most half of its 64-byte
windows occur in the topics kept so far: 57 of the 79 topics of Python 3.11 (374 kB), and 0.3% of the held-out
windows occur in training.

    python recipes/pydoc_topics_data.py > data/pydoc_topics.jsonl
"""

from __future__ import annotations

import json

WINDOW = 64  # bytes: longer than any phrase that recurs by chance in English prose or a code sample


def windows(text: str) -> set[bytes]:
    data = text.encode()
    return {data[i : i + WINDOW] for i in range(len(data) - WINDOW + 1)}


def distinct_topics() -> list[str]:
    """The topics' texts in pydoc_data's order, without those mostly contained in a longer kept topic."""
    from pydoc_data import topics

    seen: set[bytes] = set()
    kept = set()
    for name, text in sorted(topics.topics.items(), key=lambda item: -len(item[1])):
        own = windows(text)
        if len(own & seen) <= len(own) / 2:
            kept.add(name)
            seen |= own
    return [text for name, text in topics.topics.items() if name in kept]


if __name__ == "__main__":
    print("\n".join(json.dumps({"text": text}) for text in distinct_topics()))
