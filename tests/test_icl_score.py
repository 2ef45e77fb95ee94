"""Text tasks (tasks/documents.py) and the icl-score probe: the score is the late token's loss minus the early one's,
computed by hand; documents too short are counted and left out; bad input is one line."""

import json

import pytest
import torch

from probes.errors import ProbeError
from probes.methods.icl_score import run_icl_score, summarize_icl_score
from probes.tasks.files import build_task, load_task_file

from .conftest import loaded
from .test_cli import probe

WORDS = "the cat sat on the mat and then the dog ran to the park where a bird sang".split()


def docs(tmp_path, lengths=(120, 120, 10)):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[i % len(WORDS)] for i in range(n))}) + "\n"
                            for n in lengths))
    (tmp_path / "t.yaml").write_text("name: t\nversion: 1\nkind: text\ndata: {file: docs.jsonl}\ndocuments: 10\n")
    return load_task_file(tmp_path / "t.yaml")


def test_the_score_is_the_late_loss_minus_the_early_loss(tmp_path):
    lm = loaded("tiny-gpt2")
    task = docs(tmp_path)
    items = task.items()
    assert len(items) == 3 and items[0].prompt.startswith("the cat sat")
    rows = run_icl_score(lm, items, early=5, late=40)
    assert [r["reaches_late"] for r in rows] == [True, True, False]
    ids = torch.tensor([lm.tokenizer(items[0].prompt).input_ids[:41]])
    with torch.no_grad():
        logits = lm.arch.hf(ids).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    assert rows[0]["loss_early"] == pytest.approx(float(nll[4]), abs=1e-4)  # predicting token 5
    assert rows[0]["score"] == pytest.approx(float(nll[39] - nll[4]), abs=1e-4)
    import pandas as pd
    s = summarize_icl_score(pd.DataFrame(rows))
    assert s["documents"] == 2 and s["too_short"] == 1


def test_bad_text_tasks_and_options_are_one_line_errors(tmp_path):
    with pytest.raises(ProbeError, match="data must name one file, dataset or corpus"):
        build_task({"name": "t", "version": 1, "kind": "text", "data": {}})
    task = docs(tmp_path)
    with pytest.raises(ProbeError, match="--early 40 is not before --late 5"):
        run_icl_score(loaded("tiny-gpt2"), task.items(), early=40, late=5)
    r = probe("run", "--model", "tiny-gpt2", "--task", str(tmp_path / "t.yaml"), "--probe", "icl-score", "--late",
              "5000", "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "no document reaches the late token" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("probe: error") == 1  # one line (after the progress bar)
