"""Task definitions: seeded prompts, shots, N-back sequences, tokenization on the bundled tokenizers, bad input."""

import re
import subprocess
import sys

import pytest

from probes.errors import ProbeError
from probes.tasks.files import available_tasks, build_task, load_task, parse_overrides
from probes.tasks.nback_trials import NBACK_LETTERS

from .test_cli import probe_here

RELATIONAL = [n for n in available_tasks() if load_task(n).kind in ("abstractive", "extractive")]


def test_every_task_file_loads_and_has_items():
    assert {"capitals", "capitals-plain", "capitals-extractive", "uppercase", "uppercase-plain",
            "uppercase-extractive", "past-tense", "past-tense-plain", "past-tense-extractive", "nback",
            "nback-sequence"} <= set(available_tasks())
    for name in available_tasks():
        task = load_task(name)
        assert task.items() and task.source and task.license


@pytest.mark.parametrize("name", RELATIONAL)
def test_seeded_prompts_are_reproducible_and_limit_does_not_change_them(name):
    a, b = load_task(name).items(), load_task(name).items()
    assert [i.prompt for i in a] == [i.prompt for i in b]
    assert [i.prompt for i in load_task(name).items(limit=5)] == [i.prompt for i in a[:5]]
    task = load_task(name)
    if task.shots or task.context_items > 1:  # something is drawn: another seed draws differently
        other = load_task(name, {"seed": 1}).items()
        assert sum(x.prompt != y.prompt for x, y in zip(a, other)) > len(a) // 2


@pytest.mark.parametrize("name", RELATIONAL)
def test_the_queried_item_is_never_its_own_shot(name):
    task = load_task(name)
    for item in task.items():
        query = task.template.format(input=item.input, output=item.output)
        worked = query + item.answer
        assert item.prompt.endswith(query)
        if task.kind == "abstractive":
            assert worked not in item.prompt and item.output not in item.prompt.replace(item.input, "")
            assert item.prompt.count(task.separator) >= task.shots
        else:  # extractive: the answer is stated in the context, exactly once
            fact = task.context.format(input=item.input, output=item.output)
            assert item.prompt.count(fact) == 1


def test_extractive_context_holds_the_fact_and_optional_distractors():
    item = load_task("capitals-extractive").items(inputs=["Poland"])[0]
    assert item.prompt == "The capital of Poland is Warsaw. The capital of Poland is"
    task = load_task("capitals-extractive", {"context_items": 3})
    positions = set()
    for item in task.items(limit=60):
        fact = f"The capital of {item.input} is {item.output}."
        assert item.prompt.count("The capital of ") == 4 and item.prompt.count(fact) == 1  # 3 facts + query
        positions.add(item.prompt[:item.prompt.index(fact)].count("The capital of "))
    assert positions == {0, 1, 2}  # the queried fact is not always in the same place


def test_past_tense_has_regular_and_irregular_groups_and_the_papers_format():
    items = load_task("past-tense").items()
    groups = {i.group for i in items}
    assert groups == {"regular", "irregular"}
    taught = next(i for i in items if i.input == "teach")
    assert taught.group == "irregular" and taught.answer == " taught"
    assert re.fullmatch(r"Today I \w+\. Yesterday I \w+\. Today I teach\. Yesterday I", taught.prompt)


@pytest.mark.parametrize("n", range(1, 7))
def test_nback_sequences_have_the_stated_matches_and_correct_labels(n):
    task = load_task("nback", {"n": n, "sequences": 6})
    for s in range(6):
        letters, labels = task.sequence(n, s)
        assert len(letters) == 24 and set(letters) <= set(NBACK_LETTERS) and len(set(NBACK_LETTERS)) == 20
        assert sum(labels) == 8
        assert labels == [t >= n and letters[t] == letters[t - n] for t in range(24)]
    items = task.items()
    assert len(items) == 6 * (24 - n)
    for item in items:
        letters, pos = item.extra["letters"], item.extra["position"]
        assert item.output == ("m" if letters[pos] == letters[pos - n] else "-")
        assert item.answer == (" m" if item.extra["match"] else " -")
        # the letters so far, each with its correct response, then the current letter
        shown = re.findall(r"Letter: (\w)\nResponse: ([m-])", item.prompt)
        assert "".join(c for c, _ in shown) == letters[:pos]
        assert [r == "m" for _, r in shown] == [t >= n and letters[t] == letters[t - n] for t in range(pos)]
        assert item.prompt.endswith(f"Letter: {letters[pos]}\nResponse:")
        assert f"{n}-back" in item.prompt


def test_nback_sequence_unit_gives_one_full_prompt_per_sequence():
    task = load_task("nback-sequence", {"n": [2, 3]})
    items = task.items()
    assert len(items) == 2 * task.sequences
    for item in items:
        assert item.extra["matches"] == 8 and item.prompt.count("Response: m") == 8
        assert item.prompt.count("Letter: ") == 24


def test_nback_generation_is_seeded():
    a = load_task("nback", {"n": 3}).sequence(3, 0)
    assert a == load_task("nback", {"n": 3}).sequence(3, 0)
    assert a != load_task("nback", {"n": 3, "seed": 5}).sequence(3, 0)


BASE = {"name": "t", "version": 1, "kind": "abstractive", "data": {"file": "data/world_capitals.csv",
        "input": "country", "output": "capital"}, "template": "{input}:"}


@pytest.mark.parametrize("change, message", [
    ({"template": None}, r"missing field\(s\) template; a abstractive task requires: template, data"),
    ({"template": "Capital of {country}:"}, r"template uses unknown variable \{country\}; accepted: \{input\}, \{output\}"),
    ({"kind": "generative"}, r"kind 'generative'; accepted: abstractive, extractive, nback"),
    ({"colour": "red"}, r"unknown field\(s\) colour"),
    ({"ambiguous": "ignore"}, r"ambiguous 'ignore'; accepted: drop, flag"),
])
def test_bad_task_definitions_are_refused(change, message):
    spec = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ProbeError, match=message):
        build_task(spec, path=load_task("capitals").path)


def test_empty_data_set_is_refused(tmp_path):
    (tmp_path / "empty.csv").write_text("country,capital\n")
    task = build_task({**BASE, "data": {"file": "empty.csv", "input": "country", "output": "capital"}},
                      path=tmp_path / "t.yaml")
    with pytest.raises(ProbeError, match="has no rows"):
        task.items()


@pytest.mark.parametrize("n", [0, 7, [2, 9]])
def test_nback_n_outside_the_supported_range_is_refused(n):
    with pytest.raises(ProbeError, match=r"N .* is outside the supported range; accepted: 1 to 6"):
        load_task("nback", {"n": n})


def test_bad_task_input_on_the_command_line_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nversion: 1\nkind: abstractive\ndata: {file: x.csv}\ntemplate: '{word}:'\n")
    for args, message in [(["--task", str(bad)], "unknown variable {word}"),
                          (["--task", "nback", "--task-option", "n=7"], "outside the supported range"),
                          (["--task", "nback", "--task-option", "n"], "bad --task-option 'n'")]:
        r = (subprocess.run([sys.executable, "-m", "probes", "run", "--model", "tiny-gpt2", *args],
                            capture_output=True, text=True, timeout=300) if "{word}" in message  # one as a process
             else probe_here(capsys, "run", "--model", "tiny-gpt2", *args))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_overrides_are_read_as_yaml():
    assert parse_overrides(["n=[1, 2]", "shots=3", "ambiguous=flag"]) == {"n": [1, 2], "shots": 3,
                                                                          "ambiguous": "flag"}
