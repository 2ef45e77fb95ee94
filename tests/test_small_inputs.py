"""Every probe on every task kind it accepts, at --limit 1, 2, 3 and 4, through the command: a table (and a plot,
when the probe draws one) with exit 0, or one line saying why with exit 2; never a traceback."""

import json

import pytest

from probes.methods.catalog import PROBES

from .test_cli import probe_here

# one task per kind; ambiguous=flag so that the tiny tokenizer's ambiguous answers still give items to score
TEXT = ["--task-option", "ambiguous=flag"]
KINDS = {
    "abstractive": ["--task", "capitals", *TEXT],
    "extractive": ["--task", "capitals-extractive", *TEXT],
    "nback": ["--task", "nback"],
    "nback sequences": ["--task", "nback-sequence"],
    "ioi": ["--task", "ioi", *TEXT],
    "prompts": ["--prompts", "PROMPTS"],
    "repeat": ["--task", "repeat"],
    "text": ["--task", "text-stdlib"],
    "tree": ["--task", "tree-trained", "--task-option", "first_tree=256"],
    "icl": ["--task", "icl-trained", "--task-option", "test=64", "--task-option", "sequences=64",
            "--task-option", "max_pairs=12", "--task-option", "item_dim=39"],
}
KIND = {"nback sequences": "nback"}
OPTIONS = {"ffn-transplant": ["--source-items", "France", "--source-layer", "1"]}  # no FFN switch in a random model
CASES = [(p, k) for p, spec in PROBES.items() for k in KINDS if KIND.get(k, k) in spec.kinds]


def test_every_kind_a_probe_takes_is_covered():
    assert {k for spec in PROBES.values() for k in spec.kinds} <= {KIND.get(k, k) for k in KINDS}


@pytest.mark.parametrize("probe,kind", CASES, ids=[f"{p}-{k}" for p, k in CASES])
def test_small_inputs_end_in_a_table_or_one_line(probe, kind, capsys, tmp_path, request):
    model = {"tree": "tree_run", "icl": "icl_run"}.get(kind)
    model = str(request.getfixturevalue(model)) if model else "tiny-gpt2"
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,answer,argument\n" + "".join(f"{c}: {a} is in,Europe,{a}\n" for c, a in (
        ("France", "Paris"), ("Poland", "Warsaw"), ("Spain", "Madrid"), ("Italy", "Rome"))))
    task = [str(prompts) if a == "PROMPTS" else a for a in KINDS[kind]]
    for limit in (1, 2, 3, 4):
        out = tmp_path / str(limit)
        r = probe_here(capsys, "run", "--model", model, "--probe", probe, *task, *OPTIONS.get(probe, []),
                       "--limit", limit, "--output", out)  # a traceback fails the test here
        if r.returncode == 2:
            errors = [line for line in r.stderr.splitlines() if line.startswith("probe: error: ")]
            assert len(errors) == 1 and r.stderr.strip().endswith(errors[0]), r.stderr
            continue
        assert r.returncode == 0, r.stderr
        meta = json.loads((out / "meta.json").read_text())
        assert meta["status"] == "complete" and (out / "table.csv").exists()
        assert (out / "plot.png").exists() == (PROBES[probe].plot is not None)
