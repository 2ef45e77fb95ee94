"""The file reference (docs/schema.md, `probe tasks --schema`) covers every field the validators accept."""

import dataclasses

from probes import schema
from probes.paths import ROOT
from probes.runs.sweep import KEYS
from probes.tasks.base import Task
from probes.tasks.kinds import kinds
from probes.tasks.prompts import COLUMNS, OPTIONS

from .test_cli import probe


def test_every_accepted_field_is_described_and_nothing_else():
    task_fields = {f.name for cls in {Task, *(k.cls for k in kinds().values())}  # every kind's
                   for f in dataclasses.fields(cls)
                   if f.init and f.name not in ("path", "overrides")}
    assert set(schema.TASK_FIELDS) == task_fields
    assert set(schema.SWEEP_FIELDS) == KEYS
    assert set(schema.TRAINING_FIELDS) == {"name", "model.architecture", *schema.training_fields()}
    assert {"task.nodes", "task.n", "train.min_lr"} <= set(schema.TRAINING_FIELDS)
    assert set(schema.PROMPT_COLUMNS) == set(COLUMNS) and set(schema.PROMPT_OPTIONS) == set(OPTIONS)


def test_docs_schema_is_the_generated_reference():
    assert (ROOT / "docs" / "schema.md").read_text() == schema.markdown(), \
        "regenerate it: python -m probes.schema > docs/schema.md"
    text = schema.markdown()
    assert "| context_items | abstractive, extractive | integer | 0 |" in text
    assert "| separator | abstractive, extractive, nback | text | '\\n' |" in text
    assert "| train.lr | number | 0.0001 |" in text and "| checkpoints |" in text
    assert "| task.train | integer | nback: 800, tree: 135000, icl: 9600000 |" in text


def test_probe_tasks_schema_prints_every_task_field():
    r = probe("tasks", "--schema")
    assert r.returncode == 0, r.stderr
    for name in schema.TASK_FIELDS:
        assert f"\n  {name} (" in r.stdout, name
    assert "context_items (integer; abstractive, extractive; default 0)" in r.stdout
