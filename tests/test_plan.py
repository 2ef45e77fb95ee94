"""The run plan (runs/plan.py) and the probes' declarations (methods/catalog.py, methods/option_types.py): options
resolved once per run whichever way a run is started, checks that need no weights made before loading, a probe
added by its own functions and one registration, and the package's shape (no import circle, no module too long)."""

import ast
import dataclasses
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import probes
from probes.errors import ProbeError
from probes.methods import catalog, option_types
from probes.tasks.files import load_task

from .conftest import ROOT, loaded
from .test_cli import probe_here


@pytest.fixture
def parses(monkeypatch):
    """Counts, per option, how often a value is parsed (once per resolution of a run's options) and how often
    a model's load options are resolved."""
    calls = {"load_options": 0}
    for name, o in option_types.OPTIONS.items():
        def counted(value, _parse=o.parse, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _parse(value)
        monkeypatch.setitem(option_types.OPTIONS, name, dataclasses.replace(o, parse=counted))
    from probes.models import loading, options

    real = options.load_options

    def load_options(*args, **kwargs):
        calls["load_options"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(options, "load_options", load_options)
    monkeypatch.setattr(loading, "load_options", load_options)
    return calls


def test_a_command_line_run_resolves_its_options_and_load_options_once(tmp_path, capsys, parses):
    r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--task", "capitals", "--task-option",
                                "ambiguous=flag", "--limit", "3", "--topk", "3", "--output", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert parses["topk"] == 1 and parses["load_options"] == 1, parses
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["config"]["options"] == {"topk": 3}


def test_an_api_run_and_a_sweep_resolve_options_once_per_run(tmp_path, capsys, parses):
    task, model = load_task("capitals", {"ambiguous": "flag"}), loaded("tiny-gpt2")
    parses.update({"load_options": 0})  # the session's first load of the model, if it was, is not this run's
    probes.run(model, task, "logit-lens", limit=2, topk=2)
    assert parses["topk"] == 1 and parses["load_options"] == 0, parses  # a loaded model: nothing to resolve
    parses.clear()
    parses["load_options"] = 0
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"models": ["tiny-gpt2"], "tasks": ["capitals"], "probes": ["logit-lens"],
                                     "seeds": [0, 1], "limit": 2, "options": {"topk": 2},
                                     "task_options": {"ambiguous": "flag"}, "results": "results"}))
    r = probe_here(capsys, "sweep", sweep, "--quiet")
    assert r.returncode == 0, r.stderr
    assert parses["topk"] == 2 and parses["load_options"] == 1, parses  # two units, one plan each; one model


def test_checks_that_need_no_weights_come_before_loading(tmp_path, monkeypatch):
    """Positions the task does not name, and patching sites, are refused by the plan: no model is loaded."""
    from probes.runs import execution

    monkeypatch.setattr(execution, "load_for", lambda plan: pytest.fail("loaded a model for a plan it refuses"))
    tree = load_task("tree-trained", {"trees": 4})
    capitals = load_task("capitals")
    for task, probe, options, shown in (
            (tree, "activation-patching", {"positions": "registers"},
             "unknown patching position 'registers'; accepted: all, whole, last, argument, bar"),
            (tree, "linear-probe", {"position": "middle"}, "unknown probe position 'middle'; accepted: last, argument, bar"),
            (capitals, "activation-patching", {"sites": "heads"}, "unknown patching site 'heads'"),
            (capitals, "activation-patching", {"positions": "1:2:3"}, "bad patching --positions '1:2:3'; accepted: last, all, whole"),
            (capitals, "ffn-transplant", {"positions": "first"}, "bad transplant --positions 'first'"),
            (capitals, "logit-lens", {"positions": "whole"}, "bad lens --positions 'whole'"),
            (capitals, "ffn-ablation", {"layers": "3-1"}, "bad --layers '3-1'"),
            (capitals, "ffn-ablation", {"how": "scramble"}, "unknown ablation 'scramble'")):
        with pytest.raises(ProbeError, match=shown.replace("(", "\\(")):
            probes.run("tiny-gpt2", task, probe, **options)


