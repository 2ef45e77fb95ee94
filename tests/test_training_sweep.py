"""Over training is a sweep: training units run through the sweep code, then the probes on every checkpoint they
write, and aggregates and the report give each metric against training step; on Slurm the probes wait for their
own training job."""

import json
from pathlib import Path

import pandas as pd
import yaml

from probes.reports.aggregate import aggregate
from probes.runs.slurm import submit_slurm
from probes.runs.sweep import load_sweep, unit_states
from probes.training.config import checkpoint_steps

from .test_cli import probe

TINY = {"name": "tiny", "task": {"generator": "nback", "n": 2, "train": 48, "test": 16},
        "model": {"architecture": "probe_transformer", "n_layer": 1, "n_head": 1, "n_embd": 32, "ffn": False,
                  "norm": False, "residual": False},
        "train": {"steps": 12, "batch_size": 8, "lr": 1e-3, "eval_steps": 6, "save_steps": 6, "seed": 0}}


def write_sweep(folder: Path, **changes) -> Path:
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    sweep = {"name": "over-training", "train": {"configs": ["tiny.yaml"], "set": {"task.n": [1, 2]}, "seeds": [0],
                                                "runs": "runs"},
             "checkpoints": "all", "probes": {"nback": ["nback-trained"], "attention": ["nback-trained-sequence"]},
             "task_options": {"n": ["{task.n}"], "sequences": 4}, "results": "results", **changes}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_a_training_sweep_trains_then_probes_every_checkpoint_and_gives_curves_over_steps(tmp_path):
    path = write_sweep(tmp_path)
    sweep = load_sweep(path)
    assert [u.id for u in sweep.train_units] == ["train/tiny/n1-seed0", "train/tiny/n2-seed0"]
    assert all(detail.startswith("waits for train/tiny/") for u, state, detail in unit_states(sweep)
               if state == "pending" and not u.id.startswith("train/"))
    r = probe("sweep", "--quiet", path)
    assert r.returncode == 0, r.stderr
    assert "10 unit(s) run, 0 skipped (finished or running elsewhere), 0 failed" in r.stdout
    for n in (1, 2):  # the checkpoints planned before training are the ones it wrote
        run = tmp_path / "runs" / "tiny" / f"n{n}-seed0"
        cfg = yaml.safe_load((run / "training.yaml").read_text())
        assert sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) == checkpoint_steps(cfg) == [6, 12]
    tables = aggregate(tmp_path / "results", ["training_config", "task", "probe", "step"])
    nback = tables["nback"]
    assert sorted(zip(nback.training_run, nback.step)) == [("tiny-n1-seed0", 6), ("tiny-n1-seed0", 12),
                                                           ("tiny-n2-seed0", 6), ("tiny-n2-seed0", 12)]
    # each model is probed at the N it was trained on: "{task.n}" came from its training config
    assert {(run, json.loads(o)["n"][0]) for run, o in zip(nback.training_run, nback.task_options)} == {
        ("tiny-n1-seed0", 1), ("tiny-n2-seed0", 2)}
    skipped = {}  # a folder holding the training runs too: not probe runs, they give their own tables (curves and
    # steps to 50%/95% accuracy) beside the probes'
    training = {"training-curves", "training-final", "training-milestones", "training-milestones-runs"}
    assert set(aggregate(tmp_path, ["model", "probe"], skipped)) == set(tables) | training and not set(tables) & training
    assert not skipped
    attention = tables["attention"]
    assert {"nback_head.1.nback_mass_nonmatch", "nback_head.2.nback_mass_nonmatch_lo"} <= set(attention.columns)
    r = probe("report", tmp_path / "results", "--by", "training_config,task,probe,step")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "results" / "report.html").read_text()
    assert "nback: accuracy over training" in text and "attention: nback_head.N.nback_mass_nonmatch over training" in text
    r = probe("sweep", "--quiet", path)  # everything done: nothing trains or runs again
    assert r.returncode == 0 and "0 unit(s) run, 10 skipped" in r.stdout

    # a run folder given as a model, with checkpoints: all, and a glob of its checkpoints: the same models
    run = tmp_path / "runs" / "tiny" / "n1-seed0"
    for models in ([str(run)], [str(run / "checkpoint-*")]):
        other = write_sweep(tmp_path, train=None, models=models, task_options={"n": ["{task.n}"]})
        sweep = load_sweep(other)
        assert [u.model for u in sweep.units() if u.probe == "nback"] == [str(run / "checkpoint-6"),
                                                                          str(run / "checkpoint-12")]
        assert [sweep.task(u).overrides["n"] for u in sweep.units()] == [[1]] * 4
    # a folder or glob relative to the sweep file, whatever the current folder: the same models, paths normalised
    (tmp_path / "sweeps").mkdir()
    for models in (["../runs/tiny/n1-seed0/checkpoint-6"], ["../runs/tiny/n1-seed0/checkpoint-*"]):
        other = write_sweep(tmp_path / "sweeps", train=None, models=models, checkpoints="final",
                            task_options={"n": 1, "sequences": 4})
        assert {u.model for u in load_sweep(other).units()} <= {str(run / "checkpoint-6"), str(run / "checkpoint-12")}
        assert str(run / "checkpoint-6") in {u.model for u in load_sweep(other).units()}


def test_on_slurm_each_probe_waits_for_its_own_training_job(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    records = submit_slurm(sweep, dry_run=True)
    assert records[0]["units"] == ["train/tiny/n1-seed0", "train/tiny/n2-seed0"] and "after" not in records[0]
    assert records[0]["resources"] == {"cpus_per_task": 4, "gpus": 0, "mem": "8G", "time": "02:00:00"}
    waits = {r["after"]: r["units"] for r in records[1:]}
    assert set(waits) == {"<job>_0", "<job>_1"}  # array tasks 0 and 1 of the training job
    assert all(u.startswith("tiny-n1-seed0@") for u in waits["<job>_0"]) and len(waits["<job>_0"]) == 4
    assert all(f"--dependency=afterok:{r['after']}" in r["command"] for r in records[1:])
    assert pd.Series([u for r in records for u in r["units"]]).is_unique


def test_a_training_unit_finished_between_a_writers_look_and_its_lock_is_not_trained_again(tmp_path, monkeypatch):
    from probes.runs.sweep import run_training

    from .test_sweep import finish_it_first

    sweep = load_sweep(write_sweep(tmp_path))
    tu = sweep.train_units[0]
    outcomes = []
    finish_it_first(monkeypatch, lambda: outcomes.append(run_training(sweep, tu, progress=False)))
    outcomes.append(run_training(sweep, tu, progress=False))
    assert outcomes == ["done", "skipped"]
    meta = json.loads((sweep.run_dir(tu) / "meta.json").read_text())
    assert meta["status"] == "complete" and not (sweep.run_dir(tu) / ".lock").exists()
