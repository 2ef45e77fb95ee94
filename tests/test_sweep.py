"""Sweeps: local and real-Slurm execution, resumable shards under SIGKILL, concurrent writers, aggregate, report."""

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from probes.reports.aggregate import aggregate
from probes.errors import ProbeError
from probes.runs.rundir import RunDir
from probes.runs.sweep import load_sweep, unit_states

from .cluster import Slurm, chromium
from .test_cli import ENV, probe_here

GRID = {"models": ["tiny-gpt2", "tiny-llama"], "tasks": ["capitals", "past-tense"],
        "probes": ["logit-lens", "ffn-ablation"], "batch_size": 2, "task_options": {"ambiguous": "flag"},
        "slurm": {"gpus": 0, "mem": "1G", "cpus_per_task": 1, "time": "00:10:00"}}


def write_sweep(folder: Path, limit: int = 6, **changes) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "grid", **GRID, "limit": limit, "results": "results", **changes}))
    return path


def sweep_cmd(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "probes", "sweep", *map(str, args), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV, **kw)


def status(run: Path) -> str | None:
    try:
        return json.loads((run / "meta.json").read_text())["status"]
    except FileNotFoundError:
        return None


def tables(results: Path) -> dict[str, pd.DataFrame]:
    return aggregate(results, ["model", "task", "probe"])


