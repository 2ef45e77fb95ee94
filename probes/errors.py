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


def read_yaml(path, what: str, missing: str = ""):
    """YAML from `path`; a missing file or malformed YAML is a ProbeError naming `what`, the file and the line."""
    import yaml
    from pathlib import Path

    try:
        return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise ProbeError(f"{what} {str(path)!r} not found{missing}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ProbeError(f"malformed {what} {str(path)!r}{at}: {getattr(e, 'problem', e)}")
