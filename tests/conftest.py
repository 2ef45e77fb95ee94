import functools
import importlib.util

import pytest

from probes.models.loading import load_model
from probes.models.registry import load_registry

REGISTRY = load_registry()
TINY = sorted(name for name, spec in REGISTRY.items() if spec.source == "random")


@functools.cache
def loaded(name: str, **kwargs):
    """One load per model and options for the whole session."""
    return load_model(REGISTRY[name], **kwargs)


def bundled(name: str):
    spec = REGISTRY[name]
    if importlib.util.find_spec(spec.gguf["package"]) is None:
        pytest.fail(f"bundled model {name} needs package {spec.gguf['package']}: see README")
    return loaded(name)


@pytest.fixture(params=TINY)
def tiny(request):
    return loaded(request.param)