def assert_same_tables(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted local run of the grid (limit 12), to compare interrupted and Slurm runs against."""
    folder = tmp_path_factory.mktemp("reference")
    p = sweep_cmd("--executor", "local", write_sweep(folder, limit=12))
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    assert "8 unit(s) run, 0 skipped" in out
    return folder / "results"


@pytest.mark.parametrize("change, message", [
    ({"models": ["tiny-gpt2", "gpt5"]}, "unknown model 'gpt5'; accepted:"),
    ({"tasks": ["capitols"]}, "unknown task 'capitols'; accepted:"),
    ({"probes": ["logit-lens", "x-ray"]}, "unknown probe 'x-ray'; accepted:"),
    ({"options": {"topk": 3, "colour": "red"}}, "unknown probe option(s) colour; accepted:"),
    ({"slurm": {"gpu": 1}}, "unknown slurm option(s) gpu; accepted:"),
])
@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_a_bad_sweep_is_refused_before_anything_runs(tmp_path, change, message, executor, capsys):
    path = write_sweep(tmp_path, **change)
    if "models" in change:  # one of each executor as a real process, the others in this one
        p = sweep_cmd("--executor", executor, path)
        _, err = p.communicate(timeout=120)
        code = p.returncode
    else:
        r = probe_here(capsys, "sweep", "--executor", executor, path)
        code, err = r.returncode, r.stderr
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "results").exists()


def test_sigkill_part_way_then_rerun_gives_the_uninterrupted_aggregate(tmp_path, reference):
    path = write_sweep(tmp_path, limit=12)
    p = sweep_cmd("--executor", "local", path)
    results = tmp_path / "results"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # kill once a unit is complete and the next has written a batch
        done = [m for m in results.rglob("meta.json") if status(m.parent) == "complete"]
        partial = [d for d in results.rglob("parts") if any(d.glob("*.csv")) and status(d.parent) == "running"]
        if done and partial:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    states = {u.id: s for u, s, _ in unit_states(load_sweep(path))}
    assert "done" in states.values() and "failed" in states.values()  # the killed unit is reported, not "running"
    assert any(Path(d.parent, ".lock").exists() for d in partial)  # its lock is stale, and must be taken over

    p = sweep_cmd("--executor", "local", path)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
    assert_same_tables(tables(results), tables(reference))
    for table in reference.rglob("table.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(results / table.relative_to(reference)), pd.read_csv(table))
    assert not list(results.rglob(".lock")) and not list(results.rglob("*.tmp"))


def test_two_processes_writing_one_results_folder_lose_nothing(tmp_path, reference):
    """Two runs of the same sweep at once (they share the units) and a third sweep into the same folder."""
    path = write_sweep(tmp_path, limit=12)
    other = tmp_path / "other"
    other.mkdir()
    other_path = write_sweep(other, limit=12, models=["tiny-opt"], results=str(tmp_path / "results"))
    procs = [sweep_cmd("--executor", "local", path), sweep_cmd("--executor", "local", path),
             sweep_cmd("--executor", "local", other_path)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    ran = [int(o[0].split(" unit(s) run")[0].split()[-1]) for o in outs[:2]]
    assert sum(ran) == 8  # each shared unit computed by exactly one of the two
    results = tmp_path / "results"
    metas = [json.loads(m.read_text()) for m in results.rglob("meta.json")]
    assert len(metas) == 12 and all(m["status"] == "complete" for m in metas)
    for table in results.rglob("table.csv"):
        assert len(pd.read_csv(table)) > 0
    got = tables(results)
    ref = tables(reference)
    for name in ref:
        pd.testing.assert_frame_equal(got[name][got[name].model != "tiny-opt"].reset_index(drop=True), ref[name])
    assert set(got["logit-lens"].model) == {"tiny-gpt2", "tiny-llama", "tiny-opt"}


def test_a_held_run_folder_is_refused_to_a_second_writer(tmp_path):
    with RunDir(tmp_path / "run", {"a": 1}):
        with pytest.raises(ProbeError, match=r"is being written by pid \d+ on .*; accepted: wait for it"):
            RunDir(tmp_path / "run", {"a": 1})
    with RunDir(tmp_path / "run", {"a": 1}):  # released on exit
        pass


def test_a_killed_writers_lock_and_half_written_files_are_taken_over(tmp_path):
    run = tmp_path / "run"
    with RunDir(run, {"a": 1}) as r:
        r.write_part([{"item": 0, "x": 1.0}])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    torn = [run / "parts" / "items-000001-000001.csv.abc123.tmp", run / "meta.json.xyz.tmp"]
    for t in torn:
        t.write_text("item,x\n1,")
    with RunDir(run, {"a": 1}) as r:
        assert r.done_items() == {0} and not any(t.exists() for t in torn)
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not (run / ".lock").exists()


def test_aggregate_writes_csv_parquet_markdown_and_groups(tmp_path, reference):
    r = subprocess.run([sys.executable, "-m", "probes", "aggregate", str(reference), "--out", str(tmp_path / "agg")],
                       capture_output=True, text=True, env=ENV, check=False)
    assert r.returncode == 0, r.stderr
    csv = pd.read_csv(tmp_path / "agg" / "ffn-ablation-curve.csv")
    pq = pd.read_parquet(tmp_path / "agg" / "ffn-ablation-curve.parquet")
    pd.testing.assert_frame_equal(csv, pq, check_dtype=False)
    assert {"model", "params", "family", "task", "variant", "accuracy", "relative_drop"} <= set(csv.columns)
    assert set(csv.variant) >= {"none"} and (tmp_path / "agg" / "tables.md").read_text().startswith("## ffn-ablation")
    lens = pd.read_csv(tmp_path / "agg" / "logit-lens.csv")
    assert len(lens) == 4 and lens.params.notna().all()
    by_model = aggregate(reference, ["model", "probe"])["logit-lens"]
    assert list(by_model.runs) == [2, 2]  # two tasks averaged per model
    expected = lens.groupby("model", sort=False).accuracy.mean()
    assert np.allclose(by_model.set_index("model").accuracy[expected.index], expected)
    r = subprocess.run([sys.executable, "-m", "probes", "aggregate", str(reference), "--by", "model,size"],
                       capture_output=True, text=True, env=ENV, check=False)
    assert r.returncode == 2 and "unknown --by column 'size'; accepted:" in r.stderr


def test_report_opens_in_headless_chromium_with_its_plots(tmp_path, reference):
    report = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "probes", "report", str(reference), "--out", str(report)],
                       capture_output=True, text=True, env=ENV, check=False)
    assert r.returncode == 0, r.stderr
    text = report.read_text()
    # every run's plot, and the lens accuracy against model size (ablation's size plot would need one variant)
    assert text.count('<img src="data:image/png;base64,') == 8 + 1
    assert "ffn-ablation: accuracy by variant" in text and "top 6/6" in text
    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,8000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    # matplotlib's first two line colours (C0 blue, C1 orange) appear only if the inlined plots were drawn
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels - colour).sum(1) < 30).sum() > 200, colour


MEASURE = """<script>window.addEventListener("load", () => {
  const d = document.documentElement, imgs = [...document.images];
  const boxes = [...document.querySelectorAll(".table")];
  document.title = JSON.stringify({page: d.scrollWidth, view: d.clientWidth, images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).length,
    shrunk: imgs.filter(i => i.getBoundingClientRect().width < 0.7 * i.naturalWidth
      || i.getBoundingClientRect().width < Math.min(i.naturalWidth, i.closest(".plots").clientWidth) - 2).length,
    tables: boxes.length, scrolling: boxes.filter(b => b.scrollWidth > b.clientWidth).length,
    beyond: [...document.body.querySelectorAll("*")].filter(e => e.getBoundingClientRect().right > d.clientWidth + 1
      && !e.closest(".table")).length});
});</script>"""


def page_metrics(report: Path, width: int) -> dict:
    """What headless Chromium lays out for `report` in a window `width` px wide: the page's and the window's
    widths, images (broken; shrunk: shown narrower than their own size on a page that has room, or below 70% of
    it, where their text gets too small to read), table boxes and how many scroll, elements beyond the right edge
    outside those boxes."""
    probe_page = report.with_name(f"measured-{width}.html")
    probe_page.write_text(report.read_text().replace("</body>", MEASURE + "</body>"))
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", f"--window-size={width},900", "--virtual-time-budget=10000",
                          "--dump-dom", probe_page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return json.loads(html.unescape(re.search(r"<title>(.*?)</title>", dom, re.S).group(1)))


@pytest.fixture(scope="module")
def wide_results(reference, tmp_path_factory):
    """The reference runs plus the widest tables and figures a report shows: the attention probe's per-N table,
    the FFN read-out's, and a lens over every position (a heat map per item)."""
    import probes

    folder = tmp_path_factory.mktemp("wide") / "results"
    shutil.copytree(reference, folder)
    runs = [("tiny-llama", "nback-sequence", "attention", {}), ("tiny-llama", "capitals", "ffn-readout", {}),
            ("tiny-gpt2", "capitals", "logit-lens", {"positions": "all"})]
    for model, task, name, options in runs:
        lm = probes.load(model, attn_implementation="eager" if name == "attention" else None)
        probes.run(lm, probes.task(task, ambiguous="flag"), name, limit=6,
                   output=folder / model / f"{task}-wide" / name, **options)
    return folder


