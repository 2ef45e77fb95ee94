"""Repeated random sequences (Olsson et al. 2022): a segment of random common words, then the same segment again.
An induction head attends, from each token of the repeat, to the token after that token's first occurrence; the
model's loss on the repeat, against the first pass, is how much it copies from context.

Words rather than random token ids, so that one task file serves every tokenizer; the probe checks per model that
the repeat tokenizes as the first pass did (an item that does not is flagged, not scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import ProbeError
from .base import Item, Task
from .kinds import register_kind

# common English nouns: single tokens (with a leading space) in most vocabularies
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education "
         "foot boy age policy process music market sense nation plan college interest death experience effect use "
         "class control care field development role effort rate heart drug show leader light voice wife police mind "
         "price report decision son view relationship town road arm difference value building action model season "
         "society tax director position player record paper space ground form event official matter center couple "
         "site project activity star table need court oil situation cost industry figure street image phone data "
         "picture practice piece land product doctor wall patient worker news test movie north love support "
         "technology step baby computer type attention film tree source organization hair window evidence "
         "population site bed").split()


@register_kind("repeat")
@dataclass
class RepeatTask(Task):
    """`sequences` items, each `length` random words (from the seed, without repetition within a segment) said
    twice; the segment starts with a space, so both passes tokenize alike."""

    SCHEMA: ClassVar[dict] = {"sequences": ("repeat: repeated sequences", "50"),
                              "length": ("repeat: words per segment (said twice)", "20")}
    NONNEGATIVE: ClassVar[tuple] = ("sequences", "length")

    sequences: int = 50
    length: int = 20

    def __post_init__(self):
        if self.sequences < 1 or not 2 <= self.length <= len(set(WORDS)):
            raise ProbeError(f"task {self.name!r}: sequences {self.sequences}, length {self.length}; accepted: 1 or "
                             f"more sequences of 2 to {len(set(WORDS))} words")

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
        words = sorted(set(WORDS))
        out = []
        for s in range(self.sequences):
            rng = np.random.default_rng([self.seed, s])
            segment = "".join(" " + words[int(i)] for i in rng.choice(len(words), size=self.length, replace=False))
            out.append(Item(s, segment.strip(), "", segment + segment, "", "", extra={"sequence": s}))
        if inputs is not None:
            out = [it for it in out if it.input in inputs]
        return out[:limit] if limit else out

    def ambiguity(self, tokenizer) -> dict[int, str]:
        """Items whose repeat does not tokenize as the first pass (there is no answer to be ambiguous)."""
        return {it.index: "the repeat tokenizes differently from the first pass" for it in self.items()
                if repeat_start(tokenizer, it.prompt) is None}


def repeat_start(tokenizer, prompt: str) -> int | None:
    """The token index where the repeat begins (after any BOS token), if the second half's tokens are the first
    half's; else None."""
    ids = tokenizer(prompt).input_ids
    for skip in (0, 1):
        body = ids[skip:]
        k = len(body) // 2
        if len(body) % 2 == 0 and k > 1 and body[:k] == body[k:]:
            return skip + k
    return None
