"""Placement: the device values users type, refused in one line when this machine lacks the device, and the default
decided from the GPUs there are (torch.cuda mocked: none, one that fits, one that does not, two)."""

from types import SimpleNamespace

import pytest
import torch

from probes.errors import ProbeError
from probes.models import devices
from probes.models.devices import check_here, default_device_map, parse_device_map

from .conftest import loaded
from .test_cli import probe_here

GiB = 2**30


def gpus(monkeypatch, *sizes_gib):
    """This machine seen with GPUs of these sizes (none: no CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(sizes_gib))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(sizes_gib))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=int(sizes_gib[i] * GiB), name=f"GPU{i}"))


@pytest.mark.parametrize("value, parsed", [("cpu", "cpu"), ("cuda", "cuda:0"), ("cuda:0", "cuda:0"), ("cuda:3", "cuda:3"),
                                           ("auto", "auto"), ("balanced_low_0", "balanced_low_0"), (None, None)])
def test_device_values_users_type_are_accepted(value, parsed):
    assert parse_device_map(value) == parsed


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:-1", "CUDA", "cuda0", "tpu", "everywhere"])
def test_other_device_values_are_one_line_naming_what_is_accepted(value):
    with pytest.raises(ProbeError, match=rf"unknown device map '{value}'; accepted: auto, balanced, balanced_low_0, "
                                         "sequential, cpu, cuda, cuda:N"):
        parse_device_map(value)


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    gpus(monkeypatch)
    with pytest.raises(ProbeError, match="'cuda:0': this machine has no CUDA GPU; accepted: cpu"):
        check_here("cuda:0")
    check_here("cpu"), check_here("auto")  # accelerate's strategies place everything on the CPU without a GPU
    gpus(monkeypatch, 80, 80)
    check_here("cuda:1")
    with pytest.raises(ProbeError, match="'cuda:2': this machine has 2 CUDA GPU\\(s\\); accepted: cuda:0 to cuda:1"):
        check_here("cuda:2")


def test_the_default_placement_follows_the_gpus_there_are(monkeypatch):
    asked = []

    def weights(n_gib):
        return lambda: asked.append(n_gib) or n_gib * GiB

    gpus(monkeypatch)
    assert default_device_map(weights(1)) is None and not asked  # no GPU: the CPU, and no planning at all
    gpus(monkeypatch, 80)
    assert default_device_map(weights(10)) == "cuda:0"  # fits on the first GPU
    assert default_device_map(weights(70)) == "auto"  # does not (80% of it at most): every GPU, CPU beyond
    gpus(monkeypatch, 24, 80)
    assert default_device_map(weights(10)) == "cuda:0" and default_device_map(weights(30)) == "auto"


def test_the_run_says_where_the_model_went(capsys, tmp_path):
    lm = loaded("tiny-gpt2")
    assert lm.placement == {"device_map": "cpu", "devices": ["cpu"], "gpus": [], "default": True}
    assert devices.describe(lm.placement, lm.dtype) == "on cpu, float32, by default"
    r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--task", "capitals", "--task-option", "ambiguous=flag",
                   "--limit", "2", "--device-map", "cpu", "--output", tmp_path / "r")
    assert r.returncode == 0 and "on cpu, float32\n" in r.stderr
    r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--task", "capitals", "--device-map", "cuda")
    if not torch.cuda.is_available():
        assert r.returncode == 2 and "this machine has no CUDA GPU" in r.stderr.strip().splitlines()[-1]
