"""A user's own prompts (--prompts FILE, --prompt TEXT --answer TEXT) and any hub model by id (hf:ORG/NAME@REV),
with the checks made before a model loads."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import probes
from probes.errors import ProbeError
from probes.models.loading import checkpoint
from probes.models.registry import load_registry, resolve_model
from probes.tasks.files import load_task
from probes.tasks.prompts import prompts_task

from .conftest import loaded
from .test_cli import probe, probe_here


def capitals_as_prompts(tmp_path, n=6, fmt="csv"):
    """The first n items of the capitals task (flagged, so the tiny tokenizer keeps them), written as a prompts
    file: the same prompts, answers and arguments a user would list."""
    task = load_task("capitals", {"ambiguous": "flag"})
    items = task.scored_items(loaded("tiny-gpt2").tokenizer, n)[0]
    rows = [{"prompt": it.prompt, "answer": it.output, "argument": it.input, "group": it.group} for it in items]
    path = tmp_path / f"capitals.{fmt}"
    if fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task, items, path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_prompts_file_gives_the_task_s_numbers_for_the_same_prompts(tmp_path, fmt):
    task, items, path = capitals_as_prompts(tmp_path, fmt=fmt)
    lm = loaded("tiny-gpt2")
    mine = probes.run(lm, probes.prompts(path), "logit-lens", output=tmp_path / "mine").table
    ref = probes.run(lm, task, "logit-lens", limit=len(items)).table
    assert len(mine) == len(ref) and list(mine.output) == list(ref.output)
    for col in ("answer_rank", "argument_rank", "top1", "answer_token", "argument_token"):
        assert list(mine[col]) == list(ref[col]), col
    meta = json.loads((tmp_path / "mine" / "meta.json").read_text())
    assert meta["config"]["task"] == "prompts-capitals" and meta["task_kind"] == "prompts"
    assert [r["prompt"] for r in meta["prompts"]] == [it.prompt for it in items]  # the run records its prompts


def test_answers_continue_the_prompt_after_the_delimiter():
    task = prompts_task(rows=[{"prompt": "The capital of France is", "answer": "Paris", "argument": "France"}])
    assert task.items()[0].answer == " Paris" and task.items()[0].argument == " France"
    task = prompts_task(rows=[{"prompt": "Q: capital of Japan?\nA:", "answer": " Tokyo"},
                              {"prompt": "Capital of Peru:\n", "answer": "Lima"}],
                        overrides={"delimiter": "_"})
    assert [it.answer for it in task.items()] == [" Tokyo", "Lima"]
    other = prompts_task(rows=[{"prompt": "Q: capital of Japan?\nA:", "answer": " Kyoto"},
                               {"prompt": "Capital of Peru:\n", "answer": "Lima"}])
    assert other.name != task.name and other.digest() != task.digest()  # named and identified by content


def test_one_prompt_from_the_command_line_runs_and_is_recorded(tmp_path):
    out = tmp_path / "one"
    r = probe("run", "--model", "tiny-gpt2", "--prompt", "The capital of France is", "--answer", "Paris",
              "--probe", "accuracy", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "items 1  accuracy" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompts"] == [{"prompt": "The capital of France is", "answer": "Paris", "argument": "", "group": ""}]
    table = pd.read_csv(out / "table.csv")
    assert table.input.tolist() == ["The capital of France is"] and table.output.tolist() == ["Paris"]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "Hi"], "--prompt needs --answer TEXT"),
    (["--answer", "x", "--task", "capitals"], "--answer and --argument go with --prompt"),
    (["--prompt", "Hi", "--answer", "x", "--task", "capitals"], "give one of --task, --prompts or --prompt"),
    ([], "give one of --task, --prompts or --prompt"),
    (["--prompts", "{dir}/none.csv"], "prompts file '{dir}/none.csv' not found"),
    (["--prompts", "{dir}/p.txt"], "has an unknown format; accepted: .csv, .jsonl"),
    (["--prompts", "{dir}/noanswer.csv"], "row 1 has no answer; accepted: a text in every prompt and answer"),
    (["--prompts", "{dir}/extra.csv"], "has unknown column(s) label; accepted: prompt, answer, argument, group"),
    (["--prompts", "{dir}/mixed.jsonl"], "row 2 has no argument unlike row 1; accepted: an argument in every"),
    (["--prompts", "{dir}/empty.csv"], "has no rows or cannot be read"),
    (["--prompt", "Hi", "--answer", "x", "--task-option", "shots=2"], "prompts take no task option 'shots'"),
    (["--prompt", "Hi", "--answer", "x", "--probe", "nback"], "probe 'nback' does not run on prompts task"),
    (["--prompt", "Hi", "--answer", "x", "--probe", "ffn-transplant"], "accepted: abstractive, extractive tasks"),
    (["--prompt", "Hi", "--answer", "x", "--probe", "ffn-readout"], "tracks each item's argument, and task"),
    (["--prompt", "Hi", "--answer", "x", "--positions", "2:x"], "bad lens --positions '2:x'; accepted: last, all"),
    (["--prompt", "Hi", "--answer", "x", "--positions", "5"], "lens position 5 is outside the prompt of item 0"),
    (["--prompt", "Hi", "--answer", "x", "--positions", "3:1"], "names no token of item 0"),
])
def test_bad_prompts_and_options_get_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / "p.txt").write_text("prompt,answer\nHi,x\n")
    (tmp_path / "noanswer.csv").write_text("prompt,answer\nHi,\n")
    (tmp_path / "extra.csv").write_text("prompt,answer,label\nHi,x,1\n")
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "a", "answer": "b", "argument": "c"}\n'
                                          '{"prompt": "d", "answer": "e"}\n')
    (tmp_path / "empty.csv").write_text("")
    loads = []
    at_run_time = "outside" in message or "names no token" in message  # checked against the tokenizer
    if not at_run_time:
        monkeypatch.setattr(probes.api, "load", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    r = probe_here(capsys, "run", "--model", "tiny-gpt2", *args, "--output", str(tmp_path / "out"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and lines[-1].startswith("probe: error: "), r.stderr
    assert message.replace("{dir}", str(tmp_path)) in lines[-1] and not loads
    # before loading: the error is all there is; with the tokenizer: after loading, before the first batch
    assert len(lines) == 1 if not at_run_time else "prompt/s" not in r.stderr


def test_a_different_run_in_the_output_folder_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--prompt", "Hi there", "--answer", "x", "--output", out)
    assert r.returncode == 0, r.stderr
    monkeypatch.setattr(probes.api, "load", lambda *a, **k: pytest.fail("model loaded"))
    r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--prompt", "Hi there", "--answer", "y", "--output", out)
    assert r.returncode == 2 and "holds a different run (task:" in r.stderr, r.stderr


def fake_hub_cache(home, repo: str, source: str, revision: str = "main", commit: str = "a" * 40):
    """A Hugging Face cache holding `source`'s checkpoint files as `repo` at `revision` (what a download writes)."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snapshot / f.name)
    (folder / "refs").mkdir()
    (folder / "refs" / revision).write_text(commit)
    return snapshot


