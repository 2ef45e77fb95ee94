"""Token positions, one grammar for every probe that reads or patches positions (`--positions`, linear-probe's
`--position`): comma-separated entries, each `last`, `all` (every token, each on its own), `whole` (every token at
once), a token index (negative from the end), a slice `a:b` (`-3:` the last three) or a name: the argument's last
token (`argument`) or a position the task names (Item.positions: a tree's `goal`, `root`, `edge_up0`, ...).
Each probe declares the forms it takes (catalog.Probe.position_forms). The value is checked here in two steps:
its grammar and names before any model loads (`check_positions`), each prompt's tokens once it is tokenized
(`token_positions`)."""

from __future__ import annotations

import re

from ..errors import ProbeError
from ..tasks.base import Item

FORMS = ("last", "all", "whole", "index", "slice", "name")
_INDEX = re.compile(r"-?\d+")
_SLICE = re.compile(r"(-?\d+)?:(-?\d+)?")
_NAME = re.compile(r"[A-Za-z_]\w*")


def form_of(entry: str) -> str | None:
    """Which form an entry is (None: none of them)."""
    if entry in ("last", "all", "whole"):
        return entry
    for form, pattern in (("index", _INDEX), ("slice", _SLICE), ("name", _NAME)):
        if pattern.fullmatch(entry):
            return form
    return None


def entries(value) -> list[str]:
    """The entries of a positions value: text '0,goal,-3:', a list, or one index."""
    parts = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")
    return [p.strip() for p in parts]


def accepted_text(forms) -> str:
    shown = {"index": "token indices such as 0,5,-1 (negative from the end)", "slice": "a slice such as -3: or 2:8",
             "name": "argument or a position the task names (trees: goal, root, edge_up0, ...)"}
    return ", ".join(shown.get(f, f) for f in forms)


def check_grammar(value, forms, what: str) -> list[str]:
    """The entries of `value`, each of one of `forms`, or a one-line error naming it (no model needed)."""
    got = entries(value)
    for entry in got:
        if not entry or form_of(entry) not in forms:
            within = f" in {value!r}" if len(got) > 1 else ""
            raise ProbeError(f"bad {what} {entry!r}{within}; accepted: {accepted_text(forms)}")
    return got


def task_names(items: list[Item]) -> list[str]:
    """The names every item gives a position: `argument`, then the task's (in the first item's order)."""
    return ["argument", *(name for name in (items[0].positions if items else {})
                          if all(name in it.positions for it in items))]


def check_positions(value, forms, what: str, items: list[Item], also: tuple = ()) -> None:
    """Before loading: the grammar, and every name one each of the task's items gives (a name only some give would
    stop the run at the first item without it, after the batches before it are written)."""
    names = task_names(items)
    accepted = ", ".join([*also, "last", *names]) + " or a token index (negative from the end)"
    for entry in check_grammar(value, forms, what):
        if form_of(entry) != "name" or entry in names:
            continue
        if all(entry not in it.positions for it in items):
            raise ProbeError(f"unknown {what} position {entry!r}; accepted: {accepted}")
        lacking = next(it for it in items if entry not in it.positions)
        raise ProbeError(f"{what} position {entry!r} is not named by item {lacking.index} ({lacking.input!r}), "
                         f"which names {', '.join(['argument', *lacking.positions])}; accepted: a position every "
                         f"item names: {accepted}")


def token_index(name: str, length: int, named: dict[str, int], probe: str, item: int | None = None,
                also: tuple = ()) -> int:
    """The token a position names in a prompt of `length` tokens: `last`, one of `named` (the item's positions by
    meaning), or an integer (negative from the end). `probe` and `item` name the error; `also` lists the names the
    caller handles itself (for the error's accepted list)."""
    if name == "last":
        return length - 1
    if name in named:
        return named[name]
    if not _INDEX.fullmatch(name):
        raise ProbeError(f"unknown {probe} position {name!r}; accepted: " + ", ".join([*also, "last", *named])
                         + " or a token index (negative from the end)")
    index = int(name)
    if not -length <= index < length:
        of = "" if item is None else f" of item {item}"
        raise ProbeError(f"{probe} position {index} is outside the prompt{of} ({length} tokens); accepted: "
                         f"{-length} to {length - 1}")
    return index % length


def token_positions(value, length: int, named: dict[str, int], what: str, item: int | None = None) -> list:
    """The tokens `value` names in a prompt of `length` tokens, in its order without repeats: indices, and
    slice(None) for `whole`. `all` and slices give each of their tokens."""
    out = []
    for entry in entries(value):
        if entry == "all":
            out += list(range(length))
        elif entry == "whole":
            out.append(slice(None))
        elif form_of(entry) == "slice":
            a, b = (int(x) if x.strip() else None for x in entry.split(":"))
            picked = list(range(length))[slice(a, b)]
            if not picked:
                of = "" if item is None else f" of item {item}"
                raise ProbeError(f"{what} --positions {entry!r} names no token{of} ({length} tokens); accepted: a "
                                 f"slice within 0:{length}")
            out += picked
        else:
            out.append(token_index(entry, length, named, what, item, also=("all", "whole")))
    whole = [p for p in out if isinstance(p, slice)]
    return [*dict.fromkeys(p for p in out if not isinstance(p, slice))] + whole[:1]


def resolve_positions(value, length: int, named: dict[str, int]) -> list:
    """Token positions of a prompt of `length` tokens for patching (default: all)."""
    return token_positions(value or "all", length, named, "patching")


def char_position(tokenizer, prompt: str, char: int) -> int:
    """The token holding character `char` of the prompt."""
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return next((i for i, (a, b) in enumerate(offsets) if a <= char < b), len(offsets) - 1)


def argument_position(tokenizer, prompt: str, argument: str) -> int:
    """The token holding the last character of the argument's last occurrence in the prompt (the query's)."""
    at = prompt.rfind(argument.strip())
    if at < 0:
        return len(tokenizer(prompt).input_ids) - 1
    return char_position(tokenizer, prompt, at + len(argument.strip()) - 1)


def named_positions(tokenizer, item: Item) -> dict[str, int]:
    """The item's positions by meaning as token indices: `argument`, then the task's (Item.positions)."""
    return {"argument": argument_position(tokenizer, item.prompt, item.argument),
            **{name: char_position(tokenizer, item.prompt, c) for name, c in item.positions.items()}}
