"""Statistics where users read them: counts and intervals in summaries, honest selection, --limit as a stratified
sample of scored items, clean worked examples, seeds pooled and runs of other setups kept apart in aggregates."""

import json

import numpy as np
import pandas as pd
import pytest

from probes.methods.ffn_transplant import summarize_transplant
from probes.methods.lens import summarize_lens
from probes.models.loading import load_tokenizer
from probes.models.registry import load_registry
from probes.reports.aggregate import aggregate
from probes.tasks.files import load_task

from .test_cli import probe

TINY_TOK = load_tokenizer(load_registry()["tiny-gpt2"])


def test_held_out_selection_never_reports_on_the_items_it_selected_on():
    """o works at block 3 on items 0-4 and at block 5 on items 5-9: for every seeded split, the block is the best
    on the selecting half, and the figure is the other half's at that block (the maximum over all is 0.5)."""
    rows = []
    for i in range(10):
        rows.append({"item": i, "vector": "none", "blocks": "-", "scale": 1.0, "top1": False, "answer_rr": 0.1})
        for block in ("3", "5"):
            rows.append({"item": i, "vector": "o", "blocks": block, "scale": 1.0, "answer_rr": 0.1,
                         "top1": (block == "3" and i < 5) or (block == "5" and i >= 5)})
    df = pd.DataFrame(rows)
    for seed in range(10):
        perm = np.random.default_rng(seed).permutation(np.arange(10))
        select, report = set(perm[:5].tolist()), set(perm[5:].tolist())
        s = summarize_transplant(df, seed)["best"]
        chosen = df[df.item.isin(select) & (df.vector == "o")].groupby("blocks").top1.mean().idxmax()
        expected = df[df.item.isin(report) & (df.vector == "o") & (df.blocks == chosen)].top1.mean()
        assert s["blocks"] == chosen and s["top1"] == pytest.approx(expected)
        assert s["selected_on"] == s["reported_on"] == s["top1_n"] == 5
    peak = summarize_transplant(df)["best_of_all"]
    assert (peak["top1"], peak["of"]) == (0.5, 2) and peak["top1_lo"] < 0.5


def test_lens_medians_say_how_many_items_reach_the_answer_and_never_print_nan():
    df = pd.DataFrame([{"item": i, "layer": layer, "answer_rank": 0 if (i < 3 and layer >= 1 + i) else 5,
                        "argument_rank": 7, "answer_rr": 0.1, "argument_rr": 0.1}
                       for i in range(5) for layer in range(4)])
    s = summarize_lens(df)
    assert (s["answer_top1_layer"], s["answer_top1_layer_reached"], s["answer_top1_layer_of"]) == (2.0, 3, 5)
    assert s["argument_top1_layer"] is None and s["argument_top1_layer_reached"] == 0
    assert (s["accuracy"], s["accuracy_k"], s["accuracy_n"]) == (0.6, 3, 5) and s["accuracy_lo"] < 0.6


@pytest.mark.parametrize("task, options, groups", [
    ("nback", {}, {f"N={n}" for n in range(1, 7)}),
    ("past-tense", {"ambiguous": "flag"}, {"regular", "irregular"}),
])
@pytest.mark.parametrize("limit", [7, 12, 30])
def test_limit_gives_exactly_n_scored_items_with_every_group(task, options, groups, limit):
    t = load_task(task, options)
    kept, _ = t.scored_items(TINY_TOK, limit)
    assert len(kept) == limit and {it.group for it in kept} == groups
    assert kept == load_task(task, options).scored_items(TINY_TOK, limit)[0]  # the same draw every time


def test_worked_examples_are_never_ambiguous_items_nor_copies():
    t = load_task("capitals")  # drop: the tiny tokenizer makes all but two answers ambiguous
    kept, reasons = t.scored_items(TINY_TOK)
    rows = t.rows()
    shots = {j for it in kept for j, r in enumerate(rows)
             if j != it.index and t.template.format(**r) + t.answer.format(**r) in it.prompt}
    assert kept and shots and not shots & set(reasons)
    assert all(rows[j]["output"] != rows[j]["input"] for j in shots)


def test_the_command_prints_intervals_counts_and_what_was_dropped(tmp_path):
    r = probe("run", "--model", "tiny-gpt2", "--task", "capitals", "--probe", "accuracy", "--output",
              str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "accuracy 0.000 [0.000, 0.658] (0/2)" in r.stdout
    assert "scored 2 of 247 items; 245 dropped as ambiguous for this tokenizer" in r.stdout
    summary = json.loads((tmp_path / "run" / "meta.json").read_text())["summary"]
    assert summary["accuracy_n"] == 2 and summary["dropped_ambiguous"] == 245 and summary["ci"] == 0.95
    r = probe("run", "--model", "tiny-gpt2", "--task", "capitals", "--probe", "accuracy", "--ci", "0.5",
              "--output", str(tmp_path / "run50"))
    assert "accuracy 0.000 [0.000, 0.185] (0/2)" in r.stdout, r.stdout  # z^2 / (n + z^2), z = 0.6745


def test_seeds_are_pooled_and_other_setups_kept_apart(tmp_path):
    res = tmp_path / "results"
    base = ["--model", "tiny-gpt2", "--task", "nback", "--probe", "nback", "--task-option", "sequences=1"]
    for seed, limit in ((0, 12), (1, 12), (2, 18)):
        r = probe("run", *base, "--task-option", f"seed={seed}", "--limit", str(limit), "--output",
                  str(res / f"s{seed}-{limit}"))
        assert r.returncode == 0, r.stderr
    table = aggregate(res, ["model", "task", "probe"])["nback"]
    assert sorted(table.limit) == [12, 18]
    pooled = table[table.limit == 12].iloc[0]
    assert pooled.runs == 2 and pooled.seeds == 2 and pooled.accuracy_n == 24
    runs = [json.loads((res / f"s{s}-12" / "meta.json").read_text())["summary"] for s in (0, 1)]
    assert pooled.accuracy == pytest.approx(sum(r["accuracy_k"] for r in runs) / 24)
    assert pooled.accuracy_lo < pooled.accuracy < pooled.accuracy_hi


def test_the_nback_head_is_chosen_on_one_half_of_the_sequences_and_reported_on_the_other(tmp_path):
    import probes

    model = probes.load("tiny-llama", attn_implementation="eager")
    four = probes.run(model, probes.task("nback-sequence", n=[1, 2], sequences=4), "attention").summary
    for n, head in four["nback_head"].items():
        assert (head["selected_on"], head["reported_on"], head["held_out"]) == (2, 2, True)
    one = probes.run(model, probes.task("nback-sequence", n=[1], sequences=1), "attention")
    assert one.summary["nback_head"][1]["held_out"] is False and "too few to hold any out" in one.report
