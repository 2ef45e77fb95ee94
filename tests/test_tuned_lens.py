"""The tuned lens (probes/methods/tuned_lens.py): untrained it is the logit lens for every family; training where the
logit lens is already exact leaves it there; it saves and loads in the tuned-lens package's format (and loads one the
package saved); a lens trained on one model is refused on another in one line; `--lens tuned` changes the lens
table and `--lens logit` leaves it as it was."""

import hashlib
import json
import os
import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

import probes
from probes.errors import ProbeError
from probes.methods.lens import run_lens
from probes.methods.tuned_lens import TunedLens, load_lens, package_config, save_lens, train_lens
from probes.models.loading import checkpoint, load_model
from probes.runs.plan import plan_run
from probes.tasks.prompts import prompts_task

from .conftest import REGISTRY, ROOT, TINY, loaded
from .test_cli import probe_here

PROMPTS = [{"prompt": "The capital of France is", "answer": "Paris", "argument": "France"},
           {"prompt": "Q: What is the capital of Poland?\nA:", "answer": "Warsaw", "argument": "Poland"}]
# the tuned-lens package's TunedLensConfig fields (tuned_lens/nn/lenses.py, 0.2.0)
PACKAGE_CONFIG = {"base_model_name_or_path", "d_model", "num_hidden_layers", "bias", "base_model_revision",
                  "unembed_hash", "lens_type"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A file corpus of the shipped task files, documents separated as TinyStories' .txt files are."""
    path = tmp_path_factory.mktemp("corpus") / "tasks.txt"
    path.write_text("\n<|endoftext|>\n".join(f.read_text() for f in sorted((ROOT / "tasks").glob("*.yaml"))))
    return f"file:{path}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A lens of tiny-gpt2 trained 8 steps of 256 tokens."""
    return train_lens(loaded("tiny-gpt2"), 2048, corpus, tmp_path_factory.mktemp("lens") / "gpt2", seq_len=256)


def random_lens(lm, seed: int = 0) -> TunedLens:
    lens = TunedLens(package_config(lm))
    torch.manual_seed(seed)
    for p in lens.parameters():
        p.data.normal_(0, 0.05)
    return lens


@pytest.mark.parametrize("name", TINY)
def test_an_untrained_lens_is_the_logit_lens(name):
    lm = loaded(name)
    items = prompts_task(rows=PROMPTS).items()
    identity = TunedLens(package_config(lm)).to(lm.arch.unembed_device)
    logit, tuned = pd.DataFrame(run_lens(lm, items)), pd.DataFrame(run_lens(lm, items, state=identity))
    pd.testing.assert_frame_equal(logit, tuned, rtol=1e-6, atol=0)  # float32 rounding at most


def test_training_where_the_logit_lens_is_exact_keeps_the_identity(corpus, tmp_path):
    """Blocks whose attention and FFN updates are zero leave every residual the last one: each layer's logit lens is
    the model's distribution, KL 0, and the translators stay at zero; the model is not changed."""
    lm = load_model(REGISTRY["tiny-gpt2"])  # its own copy: its weights are edited
    for block in lm.arch.hf.transformer.h:
        for module in (block.attn.c_proj, block.mlp.c_proj):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    before = {k: v.clone() for k, v in lm.arch.hf.state_dict().items()}
    folder = train_lens(lm, 1024, corpus, tmp_path / "lens", seq_len=128)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["steps"] == 8 and max(meta["kl_final"]) < 1e-6
    assert max(float(p.abs().max()) for p in load_lens(folder, lm).parameters()) < 1e-6
    assert all(torch.equal(v, lm.arch.hf.state_dict()[k]) for k, v in before.items())


def test_save_and_load_give_the_same_lens(tmp_path):
    lm = loaded("tiny-llama")
    lens = random_lens(lm)
    save_lens(lens, tmp_path / "lens", {"model": {"key": "never compared"}})
    (tmp_path / "lens" / "meta.json").unlink()  # the package's folder: checked by layers, width and hash
    back = load_lens(tmp_path / "lens", lm)
    h = torch.randn(3, lm.arch.n_layers + 1, 5, 64)
    assert torch.equal(back.translate(h), lens.translate(h))
    assert torch.equal(back.translate(h)[:, -1], h[:, -1])  # the last index has no translator
    assert not torch.equal(back.translate(h)[:, 0], h[:, 0])


def test_the_files_are_the_package_s_format(trained):
    lm = loaded("tiny-gpt2")
    assert sorted(p.name for p in trained.iterdir()) == ["config.json", "meta.json", "params.pt"]
    config = json.loads((trained / "config.json").read_text())
    assert set(config) == PACKAGE_CONFIG and config["lens_type"] == "linear_tuned_lens"
    assert (config["d_model"], config["num_hidden_layers"]) == (64, 2)
    # the package's Unembed.unembedding_hash (tuned_lens/utils.py tensor_hash), computed here as it does
    weight = lm.arch.hf.get_output_embeddings().weight.detach().float().numpy()
    assert config["unembed_hash"] == hashlib.sha256(str.encode(np.array_str(weight, precision=1))).hexdigest()
    # params.pt: what the package's layer_translators.load_state_dict takes
    translators = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))
    translators.load_state_dict(torch.load(trained / "params.pt", weights_only=True))
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["tokens"] == 2048 and meta["steps"] == 8 and len(meta["kl_final"]) == 2
    assert meta["model"]["name"] == "tiny-gpt2" and meta["seconds"] > 0


