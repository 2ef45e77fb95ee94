"""The one exception type the CLI turns into a one-line error (no traceback)."""

import functools


class ProbeError(Exception):
    """Bad input or an unmet requirement, with a message that names the value and what is accepted."""


def choice_error(what: str, value, accepted) -> ProbeError:
    """`unknown model 'foo'; accepted: a, b, c` (accepted sorted, shown in full)."""
    return ProbeError(f"unknown {what} {value!r}; accepted: {', '.join(sorted(map(str, accepted)))}")


@functools.cache
def _yaml12_loader():
    """PyYAML's safe loader with YAML 1.2's number rules: under YAML 1.1 (PyYAML's), `1e-05` has no decimal point
    and is a string, so a config's `layer_norm_eps: 1e-05` would reach transformers as text."""
    import re

    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
        list("-+.0123456789"))
    return Loader


def read_yaml(path, what: str, missing: str = ""):
    """A YAML (1.2 numbers) or, for a `.json` file, JSON document from `path`; a missing file or a malformed one is
    a ProbeError naming `what`, the file and the line."""
    import json
    from pathlib import Path

    import yaml

    try:
        text = Path(path).read_text()
        if Path(path).suffix == ".json":
            return json.loads(text)
        return yaml.load(text, Loader=_yaml12_loader())
    except FileNotFoundError:
        raise ProbeError(f"{what} {str(path)!r} not found{missing}")
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ProbeError(f"{what} {str(path)!r} is not a text file ({type(e).__name__}); accepted: a YAML or JSON file")
    except json.JSONDecodeError as e:
        raise ProbeError(f"malformed {what} {str(path)!r} at line {e.lineno}: {e.msg}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ProbeError(f"malformed {what} {str(path)!r}{at}: {getattr(e, 'problem', e)}")