def test_what_needs_no_weights_is_refused_by_the_plan(monkeypatch):
    """Checks once made after loading (or never), now made by the plan: a --layers name only ffn-ablation takes,
    option values of a type the option does not take (from the API or a sweep file), a position only some items
    name (a tree's edge_up4, which short paths lack: the run stopped at the first such item after writing the
    batches before it), options that exclude or need each other, an early token after the late one."""
    from probes.runs import execution

    monkeypatch.setattr(execution, "load_for", lambda plan: pytest.fail("loaded a model for a plan it refuses"))
    tree = load_task("tree-trained", {"trees": 4})
    capitals, text = load_task("capitals"), load_task("text-stdlib")
    short = next(it for it in tree.items() if "edge_up4" not in it.positions)
    for task, probe, options, shown in (
            *((capitals, p, {"layers": "sixths"}, "bad --layers 'sixths'; accepted: 'all', a block")
              for p in ("activation-patching", "attribution-patching", "ffn-transplant")),
            (capitals, "ffn-ablation", {"layers": 2.5}, "bad --layers 2.5; accepted"),
            (capitals, "ffn-ablation", {"layers": True}, "bad --layers True; accepted"),
            (capitals, "activation-patching", {"sites": 3}, "bad patching site 3; accepted: resid, attn, ffn, head"),
            (capitals, "linear-probe", {"label": 5}, "bad probe label 5; accepted"),
            (capitals, "linear-probe", {"position": ["last", ["argument"]]}, "bad --position"),
            (capitals, "ffn-transplant", {"source_items": [1, 2], "source_layer": 0}, "bad source_items"),
            (capitals, "ffn-transplant", {"scales": [True]}, "bad --scales"),
            (tree, "activation-patching", {"positions": "goal,edge_up4"},
             f"patching position 'edge_up4' is not named by item {short.index} "),
            (tree, "linear-probe", {"position": "edge_up4"}, f"probe position 'edge_up4' is not named by item "
                                                             f"{short.index} "),
            (capitals, "ffn-transplant", {"source_items": "Poland", "sources": 2, "source_layer": 1},
             "--sources counts the source items the probe picks itself"),
            (capitals, "ffn-transplant", {"source_items": "Poland"}, "--source-items needs --source-layer"),
            (capitals, "ffn-transplant", {"source_items": "Atlantis", "source_layer": 1},
             "unknown source item 'Atlantis' of task 'capitals'"),
            (text, "icl-score", {"early": 100, "late": 60}, "--early 100 is not before --late 60")):
        with pytest.raises(ProbeError, match=re.escape(shown)) as e:
            probes.run("tiny-gpt2", task, probe, **options)
        assert "\n" not in str(e.value)


def test_a_list_in_the_api_or_a_sweep_file_means_what_the_command_lines_text_does():
    """linear-probe's --position as a list became names like "['last'"; every list-valued option takes a list of
    names (or indices) and records it as the text the command line gives."""
    task = load_task("past-tense", {"ambiguous": "flag"})
    listed = probes.run(loaded("tiny-gpt2"), task, "linear-probe", limit=4, position=["last", 0], label=["group"],
                        self_check=False)
    assert list(dict.fromkeys(listed.table.position)) == ["last", "0"]
    chosen = catalog.probe_options("linear-probe", {"position": ["last", 0], "label": ["group", "answer"]})
    assert chosen["position"] == "last,0" and chosen["label"] == "group,answer"
    assert catalog.probe_options("activation-patching", {"layers": [0, "2-3"], "positions": [-1]})["layers"] == "0,2-3"


def test_one_grammar_of_positions_for_every_probe_that_takes_them():
    from probes.methods.lens import positions_of
    from probes.methods.positions import resolve_positions
    from probes.tasks.base import Item

    it = Item(index=0, input="x", output="f", prompt="a b c d e", answer="f", argument="c")
    assert positions_of("-2:,0", 5, it) == [0, 3, 4]  # the lens: slices and indices mixed, ascending
    assert resolve_positions("-2:,0", 5, {}) == [3, 4, 0]  # patching: the same tokens, each patched on its own
    assert resolve_positions("whole,last", 5, {}) == [4, slice(None)]


