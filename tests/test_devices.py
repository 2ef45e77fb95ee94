"""Placement: the device values users type, refused in one line when this machine lacks the device, and the default
decided from the GPUs there are (torch.cuda mocked: none, one that fits, one that does not, one partly used, two);
--max-memory and --gpus, and a quantized model that spills past the GPUs, as load_model hands them to
from_pretrained (stopped there)."""

from types import SimpleNamespace

import pytest
import torch

from probes.errors import ProbeError
from probes.models import devices
from probes.models.devices import HEADROOM, check_here, default_device_map, parse_device_map
from probes.models.loading import checkpoint, load_model
from probes.models.options import load_options, quiet_bitsandbytes

from .conftest import REGISTRY, loaded
from .test_cli import probe_here

GiB, MiB = 2**30, 2**20


def gpus(monkeypatch, *sizes, free=None, unit=GiB):
    """This machine seen with GPUs of these sizes (none: no CUDA), `free` of each free now (default: all of it)."""
    free = free or sizes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(sizes))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(sizes))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=int(sizes[i] * unit), name=f"GPU{i}"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(free[i] * unit), int(sizes[i] * unit)))


class Stop(Exception):
    """Raised by the stand-in from_pretrained: what load_model hands it is the test's."""


@pytest.fixture
def handed(monkeypatch):
    """`handed(name, **overrides)`: the keyword arguments load_model gives from_pretrained for that model, which it
    stops (nothing loads). The checkpoint and bitsandbytes are readied first, before a test mocks torch.cuda."""
    from transformers import AutoModelForCausalLM

    quiet_bitsandbytes()
    from transformers.integrations import replace_with_bnb_linear  # noqa: F401  (imports bitsandbytes, no CUDA)

    checkpoint(REGISTRY["tiny-gpt2"])
    seen = {}

    def from_pretrained(src, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)

    def load(name, **overrides):
        seen.clear()
        with pytest.raises(Stop):
            load_model(REGISTRY[name], **overrides)
        return dict(seen)

    return load


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
    assert default_device_map(weights(70)) == "auto"  # does not (HEADROOM kept free): every GPU, CPU beyond
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


def test_the_fit_test_reads_the_free_memory_and_keeps_headroom(monkeypatch):
    gpus(monkeypatch, 80, free=(40,))  # another process holds half the GPU
    assert default_device_map(lambda: 50 * GiB) == "auto"  # within 80% of the total, not within what is free
    assert default_device_map(lambda: (40 - HEADROOM * 80) * GiB) == "cuda:0"
    assert default_device_map(lambda: (40 - HEADROOM * 80) * GiB + 1) == "auto"  # the headroom is kept free
    gpus(monkeypatch, 80, 80, free=(10, 80))  # the first GPU nearly full: spread, though the second is idle
    assert default_device_map(lambda: 20 * GiB) == "auto"


def test_max_memory_changes_the_default_placement(handed, monkeypatch):
    gpus(monkeypatch, 80)
    assert handed("tiny-gpt2")["device_map"] == "cuda:0"  # about 1 MiB: the first GPU
    kw = handed("tiny-gpt2", max_memory="0=200KiB,cpu=1GiB")  # the first GPU capped below the weights: spread
    assert kw["device_map"] == "auto" and kw["max_memory"] == {0: "200KiB", "cpu": "1GiB"}
    assert handed("tiny-gpt2", max_memory="0=10MiB")["device_map"] == "cuda:0"
    assert handed("tiny-gpt2", max_memory="1=10MiB,cpu=1GiB")["device_map"] == "auto"  # no entry for GPU 0


def test_max_memory_that_cannot_hold_the_weights_is_refused(handed, monkeypatch):
    gpus(monkeypatch, 80, 80)
    for kw, where in (({"max_memory": "0=200KiB,cpu=200KiB"}, "holds 0.0 GiB in all"),
                      ({"max_memory": "0=200KiB", "device_map": "auto"}, "holds 0.0 GiB in all"),
                      ({"max_memory": "1=200KiB", "device_map": "cuda:1"}, "gives cuda:1 0.0 GiB")):
        with pytest.raises(ProbeError, match=rf"^max_memory '[^']+' {where}, and the weights take 0\.0 GiB"
                                             r"[^\n]*; accepted: [^\n]+$"):
            handed("tiny-gpt2", **kw)
    assert handed("tiny-gpt2", max_memory="0=200KiB", device_map="cuda:1")["device_map"] == "cuda:1"  # no cap


def test_gpus_n_leaves_headroom_on_each_gpu(monkeypatch):
    gpus(monkeypatch, 80, 80, free=(70, 80))
    memory = load_options(REGISTRY["tiny-gpt2"], gpus=2)["max_memory"]
    assert memory[0] == int((70 - HEADROOM * 80) * GiB) and memory[1] == int((1 - HEADROOM) * 80 * GiB)
    assert memory["cpu"] > 0 and set(memory) == {0, 1, "cpu"}


@pytest.mark.parametrize("device_map", [None, "auto"])
def test_an_8bit_model_that_spills_gets_the_cpu_offload(handed, monkeypatch, device_map):
    gpus(monkeypatch, 0.4, unit=MiB)  # room for part of tiny-gpt2 in 8-bit (0.35 MiB)
    kw = handed("tiny-gpt2", quantize="8bit", device_map=device_map)
    assert isinstance(kw["device_map"], dict) and {0, "cpu"} <= set(kw["device_map"].values())
    assert kw["quantization_config"].llm_int8_enable_fp32_cpu_offload
    gpus(monkeypatch, 80)  # it fits: no offload
    kw = handed("tiny-gpt2", quantize="8bit", device_map=device_map)
    assert kw["device_map"] in ("cuda:0", "auto") and not kw["quantization_config"].llm_int8_enable_fp32_cpu_offload


def test_a_4bit_model_that_spills_is_refused_in_one_line(handed, monkeypatch):
    gpus(monkeypatch, 0.35, unit=MiB)  # room for part of tiny-gpt2 in 4-bit (0.31 MiB)
    for device_map in (None, "auto"):
        with pytest.raises(ProbeError, match=r"^tiny-gpt2 in 4bit does not fit on the GPUs \(0\.0 GiB for weights; "
                                             r"it takes 0\.0 GiB\): device map auto would put part of it on the CPU "
                                             r"or disk[^\n]*; accepted: --quantize 8bit[^\n]+$"):
            handed("tiny-gpt2", quantize="4bit", device_map=device_map)
