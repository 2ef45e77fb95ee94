"""A sweep's `lens:` section (probes/runs/lens_units.py): one tuned-lens unit per model, run before that model's
probes, writing the lens where `--lens tuned` reads it; a rerun skips it, other tokens train it again; bad values
are refused in one line before anything runs; on Slurm the lens units are jobs that the probes reading the lens wait
for (and that wait for their model's training)."""

import itertools
import json
import subprocess
import sys

import pytest
import yaml

from probes.methods.tuned_lens import cache_folder, file_digest
from probes.models.registry import resolve_model
from probes.runs import slurm
from probes.runs.sweep import load_sweep, run_local, unit_states

from .cluster import Slurm
from .conftest import ROOT
from .test_cli import probe_here
from .test_training_sweep import write_sweep as write_training_sweep

MODELS = ["tiny-gpt2", "tiny-llama"]
TOKENS = 2048  # two chunks of the tiny models' 1024 positions: two steps, a fraction of a second each


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A cache of its own (the lenses, and the random models' weights), so no test reads another's lens."""
    monkeypatch.setenv("PROBE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_sweep(folder, **changes):
    """logit-lens reads the tuned lens; ffn-ablation takes no `lens` option, so it waits for no lens."""
    corpus = folder / "corpus.txt"  # the shipped task files, separated as TinyStories' .txt files are
    corpus.write_text("\n<|endoftext|>\n".join(f.read_text() for f in sorted((ROOT / "tasks").glob("*.yaml"))))
    sweep = {"name": "lensed", "models": MODELS, "tasks": ["capitals"], "probes": ["logit-lens", "ffn-ablation"],
             "limit": 4, "batch_size": 2, "options": {"lens": "tuned"}, "task_options": {"ambiguous": "flag"},
             "results": "results",
             "lens": {"tokens": TOKENS, "corpus": "file:corpus.txt"},
             "slurm": {"gpus": 0, "mem": "1G", "cpus_per_task": 1, "time": "00:10:00"}, **changes}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in sweep.items() if v is not None}))
    return path


def lens_of(model):
    return cache_folder(resolve_model(model))


def states(sweep):
    return {u.id: (state, detail) for u, state, detail in unit_states(sweep)}


def test_lens_units_run_first_and_the_probes_read_their_lens_a_rerun_skips_them(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    assert [u.id for u in sweep.lens_units()] == ["lens/tiny-gpt2", "lens/tiny-llama"]  # one per model
    before = states(sweep)
    assert before["lens/tiny-gpt2"] == ("pending", "")
    assert before["tiny-gpt2/capitals/logit-lens"] == ("pending", "waits for lens/tiny-gpt2")
    assert before["tiny-llama/capitals/ffn-ablation"] == ("pending", "")  # it reads no lens
    outcome = run_local(sweep, progress=False)
    assert set(outcome.values()) == {"done"}, outcome
    order = list(outcome)
    for model in MODELS:
        assert order.index(f"lens/{model}") < order.index(f"{model}/capitals/logit-lens")
        lens = json.loads((lens_of(model) / "meta.json").read_text())
        assert lens["tokens_asked"] == TOKENS and lens["corpus"] == f"file:{tmp_path / 'corpus.txt'}"
        run = json.loads((tmp_path / "results" / model / "capitals" / "logit-lens" / "meta.json").read_text())
        assert run["config"]["tuned_lens"] == {"params_sha256": file_digest(lens_of(model) / "params.pt")}
    after = states(sweep)
    assert {s for s, _ in after.values()} == {"done"}
    assert after["lens/tiny-gpt2"][1].startswith(f"{TOKENS:,} tokens of file:")

    digests = {m: file_digest(lens_of(m) / "params.pt") for m in MODELS}
    mtimes = {m: (lens_of(m) / "params.pt").stat().st_mtime_ns for m in MODELS}
    assert set(run_local(load_sweep(sweep.path), progress=False).values()) == {"skipped"}
    assert {m: (lens_of(m) / "params.pt").stat().st_mtime_ns for m in MODELS} == mtimes

    # other tokens: the lens is trained again, replacing the cached one, and the probes reading it run again
    sweep = load_sweep(write_sweep(tmp_path, lens={"tokens": 3 * 1024, "corpus": "file:corpus.txt"}))
    stale = states(sweep)
    assert stale["lens/tiny-gpt2"][0] == "pending" and f"trained on {TOKENS} tokens" in stale["lens/tiny-gpt2"][1]
    assert stale["tiny-gpt2/capitals/logit-lens"] == ("pending", "waits for lens/tiny-gpt2")
    assert stale["tiny-gpt2/capitals/ffn-ablation"][0] == "done"
    outcome = run_local(sweep, progress=False)
    assert outcome == {"lens/tiny-gpt2": "done", "lens/tiny-llama": "done", "tiny-gpt2/capitals/logit-lens": "done",
                       "tiny-gpt2/capitals/ffn-ablation": "skipped", "tiny-llama/capitals/logit-lens": "done",
                       "tiny-llama/capitals/ffn-ablation": "skipped"}
    for model in MODELS:
        assert json.loads((lens_of(model) / "meta.json").read_text())["steps"] == 3
        new = file_digest(lens_of(model) / "params.pt")
        run = json.loads((tmp_path / "results" / model / "capitals" / "logit-lens" / "meta.json").read_text())
        assert new != digests[model] and run["config"]["tuned_lens"]["params_sha256"] == new


def test_a_lens_that_fails_to_train_fails_the_probes_that_read_it_and_is_reported(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, models=["tiny-gpt2"], lens={"tokens": 2**30, "corpus": "file:corpus.txt"}))
    outcome = run_local(sweep, progress=False)
    assert outcome["lens/tiny-gpt2"].startswith("failed: corpus file:") and "fewer than" in outcome["lens/tiny-gpt2"]
    assert outcome["tiny-gpt2/capitals/logit-lens"] == "failed: lens/tiny-gpt2 is not done"
    assert outcome["tiny-gpt2/capitals/ffn-ablation"] == "done"
    now = states(sweep)
    assert now["lens/tiny-gpt2"][0] == "failed" and "fewer than" in now["lens/tiny-gpt2"][1]
    assert not (lens_of("tiny-gpt2") / "params.pt").exists()


def test_without_a_lens_section_a_cached_lens_is_read_and_a_missing_one_refused_in_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path, models=["tiny-gpt2"], lens=None)
    r = probe_here(capsys, "sweep", path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "tiny-gpt2/capitals/logit-lens: no tuned lens for tiny-gpt2 in the cache" in r.stderr
    assert not (tmp_path / "results").exists()

    import probes

    probes.train_lens("tiny-gpt2", tokens=TOKENS, corpus=f"file:{tmp_path / 'corpus.txt'}")  # as probe lens train
    sweep = load_sweep(path)
    assert sweep.lens_units() == [] and set(run_local(sweep, progress=False).values()) == {"done"}
    run = json.loads((tmp_path / "results" / "tiny-gpt2" / "capitals" / "logit-lens" / "meta.json").read_text())
    assert run["config"]["tuned_lens"] == {"params_sha256": file_digest(lens_of("tiny-gpt2") / "params.pt")}


@pytest.mark.parametrize("lens, message", [
    ({"tokens": 0}, "lens tokens 0; accepted: a positive integer"),
    ({"tokens": -4096}, "lens tokens -4096; accepted: a positive integer"),
    ({"tokens": "many"}, "lens tokens 'many'; accepted: a positive integer"),
    ({"tokens": True}, "lens tokens True; accepted: a positive integer"),
    ({"corpus": "wikipedia"}, "lens: unknown corpus 'wikipedia'; accepted: stdlib-english, dataset:NAME"),
    ({"corpus": "file:nowhere.txt"}, "lens corpus 'file:nowhere.txt': no file"),
    ({"corpus": 3}, "lens corpus 3; accepted: stdlib-english"),
    ({"steps": 10}, "unknown lens field(s) steps; accepted: tokens, corpus, slurm"),
    ({"slurm": {"gpu": 1}}, "lens slurm {'gpu': 1}; accepted: a mapping of account, cpus_per_task"),
    ({"slurm": {"gpus": "two"}}, "lens: bad slurm gpus 'two'; accepted: an integer of at least 0"),
    ("yes", "lens 'yes' is not a mapping of tokens, corpus, slurm"),
])
def test_a_bad_lens_section_is_refused_in_one_line_before_anything_runs(tmp_path, cache, lens, message, capsys):
    r = probe_here(capsys, "sweep", write_sweep(tmp_path, lens=lens))
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "results").exists() and not (cache / "tuned-lens").exists()


def test_on_slurm_lens_jobs_wait_for_training_and_probes_that_read_them_for_their_lens(tmp_path, monkeypatch):
    """Job ids as sbatch would give them (the submission itself is a dry run): training 100, then the lens jobs."""
    path = write_training_sweep(tmp_path, probes={"logit-lens": ["nback-trained"], "nback": ["nback-trained"]},
                                options={"lens": "tuned"}, lens={"tokens": 64, "corpus": "stdlib-english"},
                                task_options={"n": ["{task.n}"]})
    sweep = load_sweep(path)
    ids, real = itertools.count(100), slurm._submit

    def numbered(sweep, units, res, after, folder, dry_run):
        return {**real(sweep, units, res, after, folder, True), "job": str(next(ids))}

    monkeypatch.setattr(slurm, "_submit", numbered)
    records = slurm.submit_slurm(sweep, dry_run=True)
    job = {u: f"{r['job']}_{i}" for r in records for i, u in enumerate(r["units"])}
    after = {u: r.get("after") for r in records for u in r["units"]}
    assert records[0]["units"] == ["train/tiny/n1-seed0", "train/tiny/n2-seed0"] and "after" not in records[0]
    lenses = [u.id for u in sweep.lens_units()]
    assert lenses == [f"lens/tiny-n{n}-seed0@{k}" for n in (1, 2) for k in (6, 12)]  # one per checkpoint
    for n in (1, 2):
        for k in (6, 12):
            lens, model = f"lens/tiny-n{n}-seed0@{k}", f"tiny-n{n}-seed0@{k}"
            assert after[lens] == job[f"train/tiny/n{n}-seed0"]  # a checkpoint's lens waits for its training
            assert after[f"{model}/nback-trained/logit-lens"] == job[lens]  # a probe reading it, for its own lens
            assert after[f"{model}/nback-trained/nback"] == job[f"train/tiny/n{n}-seed0"]  # one reading none
    for r in records[1:]:
        assert r["command"][-3:-1] == [f"--dependency=afterok:{r['after']}", "--kill-on-invalid-dep=yes"]
    assert len(after) == len(sweep.all_units())  # every unit submitted once


def test_real_slurm_runs_the_lens_job_then_the_probes_that_wait_for_it(tmp_path_factory):
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        folder = tmp_path_factory.mktemp("slurm-lens")
        path = write_sweep(folder, models=["tiny-gpt2"])
        env = {**cluster.env, "PROBE_CACHE": str(folder / "cache"), "PYTHONWARNINGS": "ignore"}
        run = subprocess.run([sys.executable, "-m", "probes", "sweep", str(path), "--executor", "slurm", "--wait",
                              "--quiet"], capture_output=True, text=True, env=env, timeout=900, check=False)
        assert run.returncode == 0, run.stderr
        subs = [json.loads(line) for line in (folder / "results" / ".sweeps" / "lensed" / "submissions.jsonl")
                .read_text().splitlines()]
        assert subs[0]["units"] == ["lens/tiny-gpt2"]
        records = [json.loads(p.read_text()) for p in sorted((folder / "results" / ".sweeps" / "lensed")
                                                              .glob("*/submission.json"))]
        waiting = {u: r.get("after") for r in records for u in r["units"]}
        assert waiting["tiny-gpt2/capitals/logit-lens"] == f"{subs[0]['job']}_0"
        assert waiting["lens/tiny-gpt2"] is None and waiting["tiny-gpt2/capitals/ffn-ablation"] is None
        assert "lens/tiny-gpt2" in run.stdout and "3 done" in run.stdout  # `probe status` after the wait
        lens = folder / "cache" / "tuned-lens"
        (trained,) = [p for p in lens.iterdir() if p.name.startswith("tiny-gpt2-")]
        meta = json.loads((folder / "results" / "tiny-gpt2" / "capitals" / "logit-lens" / "meta.json").read_text())
        assert meta["status"] == "complete"
        assert meta["config"]["tuned_lens"] == {"params_sha256": file_digest(trained / "params.pt")}
        again = subprocess.run([sys.executable, "-m", "probes", "sweep", str(path), "--executor", "slurm"],
                               capture_output=True, text=True, env=env, timeout=300, check=False)
        assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stderr
    finally:
        cluster.stop()
