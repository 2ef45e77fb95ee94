"""Token positions by meaning, for the probes that read or patch one position of a prompt: names the task gives
(Item.positions: a tree's `goal`, `root`, ...), the argument's last token, `last`, or a token index."""

from __future__ import annotations

from ..errors import ProbeError
from ..tasks.base import Item


def token_index(name: str, length: int, named: dict[str, int], probe: str, item: int | None = None,
                also: tuple = ()) -> int:
    """The token a position names in a prompt of `length` tokens: `last`, one of `named` (the item's positions by
    meaning), or an integer (negative from the end). `probe` and `item` name the error; `also` lists the names the
    caller handles itself (for the error's accepted list)."""
    if name == "last":
        return length - 1
    if name in named:
        return named[name]
    try:
        index = int(name)
    except ValueError:
        raise ProbeError(f"unknown {probe} position {name!r}; accepted: " + ", ".join([*also, "last", *named])
                         + " or a token index (negative from the end)") from None
    if not -length <= index < length:
        of = "" if item is None else f" of item {item}"
        raise ProbeError(f"{probe} position {index} is outside the prompt{of} ({length} tokens); accepted: "
                         f"{-length} to {length - 1}")
    return index % length


def resolve_positions(value, length: int, named: dict[str, int]) -> list:
    """Token positions of a prompt of `length` tokens for patching: a list whose entries are an index, or a slice
    for `whole`. Names: all, whole, and those of `token_index`."""
    names = [p.strip() for p in (value.split(",") if isinstance(value, str) else [str(v) for v in value or ["all"]])]
    out = []
    for name in names:
        if name == "all":
            out += list(range(length))
        elif name == "whole":
            out.append(slice(None))
        else:
            out.append(token_index(name, length, named, "patching", also=("all", "whole")))
    return list(dict.fromkeys(out, None)) if not any(isinstance(p, slice) for p in out) else out


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