def test_a_hub_model_by_id_loads_from_the_cache_as_from_pretrained_does(tmp_path, capsys):
    home = tmp_path / "hf"
    tiny, _, _ = checkpoint(load_registry()["tiny-gpt2"])
    fake_hub_cache(home, "someone/tiny-gpt2", Path(tiny))
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    flag = ["--task-option", "ambiguous=flag", "--limit", "4"]
    r = probe("run", "--model", "hf:someone/tiny-gpt2@main", "--task", "capitals", *flag, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ref = probe("run", "--model", "tiny-gpt2", "--task", "capitals", *flag, env=env, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    mine = pd.read_csv(tmp_path / "results" / "someone_tiny-gpt2@main" / "capitals" / "logit-lens" / "table.csv")
    theirs = pd.read_csv(tmp_path / "results" / "tiny-gpt2" / "capitals" / "logit-lens" / "table.csv")
    assert list(mine.answer_rank) == list(theirs.answer_rank) and list(mine.top1) == list(theirs.top1)
    meta = json.loads((tmp_path / "results" / "someone_tiny-gpt2@main" / "capitals" / "logit-lens" /
                       "meta.json").read_text())
    assert meta["config"]["source"] == "hub:someone/tiny-gpt2@main" and meta["family"] == "gpt2"


def test_hub_ids_that_cannot_be_used_get_one_line(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    source = tmp_path / "bert"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "bert"}))
    fake_hub_cache(home, "someone/a-bert", source)
    with pytest.raises(ProbeError, match=r"^hub model 'someone/a-bert' is a 'bert' model, not a supported family; "
                                         r"accepted: bloom, falcon, gemma"):
        resolve_model("hf:someone/a-bert")
    with pytest.raises(ProbeError, match=r"^hub model 'someone/absent' at 'v2': no config.json in the local Hugging "
                                         r"Face cache and the hub cannot give one"):
        resolve_model("hf:someone/absent@v2")
    for bad in ("hf:gpt2", "hf:../../etc", "hf:a/b@x y", "hf:a/b/c"):
        with pytest.raises(ProbeError, match=r"^bad hub model .*; accepted: hf:ORG/NAME or hf:ORG/NAME@REVISION"):
            resolve_model(bad)