def test_a_lens_saved_as_the_package_saves_it_is_read(tmp_path):
    """As the package's TunedLens.save writes: torch.save(layer_translators.state_dict()), json.dump(config)."""
    lm = loaded("tiny-gpt2")
    translators = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))
    torch.manual_seed(1)
    for p in translators.parameters():
        p.data.normal_(0, 0.05)
    config = {**package_config(lm), "base_model_name_or_path": "gpt2"}
    (tmp_path / "pkg").mkdir()
    torch.save(translators.state_dict(), tmp_path / "pkg" / "params.pt")
    (tmp_path / "pkg" / "config.json").write_text(json.dumps(config))
    lens = load_lens(tmp_path / "pkg", lm)
    h = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.allclose(lens.transform(h, 1), h + translators[1](h))
    (tmp_path / "pkg" / "config.json").write_text(json.dumps({**config, "unembed_hash": "0" * 64}))
    with pytest.raises(ProbeError, match="trained on gpt2, not tiny-gpt2"):
        load_lens(tmp_path / "pkg", lm)


def test_a_lens_of_one_model_is_refused_on_another_in_one_line(trained):
    task = prompts_task(rows=PROMPTS)
    with pytest.raises(ProbeError) as e:
        probes.run(loaded("tiny-llama"), task, "logit-lens", lens=f"tuned:{trained}")
    assert "\n" not in str(e.value) and "tiny-gpt2" in str(e.value) and "tiny-llama" in str(e.value)


@pytest.mark.parametrize("value, message", [
    ("tuned", "no tuned lens for tiny-gpt2 in the cache"), ("tuned:/no/such/lens", "holds no config.json"),
    ("lucky", "bad --lens 'lucky'")])