def test_a_probe_is_its_functions_and_one_registration(tmp_path, capsys, monkeypatch):
    """A toy probe with an option of its own: the command's flag, the API's keyword, the sweep file's key and
    validation all come from its declaration."""
    option = option_types.Option("multiple", "toy: scale of the answer's rank", option_types.count("multiple", 1),
                                 least=1)
    monkeypatch.setitem(option_types.OPTIONS, "multiple", option)

    def run(loaded, items, multiple=1):
        return [{"item": it.index, "input": it.input, "chars": len(it.prompt),
                 "score": multiple * len(it.prompt)} for it in items]

    toy = catalog.Probe("toy", "prompt length times a multiple", run,
                        lambda df, seed=0: {"mean": float(df.score.mean())},
                        lambda df, summary: f"mean score {summary['mean']:.1f}", options={"multiple": 2},
                        run_options=("multiple",))
    monkeypatch.delitem(catalog.PROBES, "toy", raising=False)
    catalog.register(toy)
    try:
        task = load_task("capitals", {"ambiguous": "flag"})
        by_api = probes.run(loaded("tiny-gpt2"), task, "toy", limit=2, multiple=3)
        assert by_api.report.startswith("mean score") and by_api.summary["scored_items"] == 2
        r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--task", "capitals", "--task-option",
                                    "ambiguous=flag", "--limit", "2", "--probe", "toy", "--multiple", "3",
                                    "--output", tmp_path / "toy", "--no-self-check")
        assert r.returncode == 0, r.stderr
        by_cli = pd.read_csv(tmp_path / "toy" / "table.csv")
        assert by_cli.score.tolist() == by_api.table.score.tolist() == (3 * by_api.table.chars).tolist()
        meta = json.loads((tmp_path / "toy" / "meta.json").read_text())
        assert meta["config"]["options"] == {"multiple": 3}
        r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--task", "capitals", "--probe", "toy",
                                    "--multiple", "0")
        assert r.returncode == 2 and "--multiple: '0' is not an integer of at least 1" in r.stderr
        with pytest.raises(ProbeError, match="bad multiple 'x'; accepted: an integer of at least 1"):
            probes.run(loaded("tiny-gpt2"), task, "toy", multiple="x")
        with pytest.raises(ProbeError, match="probe 'toy' takes no option 'topk'; accepted: multiple"):
            probes.run(loaded("tiny-gpt2"), task, "toy", topk=2)
    finally:
        catalog.PROBES.pop("toy", None)


def test_the_command_line_lists_probes_and_options_without_importing_them():
    """Probes register without torch: the catalog names their functions and imports them when they run."""
    import subprocess

    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "probes", "run", "--help"], capture_output=True,
                       text=True, check=True)
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "probes.methods.catalog" in imported and "--multiple" not in r.stdout and "--topk" in r.stdout
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers", "nnsight")
                or m.startswith("probes.methods.") and m.split(".")[-1] not in ("catalog", "option_types", "positions")}


def _imports(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (at the top or inside functions)."""
    mods = {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
            for f in (root / "probes").rglob("*.py")}
    graph = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    whole = f"{target}.{alias.name}"
                    found.add(whole if whole in mods else target)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m in mods and m not in (name, "probes")}
    return graph


def test_no_import_circle_and_no_module_too_long():
    graph = _imports(ROOT)
    state, circles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / "probes").rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 500}
    assert not long, long


def test_every_option_is_in_the_help_the_api_docstring_and_the_file_reference():
    from probes.cli import build_parser

    run_help = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]
    flags = {s for action in run_help._actions for s in action.option_strings}
    docs = (ROOT / "docs" / "schema.md").read_text()
    for o in option_types.OPTIONS.values():
        assert o.cli in flags and f"    {o.name} ({o.cli}): " in probes.run.__doc__ and f"| {o.name} | `{o.cli}` |" in docs


def test_several_tasks_are_compared_as_their_probe_says(tmp_path, capsys, monkeypatch):
    """ffn-ablation over an abstractive and an extractive task: the table side by side, the difference of their
    relative drops per variant, and the plot beside the model's runs (the probe's `compare`, not a name test)."""
    import probes.cli

    monkeypatch.setattr(probes.cli, "RESULTS", tmp_path)
    r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--task", "capitals,capitals-extractive", "--probe",
                   "ffn-ablation", "--task-option", "ambiguous=flag", "--limit", "3", "--layers", "1")
    assert r.returncode == 0, r.stderr
    assert "accuracy by FFN blocks removed" in r.stdout
    assert "relative drop of capitals minus that of capitals-extractive" in r.stdout
    assert (tmp_path / "tiny-gpt2" / "ablation-capitals+capitals-extractive.png").exists()
    assert catalog.PROBES["ffn-ablation"].compare is not None and catalog.PROBES["logit-lens"].compare is None
