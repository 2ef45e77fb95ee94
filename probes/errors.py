"""The one exception type the CLI turns into a one-line error (no traceback)."""


class ProbeError(Exception):
    """Bad input or an unmet requirement, with a message that names the value and what is accepted."""


def choice_error(what: str, value, accepted) -> ProbeError:
    """`unknown model 'foo'; accepted: a, b, c` (accepted sorted, shown in full)."""
    return ProbeError(f"unknown {what} {value!r}; accepted: {', '.join(sorted(map(str, accepted)))}")
