"""N-back tasks: letter sequences generated from the seed (no data file)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import ProbeError
from .base import Item, Task, check_template, paired
from .kinds import register_kind


NBACK_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # 20 consonants
NBACK_RANGE = range(1, 7)


@register_kind("nback", required=("instruction",))
@dataclass
class NBack(Task):
    """N-back trials in the prompted format of the working-memory studies.

    Each sequence has `length` letters from `letters` with exactly `matches` targets (a letter equal to the one
    N back; no other position matches by chance). `unit: trial` gives one item per letter from position N on:
    the instruction, the letters so far each followed by its correct response, and the current letter, to be
    answered " m" (match) or " -". `unit: sequence` gives one item per sequence with every response filled in,
    for attention analysis over all positions (probes find the letters through the tokenizer's offsets).
    """

    SCHEMA: ClassVar[dict] = {  # separator: described with the relational kinds'
        "n": ("nback: N, one value or a list (1 to 6)", "[1, 2, 3]"),
        "sequences": ("nback: letter sequences per N", "4"),
        "length": ("nback: letters per sequence", "24"),
        "matches": ("nback: targets per sequence (a letter equal to the one N back)", "8"),
        "letters": ("nback: the alphabet", "BCDFGHJKLMNPQRSTVWXZ"),
        "unit": ("nback: trial (one item per letter) or sequence (one per sequence, for attention)", "trial"),
        "instruction": ("nback: the text before the letters, with {n}", "'Respond m when ... {n} letters back'"),
        "trial": ("nback: one trial, with {letter}", "'Letter: {letter}\\nResponse:'"),
        "match_answer": ("nback: the answer to a target", "' m'"),
        "nonmatch_answer": ("nback: the answer to any other letter", "' -'"),
        "first_sequence": ("nback: index of the first sequence (a trained model's held-out ones)", "800"),
        "feedback": ("nback: earlier letters followed by their correct response (prompted models)", "true"),
    }
    NONNEGATIVE: ClassVar[tuple] = ("sequences", "length", "matches", "first_sequence")

    n: list = field(default_factory=lambda: list(NBACK_RANGE))
    sequences: int = 4
    length: int = 24
    matches: int = 8
    letters: str = NBACK_LETTERS
    unit: str = "trial"
    instruction: str = ""
    trial: str = "Letter: {letter}\nResponse:"
    match_answer: str = " m"
    nonmatch_answer: str = " -"
    separator: str = "\n"
    first_sequence: int = 0  # sequences first_sequence, first_sequence + 1, ... (a trained model's held-out ones)
    feedback: bool = True  # earlier letters are followed by their correct response (prompted); trained models: no

    def __post_init__(self):
        self.n = [self.n] if isinstance(self.n, int) else list(self.n)
        bad = [n for n in self.n if not isinstance(n, int) or n not in NBACK_RANGE]
        if bad:
            raise ProbeError(f"task {self.name!r}: N {bad[0]!r} is outside the supported range; accepted: 1 to 6")
        if self.unit not in ("trial", "sequence"):
            raise ProbeError(f"task {self.name!r}: unit {self.unit!r}; accepted: trial, sequence")
        if not 0 <= self.matches <= self.length - max(self.n) or len(set(self.letters)) < 2:
            raise ProbeError(f"task {self.name!r}: {self.matches} matches do not fit {self.length} letters for "
                             f"N up to {max(self.n)}; accepted: 0 to {self.length - max(self.n)}")

    @classmethod
    def check_file(cls, spec: dict, name: str) -> None:
        check_template(name, "instruction", spec["instruction"], ("n",))
        check_template(name, "trial", spec.get("trial", "{letter}"), ("letter",))

    def ambiguity(self, tokenizer) -> dict[int, str]:
        return {}  # every trial is answered by one of the same two responses

    def sequence(self, n: int, s: int) -> tuple[list[str], list[bool]]:
        """Letters and match labels of sequence `s` for `n`, generated from (seed, n, s)."""
        rng = np.random.default_rng([self.seed, n, s])
        targets = set(rng.choice(np.arange(n, self.length), size=self.matches, replace=False).tolist())
        letters = []
        for t in range(self.length):
            if t in targets:
                letters.append(letters[t - n])
            else:
                pool = [c for c in self.letters if t < n or c != letters[t - n]]
                letters.append(pool[int(rng.integers(len(pool)))])
        return letters, [t >= n and letters[t] == letters[t - n] for t in range(self.length)]

    def letter_pattern(self) -> str:
        """A regular expression whose group 1 is each letter of a prompt, from the trial template."""
        before, _, after = self.trial.partition("{letter}")
        return re.escape(before) + "(" + "|".join(map(re.escape, sorted(set(self.letters)))) + ")" + re.escape(after[:1])

    def _response(self, match: bool) -> str:
        return self.match_answer if match else self.nonmatch_answer

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
        out = []
        for n in self.n:
            head = self.instruction.format(n=n)
            for s in range(self.first_sequence, self.first_sequence + self.sequences):
                letters, labels = self.sequence(n, s)
                shown = [self.trial.format(letter=c) + (self._response(m) if self.feedback else "")
                         for c, m in zip(letters, labels)]
                extra = {"n": n, "sequence": s, "letters": "".join(letters)}
                if self.unit == "sequence":
                    out.append(Item(len(out), "".join(letters), "".join("m" if m else "-" for m in labels),
                                    self.separator.join([head] + shown), "", "", group=f"N={n}",
                                    extra={**extra, "matches": int(sum(labels)),
                                           "letter_pattern": self.letter_pattern()}))
                    continue
                for t in range(n, self.length):
                    prompt = self.separator.join([head] + shown[:t] + [self.trial.format(letter=letters[t])])
                    out.append(Item(len(out), letters[t], "m" if labels[t] else "-", prompt,
                                    self._response(labels[t]), " " + letters[t - n], group=f"N={n}",
                                    extra={**extra, "position": t, "match": bool(labels[t])}))
        return out[:limit] if limit else out

    def corrupted_pairs(self, items: list[Item], tokenizer) -> list[Item] | None:
        """Trials: the corrupted prompt changes the current letter so that the answer flips (a match becomes
        another letter, a non-match becomes the letter N back); everything before it is the same. Whole sequences
        have no pairs."""
        if self.unit != "trial":
            return None
        length = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
        out = []
        for it in items:
            rng = np.random.default_rng([self.seed, 7, it.index])  # per item: pairs do not depend on the others
            n, t, letters = it.extra["n"], it.extra["position"], it.extra["letters"]
            back = letters[t - n]
            options = (rng.permutation([c for c in self.letters if c not in (back, letters[t])]).tolist()
                       if it.extra["match"] else [back])
            prefix = it.prompt[: len(it.prompt) - len(self.trial.format(letter=letters[t]))]
            for new in options:  # the first that keeps the prompt's token count (tokenizers merge some letters)
                corrupted = prefix + self.trial.format(letter=new)
                if length(corrupted) == length(it.prompt):
                    out.append(paired(it, corrupted, new, self._response(not it.extra["match"])))
                    break
        return out

    def no_pairs(self, model: str) -> str:
        return f"no trial of task {self.name!r} has a corrupted partner of the same token length"
