"""Gong & Zhang's N-back setup as their code measures it (scripts/train_1_layer_1_head.ipynb and
attention_visualization.ipynb in Daniel-Gong/self-attention-limits-working-memory): the loss over every position,
the first N labelled "no match"; a readout with a bias; the total entropy of the first training batch of each
epoch, recorded before that batch's step, and its minimum over epochs; and the statistics across models."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from safetensors.torch import load_file

from probes.reports.aggregate import group
from probes.reports.training import finals, training_runs, trend
from probes.reports.trend import trend_table
from probes.stats import slope
from probes.training import trainer as trainer_module
from probes.training.config import load_training_config
from probes.training.data import GENERATORS, LABELS, nback_splits, tokenizer_for
from probes.training.generator import IGNORE
from probes.training.trainer import build_model, train

from .test_training import PAPER

SMALL = {"model.n_embd": 16, "task.train": 48, "task.test": 16, "train.epochs": 3, "train.batch_size": 16,
         "train.save_steps": 3, "train.eval_steps": 3, "train.lr": 1e-3}


@pytest.mark.parametrize("n", [1, 3, 6])
def test_the_loss_covers_every_position_the_first_n_no_match(n):
    cfg = load_training_config(PAPER, {"task.n": n})
    assert cfg["task"]["loss"] == "all"
    tok = tokenizer_for(cfg["task"])
    allpos = nback_splits(cfg["task"], tok)
    cut = nback_splits({**cfg["task"], "loss": "from-n"}, tok)
    for a, b in zip(allpos["train"], cut["train"]):
        assert IGNORE not in a["target"] and a["target"][:n] == [0] * n and sum(a["target"]) == 8
        assert b["target"][:n] == [IGNORE] * n and b["target"][n:] == a["target"][n:]
    gen = GENERATORS["nback"]
    assert gen.chance(cfg["task"]) == pytest.approx(2 / 3)  # every position: 16 of 24 are "no match"
    assert gen.chance({**cfg["task"], "loss": "from-n"}) == pytest.approx(1 - 8 / (24 - n))


def test_a_bad_loss_is_a_one_line_error():
    from probes.errors import ProbeError

    with pytest.raises(ProbeError, match="task.loss 'some'; accepted: all, from-n"):
        load_training_config(PAPER, {"task.loss": "some"})


def test_the_readout_is_a_two_way_linear_with_a_bias():
    """The label tokens' rows of the unembedding and its bias are the authors' nn.Linear(512, 2): the same draws
    (fan-in 512) and the same logits."""
    cfg = load_training_config(PAPER)
    tok = tokenizer_for(cfg["task"])
    model = build_model(cfg, tok)
    head = model.lm_head
    assert head.bias is not None and head.in_features == 512
    rows = tok.convert_tokens_to_ids(list(LABELS))
    linear = torch.nn.Linear(512, 2)
    with torch.no_grad():
        linear.weight.copy_(head.weight[rows]), linear.bias.copy_(head.bias[rows])
    ids = torch.tensor([tok.convert_tokens_to_ids(list("bcdfghjklnpqrstvwxyzbcdf"))])
    out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits[..., rows], linear(out.hidden_states[-1]), rtol=0, atol=1e-5)
    bound = 1 / math.sqrt(512)  # PyTorch's Linear draws: weight and bias within 1/sqrt(fan-in)
    assert head.bias.abs().max() <= bound and head.weight.abs().max() <= bound and head.bias.std() > bound / 3


def _total_entropy_by_hand(state: dict, ids: torch.Tensor) -> float:
    """The authors' statistic with plain torch from the weights: embeddings, one attention head, causal softmax;
    the matrices averaged over the batch; the entropies of the rows summed (numpy)."""
    x = state["model.wte.weight"][ids] + state["model.wpe.weight"][: ids.shape[1]]
    q, k, _ = (x @ state["model.layers.0.attn.qkv.weight"].T + state["model.layers.0.attn.qkv.bias"]).chunk(3, -1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones_like(scores[0], dtype=torch.bool).triu(1), float("-inf"))
    mean = scores.softmax(-1).mean(0).double().numpy()
    return float(sum(-(row[row > 0] * np.log(row[row > 0])).sum() for row in mean))


def test_first_batch_entropy_per_epoch_equals_a_direct_computation(tmp_path, monkeypatch):
    """Each epoch's first training batch, captured as the trainer sees it, with the weights it had then (the
    initial draw, then the checkpoints at the epochs' ends) gives the logged value; the table's minimum is the
    minimum over epochs; a run resumed at an epoch's end logs the same."""
    seen = []
    original = trainer_module._trainer_class

    def recording():
        cls = original()

        class Recording(cls):
            def compute_loss(self, model, inputs, *a, **kw):
                if self.epoch_start:
                    seen.append((self.state.global_step, inputs["input_ids"].clone()))
                return super().compute_loss(model, inputs, *a, **kw)
        return Recording

    monkeypatch.setattr(trainer_module, "_trainer_class", recording)
    cfg = load_training_config(PAPER, SMALL, seed=0)
    run = train(cfg, tmp_path / "run", progress=False)
    assert [s for s, _ in seen] == [0, 3, 6]  # 48 sequences, batch 16: epochs start at steps 0, 3, 6
    log = pd.read_csv(run / "log.csv").dropna(subset=["train_first_batch_entropy"])
    assert log.step.tolist() == [0, 3, 6]
    initial = {k: v.detach() for k, v in build_model(cfg, tokenizer_for(cfg["task"])).state_dict().items()}
    states = [initial, load_file(run / "checkpoint-3" / "model.safetensors"),
              load_file(run / "checkpoint-6" / "model.safetensors")]
    direct = [_total_entropy_by_hand(state, ids) for state, (_, ids) in zip(states, seen)]
    assert log.train_first_batch_entropy.tolist() == pytest.approx(direct, rel=1e-5)
    assert len(set(np.round(direct, 3))) == 3  # the three batches and weights differ
    table = finals(training_runs(tmp_path))
    got = table.set_index("metric").loc["train_first_batch_entropy_min", "mean"]
    assert got == pytest.approx(min(direct), rel=1e-5)