@pytest.mark.parametrize("width", [1400, 1024])
def test_the_report_fits_the_window_in_a_real_browser_with_every_image_loaded(tmp_path, wide_results, width):
    report = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "probes", "report", str(wide_results), "--out", str(report)],
                       capture_output=True, text=True, env=ENV, check=False)
    assert r.returncode == 0, r.stderr
    m = page_metrics(report, width)
    assert m["images"] >= 12 and m["broken"] == 0 and m["shrunk"] == 0, m
    assert m["page"] <= m["view"] and m["beyond"] == 0, m  # no sideways scrolling: wide tables scroll in a box
    assert m["tables"] >= 5 and m["scrolling"] >= 1, m


def test_slurm_array_completes_aggregates_and_reruns_only_a_deleted_unit(tmp_path_factory, reference):
    slurm = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        folder = tmp_path_factory.mktemp("slurm-sweep")
        path = write_sweep(folder, limit=12)
        p = sweep_cmd("--executor", "slurm", "--wait", path, env=slurm.env)
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        assert "submitted job" in out and "8 unit(s) (cpus_per_task=1, gpus=0, mem=1G" in out and "8 done" in out
        results = folder / "results"
        assert_same_tables(tables(results), tables(reference))

        victim = results / "tiny-llama" / "past-tense" / "ffn-ablation"
        for f in sorted(victim.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        victim.rmdir()
        p = sweep_cmd("--executor", "slurm", "--wait", path, env=slurm.env)
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        assert "1 unit(s)" in out and "8 done" in out
        last = sorted((results / ".sweeps" / "grid").glob("*/submission.json"))[-1]
        assert json.loads(last.read_text())["units"] == ["tiny-llama/past-tense/ffn-ablation"]
        assert_same_tables(tables(results), tables(reference))

        # two units left "running" by jobs on another node: one whose array task has ended (killed at its time
        # limit, say), one whose job is still in the queue
        first = json.loads((results / ".sweeps" / "grid" / "submissions.jsonl").read_text().splitlines()[0])["job"]
        sleeper = subprocess.run(["sbatch", "--parsable", "--mem=10M", f"--output={folder}/sleeper.out", "--wrap",
                                  "sleep 120"], env=slurm.env, capture_output=True, text=True, check=True)
        sleeper = sleeper.stdout.strip().split(";")[0]
        ended = results / "tiny-gpt2" / "capitals" / "logit-lens"
        live = results / "tiny-gpt2" / "past-tense" / "logit-lens"
        for run, job in ((ended, f"{first}_0"), (live, sleeper)):
            meta = json.loads((run / "meta.json").read_text())
            (run / "meta.json").write_text(json.dumps({**meta, "status": "running"}))
            (run / "table.csv").unlink()
            sorted((run / "parts").glob("*.csv"))[-1].unlink()
            (run / ".lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "slurm_job": job}))
        r = subprocess.run([sys.executable, "-m", "probes", "status", str(path)], env=slurm.env, capture_output=True,
                           text=True, check=True)
        state = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if line.startswith("tiny-")}
        assert state["tiny-gpt2/capitals/logit-lens"] == "failed" and "killed" in r.stdout
        assert state["tiny-gpt2/past-tense/logit-lens"] == "running" and f"job {sleeper}" in r.stdout
        subprocess.run(["scancel", sleeper], env=slurm.env, check=True)
        p = sweep_cmd("--executor", "slurm", "--wait", path, env=slurm.env)
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        assert "2 unit(s)" in out and "8 done" in out
        assert_same_tables(tables(results), tables(reference))
        assert not list(results.rglob(".lock"))
    finally:
        slurm.stop()


def test_shipped_sweeps_expand_and_take_slurm_resources_from_the_plan(tmp_path, monkeypatch):
    from probes.paths import ROOT
    from probes.runs.slurm import submit_slurm

    monkeypatch.chdir(tmp_path)  # no `results:` in the file: results/ of the current folder, as for `probe run`
    monkeypatch.delenv("PROBE_RESULTS", raising=False)

    for f in sorted((ROOT / "sweeps").glob("*.yaml")):
        sweep = load_sweep(f)
        assert sweep.units() or sweep.train_units  # probe units, or training alone (icl-reproduction)
    paper = tmp_path / "paper.yaml"
    paper.write_text((ROOT / "sweeps" / "paper-scale.yaml").read_text())
    sweep = load_sweep(paper)
    assert sweep.results == tmp_path / "results"
    assert len(sweep.units()) == 10 * 6 * 4 * 3
    records = submit_slurm(sweep, dry_run=True)
    assert {r["resources"]["gpus"] for r in records} == {1, 5}  # all on one 80 GiB GPU but BLOOM-176B (bf16)
    big = [r for r in records if r["resources"]["gpus"] == 5]
    assert sum(len(r["units"]) for r in big) == 6 * 4 * 3 and all(u.startswith("bloom-176b/") for r in big
                                                                  for u in r["units"])
    assert {r["resources"]["mem"] for r in big} == {"64G"}  # host memory to stream shards to the GPUs, not 328 GiB
    # time limits from the plan: reading BLOOM-176B's 352 GB checkpoint alone takes half an hour at 200 MB/s
    hours = {u: int(r["resources"]["time"].split("-")[0]) * 24 + int(r["resources"]["time"].split("-")[1][:2])
             + int(r["resources"]["time"].split(":")[1]) / 60 for r in records for u in r["units"]}
    assert {hours[u] for u in hours if u.startswith("gpt2/")} == {0.5}
    assert min(hours[u] for u in hours if u.startswith("bloom-176b/")) >= 2
    big = big[0]
    script = Path(big["script"]).read_text()
    assert "#SBATCH --gres=gpu:5" in script and "#SBATCH --partition=gpu" in script and "--array" in " ".join(
        big["command"])
    assert not (tmp_path / "results" / ".sweeps" / "paper-scale" / "submissions.jsonl").exists()  # nothing sent


def finish_it_first(monkeypatch, finish):
    """The first lock anyone takes waits until `finish()` (another writer, here in this process) has run the
    unit to the end: a writer held between its look (not done) and its lock, deterministically."""
    from probes.runs import rundir

    acquire, held = rundir.RunLock.acquire, []

    def other_writer_first(self):
        if not held:
            held.append(self.path)
            finish()
        return acquire(self)

    monkeypatch.setattr(rundir.RunLock, "acquire", other_writer_first)


def test_a_unit_finished_between_a_writers_look_and_its_lock_is_not_run_again(tmp_path, monkeypatch):
    import dataclasses

    from probes.methods import catalog
    from probes.runs.sweep import run_unit

    from .conftest import loaded

    sweep = load_sweep(write_sweep(tmp_path, limit=4, models=["tiny-gpt2"], tasks=["capitals"], probes=["logit-lens"]))
    unit, model = sweep.units()[0], loaded("tiny-gpt2")
    computed = []
    lens = catalog.PROBES["logit-lens"]
    monkeypatch.setitem(catalog.PROBES, "logit-lens", dataclasses.replace(
        lens, run=lambda loaded, items, **kw: computed.extend(it.index for it in items) or lens.run(loaded, items, **kw)))
    finish_it_first(monkeypatch, lambda: computed.append(run_unit(sweep, unit, model, progress=False)))
    assert run_unit(sweep, unit, model, progress=False) == "skipped"
    assert computed.count("done") == 1 and len([i for i in computed if i != "done"]) == 4  # each item once
    meta = json.loads((sweep.output(unit) / "meta.json").read_text())
    assert meta["status"] == "complete" and "sweep" in meta
    assert not (sweep.output(unit) / ".lock").exists()
