"""Every probe option, declared once: its name (the API's keyword and the sweep file's key), its command-line flag,
its help and how a value is read and checked. The parser, the API, sweep files, docs/schema.md and validation all
come from OPTIONS; which probe takes which option, with what default, is the catalog's (catalog.py). Torch-free:
the command line imports it before anything heavy.

A parse takes what a user gives (the command line's text, a YAML value or a Python value) and returns the value the
run uses and records in its config (the run's identity), or raises a one-line ProbeError naming the value and
what is accepted. Bounds that depend on the model (a block past its last, top-k past its vocabulary) and on the
task (named positions) are checked when those are known (catalog.check_bounds, catalog.check_task)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ProbeError


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    parse: Callable[[Any], Any]
    flag: str | None = None  # the command-line flag, when not --<name with dashes>
    switch: Any = None  # a flag that takes no value and sets this one (--no-controls: False)
    least: int | None = None  # an integer option's least value (the command line checks it as argparse's type)
    # valid values other than the defaults, in order of preference (tests/test_options_used.py changes each option to
    # one): a tuple, or a function of the task's items giving one (values only a task gives, e.g. its inputs)
    examples: tuple | Callable[[list], tuple] = ()
    mode: bool = False  # its values switch between computations that read different options (ffn-transplant's add
    # and replace): the test changes every other option in each of them too

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def listed(value, what: str, accepted: str, ints: bool = False):
    """A comma-separated list as text (or an integer, where `ints`) kept as given; a list of them (a sweep file's or
    the API's) as the same text, so that it means and records what the command line's text does. Any other type is
    refused in one line."""
    def one(v):
        return isinstance(v, str) or ints and isinstance(v, int) and not isinstance(v, bool)
    if one(value):
        return value
    if isinstance(value, (list, tuple)) and value and all(one(v) for v in value):
        return ",".join(str(v).strip() for v in value)
    raise ProbeError(f"bad {what} {value!r}; accepted: {accepted}")


def count(name: str, least: int) -> Callable[[Any], int]:
    def parse(value) -> int:
        text = str(value).strip()
        if isinstance(value, (bool, float)) or not text.lstrip("-").isdigit() or int(text) < least:
            raise ProbeError(f"bad {name} {value!r}; accepted: an integer of at least {least}")
        return int(text)
    return parse


def checked(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`parse` as a check only: the value is kept as given (it is the run's identity)."""
    def check(value):
        parse(value)
        return value
    return check


def choice(what: str, accepted: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value) -> str:
        if value not in accepted:
            raise ProbeError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")
        return value
    return parse


def names(what: str, accepted: tuple[str, ...] | None = None) -> Callable[[Any], Any]:
    """A comma-separated list (or a list) of names; `accepted`: the names allowed (else any)."""
    def parse(value):
        shown = ", ".join(accepted) if accepted else "a name"
        value = listed(value, what, f"{shown}, as text (several comma-separated) or a list of names")
        got = [v.strip() for v in value.split(",")]
        bad = [v for v in got if not v or (accepted is not None and v not in accepted)]
        if bad or not got:
            raise ProbeError(f"unknown {what} {bad[0] if bad else value!r}; accepted: "
                             + (", ".join(accepted) if accepted else "a name, or several comma-separated"))
        return value
    return parse


_BLOCKS = re.compile(r"\d+(-\d+)?")


def blocks(value, extra: tuple[str, ...] = ()):
    """The blocks grammar (`--layers`): 'all', a block, a list or ranges of blocks like '3,5' or '10-17' (or a
    list of ints); the range is checked against the model once it is loaded (arch.parse_blocks)."""
    accepted = "'all', " + "".join(f"'{e}', " for e in extra) + "a block, a list or ranges of blocks like '3,5' or '10-17'"
    if value in ("all", *extra) or isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    value = listed(value, "--layers", accepted, ints=True)
    parts = [p.strip() for p in str(value).split(",")]
    ok = all(_BLOCKS.fullmatch(p) for p in parts)
    if ok:
        ok = all(int(a) <= int(b or a) for a, _, b in (p.partition("-") for p in parts))
    if not ok:
        raise ProbeError(f"bad --layers {value!r}; accepted: {accepted}")
    return value


def parse_scales(value) -> list[float]:
    """'1,2' or [1, 2] -> [1.0, 2.0]: multiples of o, finite numbers."""
    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        out = [float(x) for x in parts if not isinstance(x, bool)]  # true is no scale
    except (TypeError, ValueError):
        out = []
    out = out if len(out) == len(parts) else []
    if not out or not all(math.isfinite(x) for x in out):
        raise ProbeError(f"bad --scales {value!r}; accepted: numbers separated by commas, e.g. '1,2'")
    return out


def positions(flag: str) -> Callable[[Any], Any]:
    """Positions, whose grammar (positions.py) each probe checks with the forms it takes (catalog.probe_options),
    and the names a task gives with the task (catalog.check_task)."""
    def parse(value):
        return listed(value, flag, "positions as text, e.g. 'last' or '0,-1', a token index or a list of them",
                      ints=True)
    return parse


def boolean(name: str) -> Callable[[Any], bool]:
    def parse(value) -> bool:
        if not isinstance(value, bool):
            raise ProbeError(f"bad {name} {value!r}; accepted: true or false")
        return value
    return parse


def text(value):
    """Inputs of the task: comma-separated text, or a list (kept as given: an input may hold a comma)."""
    names = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
    if not names or not all(isinstance(v, str) and v.strip() for v in names):
        raise ProbeError(f"bad source_items {value!r}; accepted: inputs of the task, e.g. 'Poland,France'")
    return value


def lens(value):
    """logit, tuned or tuned:PATH, kept as given; whether the lens is there is the plan's check (it needs the model)."""
    if value in ("logit", "tuned") or isinstance(value, str) and value.startswith("tuned:") and value[6:].strip():
        return value
    raise ProbeError(f"bad --lens {value!r}; accepted: logit, tuned (the lens `probe lens train` caches for the "
                     "model) or tuned:PATH (a folder of config.json and params.pt, the tuned-lens package's format)")


SITES = ("resid", "attn", "ffn", "head")  # activation-patching's sites; linear-probe reads the first three
_OPTIONS = [
    Option("topk", "logit-lens, ffn-readout: top-k tokens kept per layer (default 5)", count("topk", 1), least=1,
           examples=(2,)),
    Option("vocab", "logit-lens, accuracy, ffn-*: all (the whole vocabulary, as the paper; default) or text (special "
           "and control tokens left out of top-k and ranks)", choice("--vocab", ("all", "text")),
           examples=("text",)),
    Option("lens", "logit-lens, ffn-readout, ffn-transplant (its source search): logit (final norm and unembedding; "
           "default), tuned (each layer's affine translator first: the tuned lens that `probe lens train --model M` "
           "caches for the model) or tuned:PATH (a lens folder in the tuned-lens package's format, config.json and "
           "params.pt)", lens, examples=("tuned",)),
    Option("layers", "blocks: 'all', '5', '3,7' or '10-17' (ffn-ablation: also 'sixths', the default)",
           lambda v: blocks(v, ("sixths",)), examples=("0", "1")),
    Option("mode", "ffn-transplant: add (to the residual after each block; default) or replace (the FFN updates of "
           "a range of blocks)", choice("transplant mode", ("add", "replace")),
           examples=("replace",), mode=True),
    Option("scales", "ffn-transplant: multiples of o, e.g. '1,2' (default 1)", checked(parse_scales),
           examples=("2",)),
    Option("positions", "token positions, comma-separated: last, all (each on its own), whole (all at once), token "
           "indices '0,5,-1', a slice '-3:', argument, or a position the task names (trees: goal, root, edge_up0, "
           "...). logit-lens: last (default; others give a layer x position heat map); activation-patching: all "
           "(default); ffn-transplant: last (add's default: o added at the last position) or all (replace's default: "
           "broadcast)", positions("--positions"), examples=("all", "last", "0", "-2:")),
    Option("controls", "ffn-transplant: skip shuffled and random vectors", boolean("controls"), flag="--no-controls",
           switch=False, examples=(False,)),
    Option("sources", "ffn-transplant: average o over this many source prompts", count("sources", 1), least=1,
           examples=(2,)),
    Option("source_items", "ffn-transplant: source inputs, e.g. 'Poland,France' (with --source-layer)", text,
           examples=lambda items: tuple(it.input for it in items[:2])),
    Option("source_layer", "ffn-transplant: block of o (default: the FFN switch block)", count("source_layer", 0),
           least=0, examples=(0, 1)),
    Option("context", "ffn-transplant targets: copy (the paper's neutral prompt; default) or zero-shot (the task's "
           "template without shots)", choice("transplant context", ("copy", "zero-shot")),
           examples=("zero-shot",)),
    Option("how", "ffn-ablation: zero (default) or identity", choice("ablation", ("zero", "identity")),
           flag="--ablation", examples=("identity",)),
    Option("sites", "activation-patching: resid (default), attn, ffn, head, e.g. 'resid,ffn'",
           names("patching site", SITES), examples=("attn", "ffn")),
    Option("direction", "activation-patching: denoise (clean into corrupted; default) or noise",
           choice("patching direction", ("denoise", "noise")), examples=("noise",)),
    Option("verify", "attribution-patching: how many of each pair's patches of largest |estimate| are re-run exactly "
           "(default 32), or all (every patch: the full comparison)", lambda v: v if v == "all" else count("verify", 0)(v),
           examples=(1, "all")),
    Option("qk_fix", "attribution-patching: AtP*'s QK fix, against attention saturation: a resid patch's change of "
           "its block's attention probabilities computed exactly (its query and key against the others), only their "
           "effect on LD to first order", boolean("qk_fix"), switch=True, examples=(True,)),
    Option("graddrop", "attribution-patching: AtP*'s GradDrop, against paths that cancel: one backward per block with "
           "that block's gradient dropped; a patch scores the mean |estimate| over them (unsigned)",
           boolean("graddrop"), switch=True, examples=(True,)),
    Option("label", "linear-probe: what to decode: group (default), answer, argument, or a column the task adds "
           "(e.g. match); several comma-separated", names("probe label"),
           examples=("answer", "argument")),
    Option("site", "linear-probe: resid (default), attn or ffn", choice("probe site", SITES[:3]),
           examples=("attn", "ffn")),
    Option("position", "linear-probe: last (default), argument, a position the task names (trees: goal, root, bar, "
           "colon, edge_up0, edge_up1, ...) or a token index; several comma-separated: one probe each",
           positions("--position"), examples=("0", "argument")),
    Option("erase", "linear-probe: a layer at which to erase the (first) label with LEACE and score the model's "
           "answers, against erasing as many random directions", checked(count("--erase", 0)),
           examples=(1, 0)),
    Option("early", "icl-score: the early token index (default 50)", count("early", 1), least=1,
           examples=(20,)),
    Option("late", "icl-score: the late token index (default 500)", count("late", 1), least=1,
           examples=(100,)),
]
OPTIONS: dict[str, Option] = {o.name: o for o in _OPTIONS}


def options_text() -> str:
    """Every option with its help, for the API's docstring and docs."""
    return "\n".join(f"    {o.name} ({o.cli}): {o.help}" for o in OPTIONS.values())
