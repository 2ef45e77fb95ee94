"""Task kinds as registered units (probes/tasks/kinds.py): a kind defined here alone, in this file, loads from a task
file through the normal reader, gives its items and its activation-patching pairs, and is in the file reference;
the registry, the task-file reader and the reference agree on every kind."""

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar

import pytest

from probes import schema
from probes.errors import ProbeError
from probes.methods.patching import prepare_patching
from probes.tasks.base import Item, Task, paired
from probes.tasks.files import build_task, load_task
from probes.tasks.kinds import KINDS, kinds, register_kind


@dataclass
class Echo(Task):
    """Say a word back: one item per word; its corrupted twin asks for the next word, where that prompt has as many
    tokens."""

    SCHEMA: ClassVar[dict] = {"words": ("echo: the words said back", "[cat, dog]"),
                              "repeats": ("echo: times each word is said in the prompt", "2")}
    NONNEGATIVE: ClassVar[tuple] = ("repeats",)
    words: list = field(default_factory=list)
    repeats: int = 1

    @classmethod
    def check_file(cls, spec: dict, name: str) -> None:
        if len(spec["words"]) < 2:
            raise ProbeError(f"task {name!r}: {len(spec['words'])} words; accepted: 2 or more")

    def items(self, limit=None, inputs=None, shot_exclude=frozenset()):
        out = [Item(i, w, w, "Say " + " ".join([w] * self.repeats) + ":", f" {w}", "") for i, w in enumerate(self.words)]
        return out[:limit] if limit else out

    def corrupted_pairs(self, items, tokenizer):
        pool = self.items()
        out = []
        for it in items:
            other = pool[(it.index + 1) % len(pool)]
            if len(tokenizer(other.prompt).input_ids) == len(tokenizer(it.prompt).input_ids):
                out.append(paired(it, other.prompt, other.input, other.answer))
        return out


def words(text: str):
    """A tokenizer of one token per character run between spaces (enough for pairs to line up or not)."""
    return SimpleNamespace(input_ids=text.split())


@pytest.fixture
def echo():
    kinds()  # the built-in kinds registered first, so that they keep their order
    register_kind("echo", required=("words",))(Echo)
    yield
    KINDS.pop("echo")


def test_a_kind_defined_in_a_test_loads_from_a_task_file_and_pairs_its_items(echo, tmp_path):
    path = tmp_path / "echo-words.yaml"
    path.write_text("name: echo-words\nversion: 1\nkind: echo\nwords: [cat, dog, bird, big dog]\n")
    task = load_task(str(path), {"repeats": 2})
    assert isinstance(task, Echo) and task.repeats == 2
    items = task.items()
    assert [it.prompt for it in items] == ["Say cat cat:", "Say dog dog:", "Say bird bird:", "Say big dog big dog:"]
    loaded = SimpleNamespace(tokenizer=words, spec=SimpleNamespace(name="words"))
    pairs, _, meta = prepare_patching(loaded, task, items, {"direction": "noise"})
    assert [(it.input, it.extra["corrupted"], it.extra["corrupted_answer"]) for it in pairs] == [
        ("cat", "Say dog dog:", " dog"), ("dog", "Say bird bird:", " bird")]  # bird's twin is longer, big dog's too
    assert meta == {"pairs": 2, "unpaired": 2, "direction": "noise"}
    with pytest.raises(ProbeError, match="no item of task 'echo-words' has a corrupted partner of the same token "
                                         "length on words; accepted: a task with more items"):
        prepare_patching(loaded, task, items[2:], {})


def test_the_reader_checks_a_new_kind_as_any_other(echo):
    spec = {"name": "e", "version": 1, "kind": "echo"}
    with pytest.raises(ProbeError, match="missing field.s. words; an? echo task requires: words"):
        build_task(spec)
    with pytest.raises(ProbeError, match="e': words 'cat' is not a list"):
        build_task({**spec, "words": "cat"})
    with pytest.raises(ProbeError, match="repeats -1 is negative; accepted: an integer, 0 or more"):
        build_task({**spec, "words": ["a", "b"], "repeats": -1})
    with pytest.raises(ProbeError, match="1 words; accepted: 2 or more"):
        build_task({**spec, "words": ["a"]})
    with pytest.raises(ProbeError, match="unknown field.s. shots; accepted: name, .*, words, repeats"):
        build_task({**spec, "words": ["a", "b"], "shots": 1})
    with pytest.raises(ProbeError, match="kind 'echoes'; accepted: abstractive, .*, icl, echo$"):
        build_task({**spec, "kind": "echoes"})


def test_a_new_kind_is_in_the_file_reference_and_a_kind_without_pairs_says_so(echo):
    row = {r[0]: r for r in schema.task_rows()}["words"]
    assert row[1:] == ("echo", "list", "[]", "echo: the words said back", "[cat, dog]")
    assert schema.TASK_FIELDS["kind"][0].startswith("abstractive, extractive, nback, tree, ioi, repeat, text, icl, echo")
    plain = Task(name="plain", version=1, kind="plain")  # a kind that defines no pairs
    with pytest.raises(ProbeError, match="task 'plain' has no clean/corrupted pairs; accepted: a relational task"):
        prepare_patching(SimpleNamespace(tokenizer=words), plain, [], {})


def test_the_registry_the_reader_and_the_reference_agree_on_every_kind():
    known = kinds()
    assert list(known) == ["abstractive", "extractive", "nback", "tree", "ioi", "repeat", "text", "icl"]
    with pytest.raises(ProbeError, match="accepted: " + ", ".join(known) + "$"):
        build_task({"name": "x", "version": 1, "kind": "nothing"})
    rows = {r[0]: r for r in schema.task_rows()}
    described = schema.task_fields()
    for kind, k in known.items():
        assert issubclass(k.cls, Task) and set(k.required) <= {f.name for f in dataclasses.fields(k.cls)}
        for f in dataclasses.fields(k.cls):
            if f.init and f.name not in ("path", "overrides"):
                assert f.name in described, (kind, f.name)  # every field of every kind has a meaning...
                assert rows[f.name][1] == "all" or kind in rows[f.name][1].split(", ")  # ...and a row naming it
    assert schema.TASK_FIELDS["kind"][0] == ", ".join(known) + " (a prompts file has no task file)"
