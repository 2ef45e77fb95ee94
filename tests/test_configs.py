"""Every shipped model config builds its transformers model (on the meta device: no weights), and the small ones
run the lens through `probe run --model configs/<file>` as the README offers."""

import json
from pathlib import Path

import pytest
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from probes.errors import ProbeError, read_yaml
from probes.models.planning import model_config
from probes.models.registry import resolve_model

from .test_cli import probe_here

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))
SMALL = ("pythia-70m", "gpt2", "opt-125m")  # random weights built and saved here in seconds


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_builds_its_model(path):
    spec = resolve_model(str(path))
    config = model_config(spec)
    raw = json.loads(path.read_text())
    for key, value in raw.items():  # numbers keep their JSON types (1e-05 is a float, not the text '1e-05')
        if isinstance(value, (int, float)) and not isinstance(value, bool) and hasattr(config, key):
            assert getattr(config, key) == value and not isinstance(getattr(config, key), str), key
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    assert model.config.model_type == raw["model_type"]


@pytest.mark.parametrize("name", SMALL)
def test_small_shipped_configs_run_the_lens(name, capsys, tmp_path):
    r = probe_here(capsys, "run", "--model", f"configs/{name}.json", "--task", "capitals", "--task-option",
                   "ambiguous=flag", "--limit", "4", "--output", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["summary"]["scored_items"] == 4


def test_yaml_reads_numbers_as_yaml_1_2_and_json_as_json(tmp_path):
    (tmp_path / "c.yaml").write_text("eps: 1e-05\nbig: 1E6\nneg: -2.5e-3\nint: 12\nword: e5\nversion: 1.0.0\n")
    assert read_yaml(tmp_path / "c.yaml", "x") == {"eps": 1e-05, "big": 1e6, "neg": -2.5e-3, "int": 12,
                                                   "word": "e5", "version": "1.0.0"}
    (tmp_path / "c.json").write_text('{"eps": 1e-05, "on": "yes"}')
    assert read_yaml(tmp_path / "c.json", "x") == {"eps": 1e-05, "on": "yes"}  # JSON: "yes" stays text
    (tmp_path / "bad.json").write_text('{"eps": 1e-05,\n  oops}')
    with pytest.raises(ProbeError, match=r"malformed x '.*bad.json' at line 2"):
        read_yaml(tmp_path / "bad.json", "x")
