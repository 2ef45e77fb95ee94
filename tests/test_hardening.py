"""Hostile and careless input: Slurm scripts that never run what a name or path says, a run lock that excludes."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from probes.errors import ProbeError
from probes.runs.rundir import RunDir
from probes.runs.slurm import submit_slurm
from probes.runs.sweep import load_sweep

from .lockrace import contend
from .test_cli import probe, probe_here

TASKS = Path(__file__).resolve().parent.parent / "tasks"

HOSTILE = ["x $(touch PWNED) `touch PWNED2`", "q'uo\"te; touch PWNED3", "new\nline && touch PWNED4", "ünï cödé"]


@pytest.mark.parametrize("folder", HOSTILE)
def test_slurm_scripts_run_only_the_unit_whatever_the_paths(tmp_path, monkeypatch, folder):
    """A sweep in a hostile folder, results named with $(...), a hostile working folder and interpreter path:
    the generated script, run as Slurm would run array task 1, calls the stub interpreter with exactly the
    sweep file and the second unit, and nothing else runs."""
    base = tmp_path / folder
    base.mkdir()
    sweep_file = base / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "grid", "models": ["tiny-gpt2"], "tasks": ["capitals"], "probes": ["accuracy", "logit-lens"],
        "results": f"res {HOSTILE[0]}", "slurm": {"gpus": 0, "mem": "1G", "cpus_per_task": 1, "time": "00:10:00"}}))
    stub = base / "py $(touch PWNED5)"
    argv_out = tmp_path / "argv.txt"
    stub.write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {str(argv_out)!r}\n")
    stub.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stub))
    monkeypatch.chdir(base)
    sweep = load_sweep(sweep_file)
    [record] = submit_slurm(sweep, dry_run=True)
    assert record["units"] == ["tiny-gpt2/capitals/accuracy", "tiny-gpt2/capitals/logit-lens"]
    r = subprocess.run(["bash", record["script"]], env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"},
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert argv_out.read_text().split("\0")[:-1] == ["-m", "probes", "sweep", str(sweep_file), "--executor", "local",
                                                 "--unit", "tiny-gpt2/capitals/logit-lens", "--quiet"]
    assert not [p for p in tmp_path.rglob("PWNED*")]
    assert not Path("PWNED").exists() and not Path("/PWNED").exists()
    cmd = record["command"]  # the job's name and log go to sbatch as arguments, never through a shell
    assert cmd[-1] == record["script"] and f"--output={Path(record['script']).parent}/%A_%a.out" in cmd


@pytest.mark.parametrize("slurm, bad", [
    ({"partition": "gpu\ntouch PWNED"}, "bad slurm partition 'gpu\\ntouch PWNED'"),
    ({"time": "01:00:00 --x"}, "bad slurm time '01:00:00 --x'"),
    ({"extra": ["--constraint=a100\ntouch PWNED"]}, "bad slurm extra"),
])
def test_slurm_values_that_would_become_shell_text_are_refused(tmp_path, slurm, bad):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "models": ["tiny-gpt2"], "tasks": ["capitals"],
                                    "probes": ["accuracy"], "slurm": {"gpus": 0, **slurm}}))
    with pytest.raises(ProbeError, match="^" + bad.replace("\\", "\\\\").replace("(", r"\(")):
        submit_slurm(load_sweep(path), dry_run=True)


@pytest.mark.parametrize("stale", [False, True])
def test_of_processes_taking_a_lock_at_the_same_instant_exactly_one_wins(tmp_path, stale):
    """200 trials of 5 processes released by one barrier, on a free folder or one whose lock a dead process left."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.lockrace"])
    dead = ctx.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    for trial in range(200):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        if stale:
            (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
        start, done, results = ctx.Barrier(5), ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=contend, args=(folder, start, results, done)) for _ in range(5)]
        for p in procs:
            p.start()
        won = [results.get(timeout=60) for _ in procs]
        done.wait()
        for p in procs:
            p.join()
        assert sum(won) == 1, (trial, won)