def test_a_lens_that_is_not_there_is_refused_before_loading(value, message, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_CACHE", str(tmp_path))
    with pytest.raises(ProbeError, match=message) as e:
        plan_run("tiny-gpt2", [prompts_task(rows=PROMPTS)], "logit-lens", {"lens": value})
    assert "\n" not in str(e.value)


def test_lens_tuned_changes_the_table_and_lens_logit_keeps_it(trained, corpus, tmp_path, monkeypatch, capsys):
    lm, task = loaded("tiny-gpt2"), prompts_task(rows=PROMPTS)

    def run(name, **options):
        out = tmp_path / name
        result = probes.run(lm, task, "logit-lens", output=out, **options)
        return result.table, json.loads((out / "meta.json").read_text())

    today, meta = run("today")
    logit, _ = run("logit", lens="logit")
    tuned, tuned_meta = run("tuned", lens=f"tuned:{trained}")
    pd.testing.assert_frame_equal(today, logit)
    assert not today.answer_prob.equals(tuned.answer_prob)
    assert tuned_meta["self_check"] == meta["self_check"]  # the self-check reads the logit lens
    assert tuned_meta["prepared"]["tuned_lens"]["folder"] == str(trained)
    assert tuned_meta["config"]["options"]["lens"] == f"tuned:{trained}" and "lens" not in meta["config"]["options"]
    # --lens tuned: the lens `probe lens train` put in the model's cache folder
    monkeypatch.setenv("PROBE_CACHE", str(tmp_path / "cache"))
    r = probe_here(capsys, "lens", "train", "--model", "tiny-gpt2", "--tokens", "1024", "--corpus", corpus)
    assert r.returncode == 0, r.stderr
    cached, _ = run("cached", lens="tuned")
    assert not today.answer_prob.equals(cached.answer_prob)


def test_the_command_trains_and_prints_the_figures(corpus, tmp_path, capsys):
    r = probe_here(capsys, "lens", "train", "--model", "tiny-gpt2", "--tokens", "1024", "--corpus", corpus,
                   "--output", tmp_path / "lens")
    assert r.returncode == 0, r.stderr
    assert "1,024 tokens" in r.stdout and "0: " in r.stdout and f"--lens tuned:{tmp_path / 'lens'}" in r.stdout
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for args, message in ((["--tokens", "10"], "--tokens 10 is less than one chunk of 1024 tokens"),
                          (["--tokens", "10000000"], "gives 6 chunks of 1024 tokens, fewer than the 9750"),
                          (["--output", tmp_path / "mine"], "exists and is not a tuned lens folder")):
        r = probe_here(capsys, "lens", "train", "--model", "tiny-gpt2", "--corpus", corpus, *args)
        assert r.returncode == 2 and message in r.stderr.splitlines()[-1], r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


SIDE = os.environ.get("TUNED_LENS_SIDE")  # a folder the package was installed into (shared/notes/tuned-lens.md)
PACKAGE = importlib.util.find_spec("tuned_lens") is not None or bool(SIDE and os.path.isdir(SIDE))


@pytest.mark.skipif(not PACKAGE, reason="the tuned-lens package is neither installed nor in a side folder named by "
                    "TUNED_LENS_SIDE (pip install --no-deps --target SIDE, shared/notes/tuned-lens.md)")
def test_with_the_package_itself(trained, tmp_path):
    """The package reads our lens and decodes as we do; we read one it saved and decode as it does."""
    lm = loaded("tiny-gpt2")
    h = torch.randn(2, 2, 5, 64)  # layer, batch, position, width
    torch.save(h, tmp_path / "h.pt")
    script = textwrap.dedent("""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from tuned_lens.nn.lenses import TunedLens
        checkpoint, ours, theirs, folder = sys.argv[1:]
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        h = torch.load(folder + "/h.pt")
        lens = TunedLens.from_model_and_pretrained(model, ours)
        package = TunedLens.from_model(model)
        torch.manual_seed(0)
        for p in package.layer_translators.parameters():
            p.data.normal_(0, 0.05)
        package.save(theirs)
        with torch.no_grad():
            torch.save({"ours": torch.stack([lens(h[i], idx=i) for i in range(2)]),
                        "theirs": torch.stack([package(h[i], idx=i) for i in range(2)])}, folder + "/out.pt")
    """)
    env = {**os.environ, "PYTHONPATH": SIDE or ""}
    r = subprocess.run([sys.executable, "-c", script, checkpoint(lm.spec)[0], str(trained), str(tmp_path / "theirs"),
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    for name, lens in (("ours", load_lens(trained, lm)), ("theirs", load_lens(tmp_path / "theirs", lm))):
        mine = torch.stack([lm.arch.decode(lens.transform(h[i], i)) for i in range(2)])
        assert torch.allclose(mine, out[name], atol=1e-5), name
