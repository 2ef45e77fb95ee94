"""The probes on the in-context classifier, a model that reads vectors: its test sets as items (`kind: icl`), fed as
`inputs_embeds` through the same trace as text. On the same weights and sequences, accuracy and the query's
attention equal what training logged; the lens's last layer is the logits; patching the clean sequence into itself
changes nothing and the whole residual at block 0 recovers everything; text and vectors never meet a model of the
other kind."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from probes.errors import ProbeError
from probes.methods.attention import run_attention
from probes.methods.lens import run_lens
from probes.methods.patch_engine import patch_logits
from probes.methods.patching import prepare_patching, run_patching
from probes.models.loading import load_model
from probes.models.registry import resolve_model
from probes.runs.execution import run_probe
from probes.tasks.files import load_task
from probes.training import icl_data as icl

from .conftest import loaded as text_model
from .test_cli import ENV, probe_here
from .test_icl import SETS

# the run (conftest.icl_run) is icl-cpu's, width 64: rows of a batch are 256 bytes apart (aligned), so BLAS rounds
# every row alike and patched rows can equal unpatched ones exactly (at icl-paper's 150 they differ by 1e-7)
N = SETS["task.test"]  # the test sets' size in the tiny run, all of whose sequences are probed


@pytest.fixture(scope="module")
def run(icl_run):
    return icl_run


@pytest.fixture(scope="module")
def model(run):
    return load_model(resolve_model(str(run)))


def task(**changes):
    return load_task("icl-trained", {"test": N, "sequences": N, "max_pairs": 12, "item_dim": 39, **changes})


def test_items_are_the_logged_test_set_with_positions_by_meaning(run):
    t = task()
    items = t.items()
    fixed = icl.Fixed(t.generator(), "ic", N)
    assert len(items) == N and all(np.array_equal(it.prompt.embeds, fixed.x[i].numpy()) for i, it in enumerate(items))
    assert [int(it.output) for it in items] == fixed.y[:, -1].tolist()
    it = items[0]
    words = str(it.prompt).split()
    at = {name: len(str(it.prompt)[:c].split()) for name, c in it.positions.items()}  # word index of each name
    assert words[at["match_item"]] == "x" and words[at["match_label"]] == it.output and at["query"] == len(words) - 1
    relabelled, answer = t.corrupted(it)  # the query's class taught another label, one the context does not use
    changed = np.flatnonzero((relabelled.embeds != it.prompt.embeds).any(1))
    assert changed.tolist() == [2 * int(j) + 1 for j in it.extra["match_items"].split()] and len(changed) == 2
    assert answer.strip() not in words and [relabelled.split()[k] for k in changed] == [answer.strip()] * 2
    label = t.drawn()["label_vectors"][int(answer)]
    assert all(np.allclose(relabelled.embeds[k, 25:], label) for k in changed)  # 25 = the position's dimensions


def test_accuracy_and_query_attention_equal_the_training_log(run, model, tmp_path):
    log = pd.read_csv(run / "log.csv").iloc[-1]
    table, summary = run_probe(model, task(), "accuracy", tmp_path / "a", options={"vocab": "text"}, progress=False)
    assert summary["accuracy"] == log.eval_ic_accuracy and summary["items"] == N  # the log scores the 32 labels
    rows = pd.DataFrame(run_attention(model, task().items()))
    for layer, g in rows.groupby("layer"):
        assert g.item_mass.mean() == pytest.approx(log[f"eval_ic_query_item_L{layer}"], abs=1e-6)
        assert g.label_mass.mean() == pytest.approx(log[f"eval_ic_query_label_L{layer}"], abs=1e-6)
    assert rows.uniform_mass.mean() == pytest.approx(log.eval_ic_query_uniform, abs=1e-6)


def test_the_lens_at_the_last_layer_is_the_logits(model):
    items = task().items()[:8]
    lens = pd.DataFrame(run_lens(model, items))
    last = lens[lens.layer == lens.layer.max()].sort_values("item")
    with torch.no_grad():
        logits = model.arch.hf(inputs_embeds=torch.from_numpy(np.stack([it.prompt.embeds for it in items]))).logits
    target = torch.tensor([int(it.output) for it in items])
    ranks = (logits[:, -1] > logits[:, -1].gather(1, target[:, None])).sum(1)
    assert last.answer_rank.tolist() == ranks.tolist()


def test_patching_vectors_into_themselves_changes_nothing_and_the_whole_input_recovers_all(model):
    t = task()
    items, _, meta = prepare_patching(model, t, t.items()[:16], {})
    assert meta["pairs"] == 16
    it = items[0]
    out = patch_logits(model, it.prompt, it.prompt, [("resid", b, p) for b in range(2) for p in range(17)] + [("attn", 1, 16)],
                       skip_unchanged=False)  # run, not taken as unchanged
    assert torch.equal(out[2:], out[1:2].expand(len(out) - 2, -1))
    rows = pd.DataFrame(run_patching(model, items, layers="0", positions="whole"))
    used = rows[(rows.ld_source - rows.ld_dest).abs() > 1e-6]
    assert len(used) and (used.recovery == 1).all()


def test_text_and_vectors_never_meet_a_model_of_the_other_kind(run, model, capsys):
    r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--task", "icl-trained", "--probe", "accuracy")
    assert r.returncode == 2 and "is vectors (in-context classification)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(ProbeError, match="draws vectors of width 150, and .* reads 64"):
        run_probe(model, task(max_pairs=32, item_dim=85), "accuracy", run.parent / "w", progress=False)
    with pytest.raises(ProbeError, match="this probe gave it text or token ids"):
        model.trace("x 1 x")
    with pytest.raises(ProbeError, match="set 'icl'; accepted: in, ic, ic2, iw"):
        task(set="icl")
    with pytest.raises(ProbeError, match="sequences 65; accepted: 1 to test"):
        task(sequences=N + 1)
    with pytest.raises(ProbeError, match="reads text, and was given vectors"):
        text_model("tiny-gpt2").trace(task().items()[0].prompt)  # never read as the words that name its positions


def test_a_trained_run_loads_with_plain_transformers_after_import_probes(run):
    """`import probes` registers the project's architectures with transformers' Auto classes (a fresh process:
    nothing else imported), while `probe --help` still starts without torch."""
    code = ("import sys, probes, torch\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "print(type(m).__name__, AutoConfig.for_model('gpt2_value_residual').model_type)")
    r = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ProbeTransformerForCausalLM", "gpt2_value_residual"]
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "probes", "--help"], capture_output=True, text=True,
                       env=ENV)
    assert r.returncode == 0 and " torch" not in r.stderr and " transformers" not in r.stderr
