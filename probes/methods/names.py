"""The probes' names and their integer options' ranges, for the command line without importing the probes (torch,
nnsight); catalog.py checks at import that the names are its own, and checks every option value (from the command,
the API or a sweep file) against these ranges."""

from ..errors import ProbeError

NAMES = ("logit-lens", "accuracy", "ffn-readout", "ffn-transplant", "ffn-ablation", "nback", "attention",
         "activation-patching", "linear-probe", "logit-difference", "induction", "icl-score")

# integer options -> their least value (upper bounds that depend on the model are checked once it is loaded:
# catalog.check_bounds)
COUNTS = {"topk": 1, "sources": 1, "source_layer": 0, "early": 1, "late": 1}


def count_value(name: str, value) -> int:
    """`value` of integer option `name` (an int, or its digits as text), or a one-line error with its range."""
    text = str(value).strip()
    ok = not isinstance(value, (bool, float)) and text.lstrip("-").isdigit() and int(text) >= COUNTS[name]
    if not ok:
        raise ProbeError(f"bad {name} {value!r}; accepted: an integer of at least {COUNTS[name]}")
    return int(text)
