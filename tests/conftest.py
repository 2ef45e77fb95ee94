import functools
import importlib.util
from pathlib import Path

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


ROOT = Path(__file__).resolve().parent.parent
TREE_TINY = {"model.n_layer": 2, "model.n_embd": 32, "model.n_inner": 64, "task.train": 256, "task.test": 32,
             "train.steps": 40, "train.batch_size": 16, "train.save_steps": 20, "train.eval_steps": 20}
ICL_TINY = {"task.test": 64, "train.steps": 12, "train.batch_size": 16, "train.eval_steps": 4, "train.save_steps": 4}


@pytest.fixture(scope="session")
def tree_run(tmp_path_factory):
    """The tree model (tree-paper's architecture at width 32) trained 40 steps on 256 trees: once a session."""
    from probes.training.config import load_training_config
    from probes.training.trainer import train

    folder = tmp_path_factory.mktemp("tree") / "run"
    train(load_training_config(ROOT / "configs" / "training" / "tree-paper.yaml", TREE_TINY), folder, progress=False)
    return folder


@pytest.fixture(scope="session")
def icl_run(tmp_path_factory):
    """The in-context classifier of icl-cpu (width 64) trained 12 steps: once a session."""
    from probes.training.config import load_training_config
    from probes.training.trainer import train

    folder = tmp_path_factory.mktemp("icl") / "run"
    train(load_training_config(ROOT / "configs" / "training" / "icl-cpu.yaml", ICL_TINY, seed=0), folder,
          progress=False)
    return folder
