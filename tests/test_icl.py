"""Reddy's in-context classification task and the toy model of Burns, Fukai & Earls: the generator's properties
(burstiness, label mapping, novel classes, target absent for iw, positions), the value residual of the toy model
against the computation written out by hand, training through `probe train` (resume, logs), and bad configs."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from probes.errors import ProbeError
from probes.models.custom import ProbeTransformerConfig, ProbeTransformerForCausalLM
from probes.tasks import icl_sequences as generator
from probes.training import icl_data as icl
from probes.training.config import load_training_config
from probes.training.trainer import train

from .conftest import ICL_TINY
from .test_cli import probe
from .test_training import ROOT, _kill_after

PAPER = ROOT / "configs" / "training" / "icl-paper.yaml"
TASK = {k: v for k, (_, v) in generator.FIELDS.items()}
P = TASK["pairs"]


def draw(kind: str, n: int = 3000, **task):
    t = {**TASK, **task}
    return generator.Classes(t), generator.Classes(t).sample(n, np.random.default_rng(7), kind)


def content(x):
    return x[..., 2 * TASK["max_pairs"] + 1:]


def test_positions_are_a_shifted_one_hot_and_labels_are_their_vectors():
    classes, s = draw("in")
    x, pos = s["inputs_embeds"], 2 * TASK["max_pairs"] + 1
    onehot = x[..., :pos]
    assert np.array_equal(onehot.sum(-1), np.ones(x.shape[:2]))
    at = onehot.argmax(-1)
    assert np.array_equal(at - at[:, :1], np.broadcast_to(np.arange(2 * P + 1), at.shape))  # consecutive
    assert at[:, 0].min() == 0 and at[:, -1].max() == pos - 1  # every shift, up to the last that fits
    assert np.array_equal(content(x[:, 1:-1:2]), classes.label_vectors[s["labels"]].astype(np.float32))


def test_bursty_contexts_hold_each_class_burstiness_times_with_distinct_labels():
    classes, s = draw("ic2")  # known classes, bursty
    for row, query in zip(s["classes"][:, :P], s["classes"][:, P]):
        values, counts = np.unique(row, return_counts=True)
        assert len(values) == P // TASK["burstiness"] and set(counts) == {TASK["burstiness"]}
        assert len(set(values % TASK["labels"])) == len(values) and query in values
    assert np.array_equal(s["match"], s["classes"][:, :P] == s["classes"][:, P:])


def test_labels_are_the_class_mod_L_and_ic2_shifts_them_by_one():
    _, s = draw("in")
    known = s["classes"][:, 0] >= 0
    assert np.array_equal(s["labels"][known], s["classes"][known, :P] % TASK["labels"])
    assert np.array_equal(s["target"][known], s["classes"][known, P] % TASK["labels"])
    _, s2 = draw("ic2")
    assert np.array_equal(s2["labels"], (s2["classes"][:, :P] + 1) % TASK["labels"])
    assert np.array_equal(s2["target"], (s2["classes"][:, P] + 1) % TASK["labels"])


def test_novel_classes_are_never_the_known_ones_and_the_answer_is_in_the_context():
    classes, s = draw("ic")
    e = 1 / math.sqrt(1 + TASK["noise"] ** 2)
    items = content(s["inputs_embeds"][:, 0::2]).reshape(-1, TASK["item_dim"]) / e
    nearest = np.min(np.linalg.norm(items[:, None] - classes.means[None], axis=-1), axis=1)
    _, known = draw("iw", n=300)
    known_items = content(known["inputs_embeds"][:, 0::2]).reshape(-1, TASK["item_dim"]) / e
    known_nearest = np.min(np.linalg.norm(known_items[:, None] - classes.means[None], axis=-1), axis=1)
    assert nearest.min() > 0.6 > 0.2 > known_nearest.max()  # noise 0.1 around a known mean; novel ones far
    assert (s["classes"] == -1).all() and s["match"].sum(1).min() == TASK["burstiness"]
    assert all(t in row for t, row in zip(s["target"], s["labels"]))  # only the context tells the label


def test_iw_never_has_the_query_class_in_its_context():
    _, s = draw("iw")
    assert not (s["classes"][:, :P] == s["classes"][:, P:]).any() and not s["match"].any()


def test_the_training_mixture_has_the_configured_proportions():
    _, s = draw("train", n=8000)
    novel = s["classes"][:, 0] == -1
    bursty = ~novel & (s["match"].sum(1) == TASK["burstiness"]) & (np.array([len(set(r)) for r in s["classes"][:, :P]]) == 4)
    sd = math.sqrt(0.25 / 8000)
    assert abs(novel.mean() - 0.5) < 4 * sd and abs(bursty.mean() - 0.25) < 4 * 2 * sd


def test_fresh_batches_are_a_function_of_their_indices():
    fresh = icl.Fresh(TASK, 1000)
    a, b, c = fresh.collate([3, 5, 9]), fresh.collate([3, 5, 9]), fresh.collate([3, 5, 10])
    assert torch.equal(a["inputs_embeds"], b["inputs_embeds"]) and not torch.equal(a["inputs_embeds"], c["inputs_embeds"])
    assert (a["target"][:, :-1] == -100).all() and (a["target"][:, -1] >= 0).all()


def toy(mode: str) -> ProbeTransformerForCausalLM:
    torch.manual_seed(0)
    cfg = ProbeTransformerConfig(vocab_size=34, n_positions=17, n_layer=3, n_head=1, n_embd=150, ffn=False, norm=False,
                                 residual=True, positions=False, attn_bias=False, attn_out=False, attn_scale=False,
                                 value_residual=mode, head_layers=3, init_attn_std=1 / math.sqrt(85))
    return ProbeTransformerForCausalLM(cfg).eval()


def by_hand(model, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The authors' forward (toy-Transformer/transformer_v2_v_residuals_V1.py), written out: attention without
    scaling, biases or output projection, values plus layer l-1's raw values (previous) or averaged with layer 0's
    (first), residual adds, then ReLU layers at every position and the readout."""
    t = x.shape[1]
    raw_prev = raw_first = None
    for i, layer in enumerate(model.model.layers):
        w = layer.attn.qkv.weight  # (3d, d)
        q, k, v = (x @ w[j * 150:(j + 1) * 150].T for j in range(3))
        raw = v
        if i > 0 and mode == "previous":
            v = v + raw_prev
        if i > 0 and mode == "first":
            v = 0.5 * raw_first + 0.5 * v
        raw_prev, raw_first = raw, raw if i == 0 else raw_first
        scores = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -torch.inf)
        x = x + scores.softmax(-1) @ v
    for lin in (m for m in model.model.norm if isinstance(m, torch.nn.Linear)):
        x = torch.relu(x @ lin.weight.T + lin.bias)
    return x @ model.lm_head.weight.T


