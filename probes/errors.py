"""The one exception type the CLI turns into a one-line error (no traceback)."""


class ProbeError(Exception):
    """Bad input or an unmet requirement, with a message that names the value and what is accepted."""


def choice_error(what: str, value, accepted) -> ProbeError:
    """`unknown model 'foo'; accepted: a, b, c` (accepted sorted, shown in full)."""
    return ProbeError(f"unknown {what} {value!r}; accepted: {', '.join(sorted(map(str, accepted)))}")


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or a CPU allocator failure (a RuntimeError)."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                            or "not enough memory" in text)
