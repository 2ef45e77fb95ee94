"""Statistics where users read them: counts and intervals in summaries, honest selection, --limit as a stratified
sample of scored items, clean worked examples, seeds pooled and runs of other setups kept apart in aggregates."""

import json

import numpy as np
import pandas as pd
import pytest

from probes.methods.ffn_ablation import drop_difference, summarize_ablation
from probes.methods.ffn_readout import summarize_readout
from probes.methods.ffn_transplant import summarize_transplant
from probes.methods.lens import summarize_lens
from probes.models.loading import load_tokenizer
from probes.models.registry import load_registry
from probes.reports.aggregate import aggregate
from probes.reports.html import with_intervals
from probes.stats import halves
from probes.tasks.files import load_task

from .test_cli import probe, probe_here

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
        select, report = halves(range(10), seed)
        s = summarize_transplant(df, seed)["best"]
        chosen = df[df.item.isin(select) & (df.vector == "o")].groupby("blocks").top1.mean().idxmax()
        expected = df[df.item.isin(report) & (df.vector == "o") & (df.blocks == chosen)].top1.mean()
        assert s["blocks"] == chosen and s["top1"] == pytest.approx(expected)
        assert s["selected_on"] == s["reported_on"] == s["top1_n"] == 5
    peak = summarize_transplant(df)["best_of_all"]
    assert (peak["top1"], peak["of"]) == (0.5, 2) and peak["top1_lo"] < 0.5


def test_halves_are_disjoint_cover_the_items_within_every_stratum_and_follow_the_seed():
    items, strata = list(range(41)), [i % 3 for i in range(41)]
    splits = {}
    for seed in range(5):
        select, report = halves(items, seed, strata)
        assert not select & report and select | report == set(items)
        for k in range(3):
            mine = {i for i in items if strata[i] == k}
            assert abs(len(select & mine) - len(report & mine)) <= 1
        assert halves(items, seed, strata) == (select, report)
        splits[seed] = frozenset(select)
    assert len(set(splits.values())) == 5
    assert halves([7], 0) == ({7}, {7})  # one item: nothing to hold out (callers say so)


def test_the_readout_switch_block_is_chosen_on_one_half_and_counted_on_the_other():
    """Items 0-9 switch at block 1 by FFN, items 10-19 at block 2: the chosen block is the mode of the selecting
    half, and its share is counted on the reporting half only."""
    rows = [{"item": i, "block": b, "correct": True, "argument_top1_layer": None, "answer_top1_layer": 2 + (i >= 10),
             "switch_block": 1 + (i >= 10), "switch_by": "ffn", "argument_first": False}
            for i in range(20) for b in range(3)]
    df = pd.DataFrame(rows)
    for seed in range(6):
        select, report = halves(range(20), seed)
        chosen = summarize_readout(df, seed)["ffn_switch_block"]
        picked = pd.Series([1 + (i >= 10) for i in sorted(select)]).mode().iloc[0]
        assert chosen["block"] == picked and (chosen["selected_on"], chosen["reported_on"]) == (10, 10)
        assert chosen["share_k"] == sum(1 + (i >= 10) == picked for i in report)


def test_relative_drops_have_paired_intervals_and_their_difference_one_too():
    """Task A: all right without ablation, half right with it (drop 0.5); task B: no drop. The drop, its
    interval and the A-minus-B difference match the hand computation; a task against itself differs by 0."""
    def table(drop_every):
        return pd.DataFrame([{"item": i, "variant": v, "correct": v == "none" or i % drop_every != 0}
                             for i in range(40) for v in ("none", "top 1/6")])
    a, b = table(2), table(10 ** 6)  # b: only item 0 drops
    s = summarize_ablation(a)
    assert s["relative_drop"]["top 1/6"] == 0.5 and s["relative_drop_lo"]["top 1/6"] < 0.5 < s["relative_drop_hi"]["top 1/6"]
    assert s["relative_drop"]["none"] == 0 and s["relative_drop_lo"]["none"] == s["relative_drop_hi"]["none"] == 0
    assert (s["accuracy_k"]["top 1/6"], s["accuracy_n"]["top 1/6"]) == (20, 40)
    d = drop_difference(a, b, "top 1/6")
    assert d["drop_difference"] == pytest.approx(0.5 - 1 / 40)
    assert d["drop_difference_lo"] < d["drop_difference"] < d["drop_difference_hi"]
    assert drop_difference(a, a, "top 1/6")["drop_difference"] == 0


