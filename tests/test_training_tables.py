"""Tables across training runs: variants found from what differs between runs, curves pooled over seeds with t
bands, the step each run reaches a level (interpolated), the comparison between variants with an exact permutation
test, and the report section; `probe sweep --dry-run` lists a training sweep's units without running them."""

import json

import numpy as np
import pandas as pd
import pytest

from probes.reports.training import curves, finals, milestones, reached, training_runs, training_tables
from probes.stats import permutation

from .test_cli import probe


def fake_run(root, mode: str, seed: int, rise_at: float):
    """A complete training run whose ic accuracy is 0.03 until `rise_at`, then 1.0 (evaluations every 100)."""
    run = root / f"value_residual{mode}-seed{seed}"
    run.mkdir(parents=True)
    cfg = {"name": "icl-x", "task": {"generator": "icl"}, "model": {"value_residual": mode},
           "train": {"seed": seed, "steps": 1000}}
    (run / "meta.json").write_text(json.dumps({"kind": "training", "status": "complete", "config": cfg}))
    steps = np.arange(0, 1001, 100)
    acc = np.where(steps >= rise_at, 1.0, 0.03)
    pd.DataFrame({"step": steps, "eval_ic_accuracy": acc, "eval_iw_accuracy": 0.1 + 0 * acc,
                  "eval_ic_query_label_L1": acc / 2, "eval_ic_query_uniform": 2 / 17}).to_csv(run / "log.csv", index=False)


@pytest.fixture
def folder(tmp_path):
    for seed in range(5):
        fake_run(tmp_path, "none", seed, 600 + 100 * (seed % 2))
        fake_run(tmp_path, "previous", seed, 300 + 100 * (seed % 2))
    fake_run(tmp_path / "unfinished", "first", 0, 0)
    meta = json.loads((tmp_path / "unfinished/value_residualfirst-seed0/meta.json").read_text())
    (tmp_path / "unfinished/value_residualfirst-seed0/meta.json").write_text(json.dumps({**meta, "status": "running"}))
    return tmp_path


def test_the_step_a_level_is_reached_is_interpolated_between_evaluations():
    log = pd.DataFrame({"step": [0, 100, 200, 300], "a": [0.0, 0.2, 0.6, 1.0]})
    assert reached(log, "a", 0.5) == pytest.approx(175.0)
    assert reached(log, "a", 0.0) == 0.0 and reached(log, "a", 1.01) is None


def test_curves_pool_seeds_with_a_t_band(folder):
    runs = training_runs(folder)
    assert len(runs) == 10  # the unfinished run is left out
    c = curves(runs)
    row = c[(c.variant == "value_residual=previous") & (c.metric == "eval_ic_accuracy") & (c.step == 300)].iloc[0]
    values = np.array([1.0, 0.03, 1.0, 0.03, 1.0])  # seeds 0, 2, 4 have risen at 300; 1, 3 at 400
    from scipy.stats import t
    half = t.ppf(0.975, 4) * values.std(ddof=1) / np.sqrt(5)
    assert row["mean"] == pytest.approx(values.mean()) and row.seeds == 5
    assert row.hi - row["mean"] == pytest.approx(half)


def test_milestones_compare_variants_with_an_exact_permutation_test(folder):
    per_run, summary = milestones(training_runs(folder))
    assert set(per_run.metric) == {"eval_ic_accuracy"} and len(per_run) == 20
    prev = summary[(summary.variant == "value_residual=previous") & (summary.level == 0.95)].iloc[0]
    none = summary[(summary.variant == "value_residual=none") & (summary.level == 0.95)].iloc[0]
    # seeds jump from 0.03 to 1 in the 100 steps before 300/400 (previous), 600/700 (none)
    into = 100 * (0.95 - 0.03) / (1 - 0.03)
    assert prev.baseline == "value_residual=none" and prev.reached == 5
    assert none.mean_step == pytest.approx(np.mean([500, 600, 500, 600, 500]) + into)
    assert prev.difference == pytest.approx(-300.0, abs=1e-6) and prev.sooner_pct == pytest.approx(100 * 300 / none.mean_step)
    assert prev.p_permutation == pytest.approx(2 / 252)  # the 5 earliest runs are all one variant's: 2 of 252 splits
    assert permutation([1, 2, 3], [1, 2, 3]) == 1.0


def test_final_values_compare_variants_over_seeds(folder):
    f = finals(training_runs(folder))
    iw = f[(f.metric == "eval_iw_accuracy")]
    assert set(iw.variant) == {"value_residual=none", "value_residual=previous"} and (iw.step == 1000).all()
    prev = iw[iw.variant == "value_residual=previous"].iloc[0]
    assert prev["mean"] == pytest.approx(0.1) and prev.runs == 5 and prev.difference == pytest.approx(0.0)
    assert prev.p_permutation == 1.0  # identical final values: no evidence of a difference
    label = f[(f.metric == "eval_ic_query_label_L1") & (f.variant == "value_residual=none")].iloc[0]
    assert label["mean"] == pytest.approx(0.5) and label.mean_lo == pytest.approx(0.5)  # no spread, no width
    assert "difference" not in f.columns or pd.isna(label.get("difference"))  # the baseline is not compared to itself


def test_a_text_run_has_curves_and_final_values_but_no_accuracy_milestones(tmp_path):
    for mode in ("none", "previous"):
        run = tmp_path / mode
        run.mkdir()
        cfg = {"name": "lm", "task": {"generator": "text"}, "model": {"value_residual": mode}, "train": {"seed": 0}}
        (run / "meta.json").write_text(json.dumps({"kind": "training", "status": "complete", "config": cfg}))
        pd.DataFrame({"step": [100, 200], "eval_accuracy": [0.1, 0.2], "eval_icl_score": [-0.1, -0.3]}).to_csv(
            run / "log.csv", index=False)
    tables = training_tables(tmp_path)
    assert set(tables) == {"training-curves", "training-final"}
    assert set(tables["training-final"].metric) == {"eval_accuracy", "eval_icl_score"}


def test_aggregate_and_report_show_the_training_runs(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("agg")
    r = probe("aggregate", str(folder), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "training-milestones" in r.stdout and "rows (metric x step x variant)" in r.stdout
    assert set(training_tables(folder)) == {"training-curves", "training-final", "training-milestones",
                                            "training-milestones-runs"}
    r = probe("report", str(folder), "--out", str(out / "r.html"))
    assert r.returncode == 0, r.stderr
    page = (out / "r.html").read_text()
    assert "training runs" in page and "evaluations against step" in page and "data:image/png;base64" in page


def test_a_dry_run_lists_a_training_sweeps_units_and_runs_nothing(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "name: s\ntrain:\n  configs: [%s]\n  set: {model.value_residual: [none, previous]}\n  seeds: [0, 1]\n"
        "  runs: runs\n" % (json.dumps(str(__import__("pathlib").Path(__file__).parent.parent
                                        / "configs/training/icl-cpu.yaml"))))
    r = probe("sweep", str(tmp_path / "s.yaml"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would run 4 unit(s)" in r.stdout and "train/icl-cpu/value_residualprevious-seed1" in r.stdout
    assert not (tmp_path / "runs").exists()