def test_overwrite_removes_only_a_run_folder(tmp_path):
    thesis = tmp_path / "my-thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    with pytest.raises(ProbeError, match=r"^--overwrite refused: .*my-thesis is not a run folder \('chapter1.tex' "
                                         r"is not a file probe writes\)"):
        RunDir(thesis, {"model": "m"}, overwrite=True)
    assert (thesis / "chapter1.tex").read_text() == "years of work" and not (thesis / ".lock").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "parts").mkdir()  # looks like a run, but no meta.json says it is one
    with pytest.raises(ProbeError, match="it has no run's meta.json"):
        RunDir(notes, {"model": "m"}, overwrite=True)
    run = tmp_path / "run"
    with RunDir(run, {"model": "m"}) as r:
        r.start({})
        r.write_part([{"item": 0, "x": 1}])
    with RunDir(run, {"model": "other"}, overwrite=True):  # a run folder: emptied, then reused
        assert not (run / "parts").exists() or not any((run / "parts").iterdir())


def test_a_different_computation_in_the_same_folder_is_refused_before_loading(tmp_path, capsys):
    """A random model's config and a task's template are part of a run's identity, not only their names."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}))
    task = tmp_path / "capitals.yaml"
    task.write_text((TASKS / "capitals.yaml").read_text().replace("data/", str(TASKS / "data") + "/"))
    run = ["run", "--model", str(cfg), "--task", str(task), "--task-option", "ambiguous=flag", "--limit", "2",
           "--probe", "accuracy", "--output", str(tmp_path / "out")]
    assert probe(*run).returncode == 0
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 4, "n_embd": 32, "n_head": 2}))
    r = probe(*run)  # a real process: the refusal is its one line
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "holds a different run (model_digest: " in r.stderr and "loading" not in r.stderr
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}))
    task.write_text(task.read_text().replace("What is the capital of", "Name the capital of"))
    r = probe_here(capsys, *run)
    assert r.returncode == 2 and "holds a different run (task_digest: " in r.stderr, r.stderr
    assert "version" not in r.stderr.split("(", 1)[1]  # the same version: only the content tells them apart


def test_names_never_lead_outside_the_results_folder(tmp_path):
    task = tmp_path / "evil.yaml"
    text = (TASKS / "capitals.yaml").read_text().replace("data/", str(TASKS / "data") + "/")
    task.write_text(text.replace("name: capitals", "name: ../../../escaped"))
    r = probe("run", "--model", "tiny-gpt2", "--task", str(task), "--task-option", "ambiguous=flag", "--limit", "2",
              "--probe", "accuracy", env={"PROBE_RESULTS": str(tmp_path / "results")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "results" / "tiny-gpt2" / "escaped" / "accuracy" / "table.csv").exists()
    assert not list(tmp_path.parent.glob("escaped*")) and not (tmp_path / "escaped").exists()


def test_a_sweep_writes_path_and_config_models_under_its_results(tmp_path):
    cfg = tmp_path / "models" / "tiny.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "models": [str(cfg), str(folder)], "tasks": ["capitals"],
                                    "probes": ["accuracy"], "results": "res"}))
    sweep = load_sweep(path)
    outs = [sweep.output(u) for u in sweep.units()]
    assert all(o.resolve().is_relative_to((tmp_path / "res").resolve()) for o in outs), outs
    assert len({o.parts[-3] for o in outs}) == 2  # one folder per model, named from its path


def test_a_runs_table_is_typed_once_over_its_batches_not_per_batch(tmp_path):
    """A column is a number where every batch wrote numbers, text where any wrote text (a node label "-" above the
    root in one batch, node numbers in another), and a token's leading space survives; the finished table.csv reads
    back as the table was."""
    import pandas as pd

    from probes.runs.rundir import RunDir, read_table, write_csv

    with RunDir(tmp_path / "run", {"probe": "x"}) as run:
        run.write_part([{"item": 0, "up1": "3", "token": " 1", "rank": 1, "p": 0.5, "ok": True, "none": None}])
        run.write_part([{"item": 1, "up1": "-", "token": " 12", "rank": 4, "p": 0.25, "ok": False, "none": None}])
        table = run.table()
    write_csv(tmp_path / "run" / "table.csv", table)  # as RunDir.finish writes it
    assert table.up1.tolist() == ["3", "-"] and table.token.tolist() == [" 1", " 12"]
    assert table["rank"].dtype.kind == "i" and table.p.dtype.kind == "f" and table.ok.tolist() == [True, False]
    assert table["none"].isna().all()
    pd.testing.assert_frame_equal(read_table(tmp_path / "run" / "table.csv"), table)