def test_report_tables_show_each_interval_in_its_cell_and_keep_counts():
    df = pd.DataFrame({"model": ["m"], "accuracy": [0.6], "accuracy_lo": [0.5], "accuracy_hi": [0.7],
                       "accuracy_k": [6], "accuracy_n": [10], "entropy": [1.5]})
    shown = with_intervals(df)
    assert list(shown.columns) == ["model", "accuracy", "accuracy_n", "entropy"]
    assert shown.accuracy[0] == "0.6 [0.5, 0.7]" and shown.entropy[0] == 1.5


def test_every_figure_of_rates_or_means_has_error_bars_or_bands(tmp_path, monkeypatch):
    from matplotlib.collections import PolyCollection
    from matplotlib.container import ErrorbarContainer

    from probes.reports import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    transplant = pd.DataFrame([{"item": i, "vector": v, "blocks": b, "scale": 1.0, "top1": (i + len(b)) % 3 == 0}
                               for i in range(9) for v, b in (("none", "-"), ("o", "1"), ("o", "2"), ("random", "1"))])
    ablation = pd.DataFrame([{"item": i, "variant": v, "n_ablated": k, "correct": i % (k + 2) == 0}
                             for i in range(9) for k, v in enumerate(("none", "top 1/6"))])
    lens = pd.DataFrame([{"item": i, "layer": j, "argument_rr": (i + j) / 20, "answer_rr": j / 4}
                         for i in range(9) for j in range(4)])
    plots.plot_transplant(transplant, {}, tmp_path / "t.png")
    plots.plot_ablation(ablation, {"task": "capitals"}, tmp_path / "a.png")
    plots.plot_lens(lens, {}, tmp_path / "l.png")
    kinds = [{type(c) for c in fig.axes[0].containers} | {type(c) for c in fig.axes[0].collections}
             for fig in drawn]
    assert ErrorbarContainer in kinds[0] and drawn[0].axes[0].patches  # points with bars, the baseline's band
    assert ErrorbarContainer in kinds[1] and any(issubclass(k, PolyCollection) for k in kinds[2])
    assert all("items" in t.get_text() or "targets" in t.get_text() for fig in drawn for t in fig.axes[0].texts)


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


def test_seeds_are_pooled_and_other_setups_kept_apart(tmp_path, capsys):
    res = tmp_path / "results"
    base = ["--model", "tiny-gpt2", "--task", "nback", "--probe", "nback", "--task-option", "sequences=1"]
    for seed, limit in ((0, 12), (1, 12), (2, 18)):
        r = probe_here(capsys, "run", *base, "--task-option", f"seed={seed}", "--limit", str(limit), "--output",
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


def test_means_over_seeds_get_the_t_interval_of_their_mean():
    """d' of three seeds (1, 2, 3): mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841;
    a single run keeps its own interval."""
    from probes.reports.aggregate import group
    from probes.stats import student_half

    assert student_half(1.0, 3) == pytest.approx(2.48414, abs=1e-4) and np.isnan(student_half(1.0, 1))
    df = pd.DataFrame({"model": ["m"] * 3 + ["solo"], "task": "t", "probe": "nback", "seed": [0, 1, 2, 0],
                       "dprime": [1.0, 2.0, 3.0, 5.0], "dprime_lo": [0.5, 1.5, 2.5, 4.0],
                       "dprime_hi": [1.5, 2.5, 3.5, 6.0]})
    out = group(df, ["model"]).set_index("model")
    assert out.loc["m", "dprime"] == 2.0 and out.loc["m", "dprime_sd"] == 1.0
    assert (out.loc["m", "dprime_lo"], out.loc["m", "dprime_hi"]) == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-4)
    assert (out.loc["solo", "dprime_lo"], out.loc["solo", "dprime_hi"]) == (4.0, 6.0)