@pytest.mark.parametrize("mode", ["none", "previous", "first"])
def test_the_toy_model_equals_the_authors_forward_written_out(mode):
    model = toy(mode)
    x = torch.from_numpy(draw("in", n=4)[1]["inputs_embeds"])
    with torch.no_grad():
        out = model(inputs_embeds=x).logits
        assert torch.allclose(out, by_hand(model, x, mode), atol=1e-5, rtol=1e-4)
        assert torch.allclose(model(inputs_embeds=x, logits_to_keep=1).logits, out[:, -1:], atol=1e-6)
        if mode != "none":
            assert (out - toy("none")(inputs_embeds=x).logits).abs().max() > 1e-3  # the path changes the output


SETS = ICL_TINY


def tiny(**changes) -> dict:
    return load_training_config(PAPER, {**SETS, **changes}, seed=0)


def test_training_logs_every_test_set_and_the_query_attention_and_resumes_exactly(tmp_path, monkeypatch):
    whole = train(tiny(), tmp_path / "whole", progress=False)
    log = (whole / "log.csv").read_text().splitlines()
    header = log[0].split(",")
    for name in ("eval_in_accuracy", "eval_ic_accuracy", "eval_ic2_accuracy", "eval_iw_accuracy",
                 "eval_ic_query_label_L1", "eval_ic_query_item_L0", "eval_ic_query_uniform"):
        assert name in header
    assert [row.split(",")[0] for row in log[1:]] == ["0", "4", "8", "12"]  # evaluated before the first step too
    # the run loads with from_pretrained and no remote code, and gives the accuracy it logged on the same test set
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(whole, trust_remote_code=False).eval()
    assert type(model).__name__ == "ProbeTransformerForCausalLM" and model.config.value_residual == "previous"
    test = icl.Fixed(tiny()["task"], "ic", 64)
    with torch.no_grad():
        right = (model(inputs_embeds=test.x).logits[:, -1, :32].argmax(-1) == test.y[:, -1]).float().mean()
    import pandas as pd
    assert float(right) == pytest.approx(pd.read_csv(whole / "log.csv").eval_ic_accuracy.iloc[-1])
    r = probe("run", "--model", str(whole), "--task", "capitals", "--probe", "accuracy", "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "reads vectors (inputs_embeds), not text" in r.stderr  # refused before loading
    assert "loading" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    from transformers import Trainer
    seen = {}
    original = Trainer.create_optimizer

    def spy(self, *a, **k):
        seen["optimizer"] = original(self, *a, **k)
        return seen["optimizer"]

    monkeypatch.setattr(Trainer, "create_optimizer", spy)
    train(tiny(**{"train.steps": 1}), tmp_path / "one", progress=False)
    assert type(seen["optimizer"]).__name__ == "SGD" and seen["optimizer"].defaults["momentum"] == 0
    decayed = {g["weight_decay"] for g in seen["optimizer"].param_groups if g["params"]}
    assert decayed == {0.0, 1e-4}
    _kill_after(8, tmp_path / "killed", PAPER, SETS)
    resumed = train(tiny(), tmp_path / "killed", resume=True, progress=False)  # from checkpoint-8 to step 12
    assert (resumed / "log.csv").read_text().splitlines() == log
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, message", [
    ({"task.classes": 500}, "is not a multiple of task.labels"),
    ({"task.burstiness": 3}, "must divide task.pairs"),
    ({"task.p_novel": 1.5}, "accepted: a probability in [0, 1]"),
    ({"task.item_dim": 40}, "differs from the task's vectors (105"),
    ({"train.optimizer": "adam"}, "unknown train.optimizer 'adam'; accepted: adamw, sgd"),
    ({"model.value_residual": "last"}, "unknown value_residual 'last'; accepted: none, previous, first"),
])
def test_bad_configs_are_one_line_errors(change, message, tmp_path):
    with pytest.raises(ProbeError) as e:
        cfg = tiny(**change)
        train(cfg, tmp_path / "r", progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)