def test_the_interval_across_models_is_a_t_interval(tmp_path):
    """Pooled rates keep their Wilson interval, and beside it the mean over runs (models as replicates) with the
    t interval and standard error computed here by hand; metrics with an interval get the same."""
    rng = np.random.default_rng(0)
    acc = rng.uniform(0.8, 0.9, 7)
    ent = rng.normal(25, 2, 7)
    df = pd.DataFrame({"model": [f"m{i}" for i in range(7)], "task": "t", "probe": "nback", "seed": range(7),
                       "training_config": "c", "accuracy": acc, "accuracy_k": (acc * 1000).round(),
                       "accuracy_n": 1000, "accuracy_lo": acc - 0.01, "accuracy_hi": acc + 0.01,
                       "total_entropy": ent, "total_entropy_lo": ent - 1, "total_entropy_hi": ent + 1})
    row = group(df, ["training_config", "task", "probe"]).iloc[0]
    half = sps.t.ppf(0.975, 6) * acc.std(ddof=1) / math.sqrt(7)
    assert row.accuracy_mean == pytest.approx(acc.mean())
    assert (row.accuracy_mean_lo, row.accuracy_mean_hi) == pytest.approx((acc.mean() - half, acc.mean() + half))
    assert row.accuracy_mean_se == pytest.approx(acc.std(ddof=1) / math.sqrt(7))
    assert row.accuracy == pytest.approx(df.accuracy_k.sum() / 7000)  # pooled, as before
    lo, hi = sps.t.interval(0.95, 6, loc=ent.mean(), scale=sps.sem(ent))
    assert (row.total_entropy_lo, row.total_entropy_hi) == pytest.approx((lo, hi))
    assert row.total_entropy_se == pytest.approx(sps.sem(ent))


