"""Three demo tasks for FlyLoRA adapters, generated deterministically in the repo (no downloads).

Each task has a training set, a held-out set and an automatic scorer. They are chosen so that the demo
model (SmolLM2-135M-Instruct) fails them without an adapter, a FlyLoRA adapter learns each in a few CPU
minutes, and an adapter trained on one task fails the others:

- ``json-reply``: a sentence about a person -> exactly ``{"name": ..., "age": ..., "city": ...}``.
- ``atlas``: capitals of made-up countries (a fictional fact table); held-out questions use phrasings
  never seen in training.
- ``shout``: a fixed text transformation, ``">> "`` + the user's message in upper case.

    from flylora_runtime.demo.tasks import TASKS, get_task
    task = get_task("atlas")
    ex = task.heldout()[0]; ok = task.score(ex, reply_text)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

from flylora_runtime.demo.tasks.builtin import atlas_examples, json_reply_examples, score_atlas, score_json_reply, score_shout, shout_examples


@dataclass(frozen=True)
class Example:
    """One chat turn: the user's ``prompt``, the reference ``answer`` (trained on) and what the scorer
    needs (``target``: the exact expected reply or the fact to find)."""

    prompt: str
    answer: str
    target: str

    def chat(self) -> dict:
        return {"messages": [{"role": "user", "content": self.prompt},
                             {"role": "assistant", "content": self.answer}]}


@dataclass(frozen=True)
class Task:
    """A demo task. ``train()`` and ``heldout()`` are deterministic; ``score(example, reply)`` is a bool."""

    name: str
    description: str
    make: Callable[[str], list[tuple[str, str, str]]]
    scorer: Callable[[str, str], bool]

    def train(self) -> list[Example]:
        return [Example(*t) for t in self.make("train")]

    def heldout(self) -> list[Example]:
        return [Example(*t) for t in self.make("heldout")]

    def score(self, example: Example, reply: str) -> bool:
        return self.scorer(example.target, reply)

    def data_hash(self) -> str:
        """sha256 of both splits (what the adapter cache is keyed by, with the hyperparameters and code)."""
        blob = json.dumps([[e.chat() for e in self.train()], [e.target for e in self.heldout()]])
        return hashlib.sha256(blob.encode()).hexdigest()


TASKS: dict[str, Task] = {
    t.name: t for t in (
        Task("json-reply", "a sentence about a person -> {\"name\", \"age\", \"city\"} JSON, nothing else",
             json_reply_examples, score_json_reply),
        Task("atlas", "capitals of made-up countries (a fictional fact table)", atlas_examples, score_atlas),
        Task("shout", "reply with '>> ' + the message in upper case", shout_examples, score_shout),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