def test_the_slope_across_models_matches_scipy():
    rng = np.random.default_rng(1)
    x = np.repeat([1, 2, 3], 10)
    y = 0.9 - 0.02 * x + rng.normal(0, 0.02, 30)
    got = slope(x, y, "acc")
    ref = sps.linregress(x, y)
    assert got["acc_slope"] == pytest.approx(ref.slope) and got["acc_slope_se"] == pytest.approx(ref.stderr)
    half = sps.t.ppf(0.975, 28) * ref.stderr
    assert (got["acc_slope_lo"], got["acc_slope_hi"]) == pytest.approx((ref.slope - half, ref.slope + half))
    assert got["acc_slope_p"] < 0.01 and got["acc_slope_n"] == 30
    flat = slope(x, rng.normal(0, 1, 30), "acc")
    assert flat["acc_slope_p"] > 0.05 and flat["acc_slope_lo"] < 0 < flat["acc_slope_hi"]
    assert slope([1, 1, 1], [1, 2, 3], "a")["a_slope"] is None  # one value of x: no trend to estimate
    table = trend_table(pd.DataFrame({"task_options": [f'{{"n": {v}}}' for v in x], "probe": "p", "acc": y}),
                        "n", ["probe"], ["acc"])
    assert table.iloc[0].slope == pytest.approx(ref.slope) and table.iloc[0].runs_at_2 == 10
    assert table.iloc[0].mean_at_3 == pytest.approx(y[x == 3].mean())


def test_training_runs_give_a_trend_over_their_config_field(tmp_path):
    for n in (1, 2):
        for seed in (0, 1):
            train(load_training_config(PAPER, {**SMALL, "task.n": n, "train.epochs": 1}, seed=seed),
                  tmp_path / f"n{n}-seed{seed}", progress=False)
    runs = training_runs(tmp_path)
    t = trend(runs, "n").set_index("metric")
    assert {"eval_accuracy_all", "eval_accuracy_from_n", "train_first_batch_entropy_min"} <= set(t.index)
    row = t.loc["eval_accuracy_all"]
    values = {r["config"]["task"]["n"]: [] for r in runs}
    for r in runs:
        values[r["config"]["task"]["n"]].append(float(r["log"].eval_accuracy_all.dropna().iloc[-1]))
    assert row.runs == 4 and row.mean_at_1 == pytest.approx(np.mean(values[1]))
    assert row.slope == pytest.approx(np.mean(values[2]) - np.mean(values[1]))  # two values of n, equal counts


def test_a_gpt2_nback_model_logs_its_entropies_too(tmp_path):
    """transformers' families return attention probabilities only from their eager attention: the N-back metrics
    read them there, so a GPT-2 run (nback-standard) logs every layer and head's entropy, not nothing."""
    standard = PAPER.parent / "nback-standard.yaml"
    cfg = load_training_config(standard, {"model.n_embd": 16, "model.n_head": 2, "task.train": 32, "task.test": 8,
                                          "train.epochs": 1, "train.batch_size": 16, "train.eval_steps": 2,
                                          "train.save_steps": 2})
    run = train(cfg, tmp_path / "run", progress=False)
    log = pd.read_csv(run / "log.csv")
    for prefix in ("eval_total_entropy", "train_first_batch_entropy"):
        cols = [c for c in log if c.startswith(prefix + "_L")]
        assert len(cols) == 4 and log[cols].notna().any().all(), (prefix, list(log))  # 2 layers x 2 heads


def test_a_trend_over_part_of_the_range_and_bad_specs():
    from probes.errors import ProbeError
    from probes.reports.trend import parse_trend

    x = np.repeat([1, 2, 3, 4], 5)
    y = np.where(x <= 2, 0.9 - 0.05 * x, 0.8) + np.random.default_rng(2).normal(0, 0.001, 20)
    df = pd.DataFrame({"task_options": [f'{{"n": [{v}]}}' for v in x], "probe": "p", "acc": y})  # n: [N] lists
    low = trend_table(df, "n:1-2", ["probe"], ["acc"]).iloc[0]
    high = trend_table(df, "n:3-4", ["probe"], ["acc"]).iloc[0]
    assert low.runs == 10 and low.slope == pytest.approx(-0.05, abs=0.003) and abs(high.slope) < 0.003
    assert parse_trend("n") == ("n", -math.inf, math.inf) and parse_trend("n:1-3") == ("n", 1.0, 3.0)
    for bad in ("n:3-1", "n:x", ":1-2", "n:1"):
        with pytest.raises(ProbeError, match=r"^--trend .*; accepted: FIELD or FIELD:LOW-HIGH"):
            parse_trend(bad)
