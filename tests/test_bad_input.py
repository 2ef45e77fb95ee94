"""A battery of bad input across every subcommand and file kind: each gives exit status 2, one line
("probe: error: ..." naming the bad value), and no traceback. Run in-process (fast); parsing happens before any
model loads, except for the option values only a loaded model can judge (layers against its blocks)."""

import json
from pathlib import Path

import yaml

from probes.cli import main

TASKS = Path(__file__).resolve().parent.parent / "tasks"
PAPER = TASKS.parent / "configs" / "training" / "nback-paper.yaml"
PROGRESS = ("loading ", "loaded in ", "self-check: ")  # what may precede an error found after loading


def run_case(capsys, argv, env=None, monkeypatch=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def cases(tmp: Path) -> list[tuple[list, str]]:
    """(argv, a text the error must contain) for each bad input."""
    tiny = ["--model", "tiny-gpt2", "--task", "capitals"]
    run = ["run", *tiny]
    out = []
    # --- run: option values ---------------------------------------------------------------------------------
    for opt, values in {"--topk": ["0", "-1", "abc", "1.5"], "--limit": ["0", "-1", "abc", "2.5"],
                        "--sources": ["0", "-3", "x"], "--source-layer": ["-1", "x", "1.5"],
                        "--gpus": ["-1", "two", "0.5"], "--ci": ["0", "1", "2", "abc", "-0.5"],
                        "--batch-size": ["0", "-2", "abc", "1.5"]}.items():
        out += [([*run, opt, v], v) for v in values]
    out += [([*run, "--dtype", v], v) for v in ("float8", "int4", "fp32")]
    out += [([*run, "--quantize", v], v) for v in ("3bit", "16bit", "nf4")]
    out += [([*run, "--device-map", v], v) for v in ("everywhere", "gpu")]
    out += [([*run, "--compute-dtype", v], v) for v in ("float64",)]
    out += [([*run, "--max-memory", v], v.split("=")[-1] if "=" in v else v)
            for v in ("cpu=lots", "0=", "nonsense", "tpu=10GiB")]
    out += [(["run", "--model", m, "--task", "capitals"], m) for m in ("gpt-17", "tiny-nothing", "no/such/folder")]
    out += [(["run", "--model", "tiny-gpt2", "--task", t], t) for t in ("capitols", "nback-2", "x.yaml")]
    out += [([*run, "--probe", p], p) for p in ("x-ray", "lens", "ablation")]
    not_taken = {"accuracy": ["--topk", "3"], "logit-lens": ["--layers", "1"], "nback": ["--scales", "2"],
                 "attention": ["--mode", "add"], "ffn-readout": ["--sources", "2"], "ffn-ablation": ["--topk", "2"],
                 "ffn-transplant": ["--ablation", "zero"]}
    for probe, opt in not_taken.items():
        out.append(([*run, "--probe", probe, *opt], opt[0].lstrip("-").replace("-", "_").replace("ablation", "how")))
        out.append(([*run, "--probe", probe, "--no-controls"] if probe != "ffn-transplant" else
                    [*run, "--probe", probe, "--topk", "4"], "controls" if probe != "ffn-transplant" else "topk"))
    # --- run: task options ------------------------------------------------------------------------------------
    for opt, shown in (("seed=abc", "abc"), ("shots=three", "three"), ("shots=-1", "-1"), ("noequals", "noequals"),
                       ("=3", "=3"), ("colour=red", "colour"), ("ambiguous=maybe", "maybe"), ("kind=weird", "weird"),
                       ("template=", "template"), ("answer=", "answer"), ("shots=1.5", "1.5"),
                       ("template={country}", "country"), ("data=x", "data"), ("version=new", "new")):
        out.append(([*run, "--task-option", opt], shown))
    for opt, shown in (("n=9", "9"), ("n=x", "x"), ("n=[1, 0]", "0"), ("unit=word", "word"), ("matches=30", "30"),
                       ("sequences=-1", "-1"), ("letters=5", "letters")):
        out.append((["run", "--model", "tiny-gpt2", "--task", "nback", "--probe", "nback", "--task-option", opt], shown))
    # --- run: output folders ------------------------------------------------------------------------------------
    (tmp / "afile").write_text("x")
    (tmp / "thesis").mkdir()
    (tmp / "thesis" / "ch1.tex").write_text("x")
    out += [([*run, "--output", tmp / "afile"], "afile"), ([*run, "--output", tmp / "thesis", "--overwrite"], "ch1.tex"),
            ([*run, "--task", "capitals,past-tense", "--output", tmp / "o"], "--output")]
    # --- run: option values a loaded model judges -------------------------------------------------------------
    abl = [*run, "--task-option", "ambiguous=flag", "--limit", "2", "--probe", "ffn-ablation", "--output", tmp / "a"]
    out += [([*abl, "--layers", v], v) for v in ("abc", "1-0", "99", "0,x")]
    out += [([*abl, "--ablation", "scramble"], "scramble")]
    tr = [*run, "--task-option", "ambiguous=flag", "--limit", "3", "--probe", "ffn-transplant", "--source-items",
          "Abkhazia", "--source-layer", "1", "--output", tmp / "t"]
    out += [([*tr, "--scales", "abc"], "abc"), ([*tr, "--mode", "swap"], "swap"), ([*tr, "--positions", "first"], "first"),
            ([*tr, "--context", "novel"], "novel"), ([*tr, "--scales", "1,nan"], "nan"),
            ([*run, "--task-option", "ambiguous=flag", "--probe", "ffn-transplant", "--source-items", "Atlantis",
              "--output", tmp / "atlantis"], "Atlantis")]
    # --- model configs and folders ------------------------------------------------------------------------------
    for name, content, shown in (("list.json", [1, 2], "model_type"), ("none.json", {"n_layer": 2}, "model_type"),
                                 ("alien.json", {"model_type": "alien"}, "alien"),
                                 ("heads.json", {"model_type": "gpt2", "n_embd": 30, "n_head": 4}, "'heads'"),
                                 ("badkey.yaml", "model_type: [gpt2", "badkey.yaml")):
        f = tmp / name
        f.write_text(content if isinstance(content, str) else json.dumps(content))
        out.append((["run", "--model", f, "--task", "capitals"], shown))
    for folder, files in (("noweights", {"config.json": '{"model_type": "gpt2"}'}), ("garbage", {"config.json": "{x"}),
                          ("noconfig", {"README": "x"})):
        (tmp / folder).mkdir()
        for fname, text in files.items():
            (tmp / folder / fname).write_text(text)
        out.append((["run", "--model", tmp / folder, "--task", "capitals"], folder))
    # --- task files ---------------------------------------------------------------------------------------------
    base = yaml.safe_load((TASKS / "capitals.yaml").read_text())
    base["data"]["file"] = str(TASKS / "data" / base["data"]["file"].split("/")[-1])
    (tmp / "empty.csv").write_text("country,capital\nPoland,Warsaw\nFrance,\n")
    (tmp / "data.txt").write_text("x")
    for name, change, shown in (
            ("noname", {"name": None}, "name"), ("kind", {"kind": "poetic"}, "poetic"),
            ("extra", {"colour": "red"}, "colour"), ("datastr", {"data": "capitals.csv"}, "data"),
            ("var", {"template": "{country}"}, "country"), ("empty", {"data": {"file": str(tmp / "empty.csv"),
                                                                              "input": "country", "output": "capital"}},
                                                          "row 3"),
            ("missing", {"data": {"file": str(tmp / "gone.csv")}}, "gone.csv"),
            ("ext", {"data": {"file": str(tmp / "data.txt")}}, "data.txt"),
            ("shots", {"shots": "three"}, "three"), ("column", {"data": {**base["data"], "input": "nation"}}, "nation"),
            ("brace", {"template": "{input"}, "template")):
        spec = {**base, **change}
        spec = {k: v for k, v in spec.items() if v is not None}
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        out.append((["run", "--model", "tiny-gpt2", "--task", tmp / f"{name}.yaml"], shown))
    (tmp / "bad.yaml").write_text("name: [unclosed\n")
    out.append((["run", "--model", "tiny-gpt2", "--task", tmp / "bad.yaml"], "bad.yaml"))
    (tmp / "list.yaml").write_text("- a\n- b\n")
    out.append((["run", "--model", "tiny-gpt2", "--task", tmp / "list.yaml"], "list.yaml"))
    # --- prompt, tasks, plan ------------------------------------------------------------------------------------
    out += [(["prompt", "--task", "capitals", "--model", "tiny-gpt2", "--index", v], v) for v in ("-1", "99999", "abc")]
    out += [(["prompt", "--task", "capitols", "--model", "tiny-gpt2"], "capitols"),
            (["prompt", "--task", "capitals", "--model", "gpt-17"], "gpt-17"),
            (["prompt", "--task", "capitals", "--model", "tiny-gpt2", "--task-option", "shots=x"], "x"),
            (["tasks", "--model", "gpt-17"], "gpt-17")]
    plan = ["plan", "--model", "gpt2"]
    out += [([*plan, "--batch-size", v], v) for v in ("0", "abc")]
    out += [([*plan, "--seq-len", "0"], "0"), ([*plan, "--gpus", "-1"], "-1"), ([*plan, "--gpu-mem", "lots"], "lots"),
            ([*plan, "--quantize", "3bit"], "3bit"), ([*plan, "--dtype", "float8"], "float8"),
            (["plan", "--model", "gpt-17"], "gpt-17"), (["plan", "--model", "bloom-176b", "--gpus", "1"], "--gpus 1"),
            (["plan", "--model", "gpt-j-6b", "--gpu-mem", "1GiB"], "1GiB")]
    # --- sweep and status files ----------------------------------------------------------------------------------
    good = {"name": "s", "models": ["tiny-gpt2"], "tasks": ["capitals"], "probes": ["accuracy"]}
    for name, change, shown in (
            ("unknown", {"colour": 1}, "colour"), ("models", {"models": 3}, "models"), ("limit0", {"limit": 0}, "limit"),
            ("limitx", {"limit": "x"}, "x"), ("seeds", {"seeds": ["a"]}, "a"), ("options", {"options": [1]}, "options"),
            ("option", {"options": {"colour": 1}}, "colour"), ("probe", {"probes": ["x-ray"]}, "x-ray"),
            ("model", {"models": ["gpt-17"]}, "gpt-17"), ("task", {"tasks": ["capitols"]}, "capitols"),
            ("slurm", {"slurm": {"colour": 1}}, "colour"), ("batch", {"batch_size": "lots"}, "lots"),
            ("name", {"name": ["a"]}, "name"), ("load", {"load": {"dtype": "float8"}}, "float8"),
            ("results", {"results": "afile"}, "afile"), ("empty", {"tasks": []}, "tasks"),
            ("taskopt", {"task_options": {"shots": "x"}}, "x"), ("loadkey", {"load": {"colour": 1}}, "colour"),
            # training units and checkpoints
            ("trainkey", {"train": {"configs": [str(PAPER)], "colour": 1}}, "colour"),
            ("trainnone", {"train": {"configs": []}}, "configs"), ("trainfile", {"train": {"configs": ["nope.yaml"]}}, "nope.yaml"),
            ("trainset", {"train": {"configs": [str(PAPER)], "set": [1]}}, "set"),
            ("trainfield", {"train": {"configs": [str(PAPER)], "set": {"colour.n": [1]}}}, "colour.n"),
            ("trainseeds", {"train": {"configs": [str(PAPER)], "seeds": ["a"]}}, "a"),
            ("train", {"train": [str(PAPER)]}, "train"), ("ckpt", {"checkpoints": "some"}, "some"),
            ("template", {"task_options": {"n": "{task.n}"}}, "{task.n}"),
            ("templatefield", {"train": {"configs": [str(PAPER)]}, "models": [], "tasks": ["nback-trained"],
                               "task_options": {"n": ["{task.colour}"]}}, "{task.colour}"),
            ("pairs", {"probes": {"accuracy": ["capitals"]}}, "tasks"), ("glob", {"models": ["nowhere/checkpoint-*"]}, "checkpoint-*")):
        (tmp / f"sw-{name}.yaml").write_text(yaml.safe_dump({**good, **change}))
        out.append((["sweep", tmp / f"sw-{name}.yaml"], shown))
    out += [(["status", tmp / f"sw-{n}.yaml"], s) for n, s in (("probe", "x-ray"), ("models", "models"),
                                                                ("seeds", "a"), ("limit0", "limit"))]
    out += [(["sweep", tmp / "nothing.yaml"], "nothing.yaml"), (["status", tmp / "nothing.yaml"], "nothing.yaml"),
            (["sweep", tmp / "bad.yaml"], "bad.yaml"), (["sweep", tmp / "list.yaml"], "list.yaml"),
            (["sweep", tmp / "sw-unknown.yaml", "--unit", "x/y/z"], "colour")]
    (tmp / "sw-good.yaml").write_text(yaml.safe_dump(good))
    out.append((["sweep", tmp / "sw-good.yaml", "--executor", "kubernetes"], "kubernetes"))
    out += [(["sweep", tmp / "sw-good.yaml", "--unit", "nope/capitals/accuracy"], "nope"),
            (["sweep", tmp / "sw-good.yaml", "--executor", "bogus"], "bogus")]
    for name, slurm, shown in (("part", {"partition": "gpu\ntouch X"}, "partition"), ("time", {"time": "1 h"}, "1 h"),
                               ("extra", {"extra": ["--x y"]}, "--x y")):
        (tmp / f"sl-{name}.yaml").write_text(yaml.safe_dump({**good, "slurm": {"gpus": 0, **slurm}}))
        out.append((["sweep", tmp / f"sl-{name}.yaml", "--executor", "slurm", "--dry-run"], shown))
    # --- aggregate and report -------------------------------------------------------------------------------------
    out += [(["aggregate", tmp / "no-results"], "no-results"), (["aggregate", tmp, "--by", "colour"], "colour"),
            (["aggregate", tmp, "--ci", "7"], "7"), (["report", tmp / "no-results"], "no-results"),
            (["report", tmp, "--by", "colour"], "colour"), (["report", tmp, "--ci", "x"], "x"),
            (["aggregate", tmp / "no-results", "--out", tmp / "afile"], "no-results")]
    # --- the command itself --------------------------------------------------------------------------------------
    out += [(["frobnicate"], "frobnicate"), (["run", "--model", "tiny-gpt2"], "--task"), ([*run, "--bogus"], "--bogus"),
            (["plan"], "--model"), (["prompt", "--task", "capitals"], "--model")]
    return out


def test_every_bad_input_is_one_line_exit_2_naming_the_value(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROBE_RESULTS", str(tmp_path / "results"))
    all_cases = cases(tmp_path)
    assert len(all_cases) >= 150, len(all_cases)
    failures = []
    for argv, shown in all_cases:
        code, out, err = run_case(capsys, argv)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(PROGRESS) and "prompt/s" not in ln]
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("probe: error: ") and "Traceback" not in err
              and shown.lower() in lines[0].lower())
        if not ok:
            failures.append(f"{' '.join(map(str, argv))!r}: exit {code}: {err.strip()[-300:]!r}")
    assert not failures, f"{len(failures)} of {len(all_cases)}:\n" + "\n".join(failures)
    assert not (tmp_path / "atlantis").exists()  # refused by the plan, before loading: no run folder left behind


def test_the_registry_file_is_validated_field_by_field(tmp_path, capsys, monkeypatch):
    bad = {"notmapping": "- a\n", "nomodels": "x: 1\n", "entry": "models:\n  m: 3\n",
           "field": "models:\n  m: {repo: a/b, family: gpt2, colour: red}\n",
           "dtype": "models:\n  m: {repo: a/b, family: gpt2, dtype: float8}\n",
           "quantize": "models:\n  m: {repo: a/b, family: gpt2, load: {quantize: 3bit}}\n",
           "params": "models:\n  m: {repo: a/b, family: gpt2, params: lots}\n",
           "repo": "models:\n  m: {family: gpt2}\n", "yaml": "models: [\n"}
    shown = {"notmapping": "models", "nomodels": "models", "entry": "mapping", "field": "colour", "dtype": "float8",
             "quantize": "3bit", "params": "lots", "repo": "repo", "yaml": "registry"}
    for name, text in bad.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(text)
        code, out, err = run_case(capsys, ["models"], {"PROBE_REGISTRY": str(f)}, monkeypatch)
        assert code == 2 and err.count("\n") == 1 and shown[name] in err and "Traceback" not in err, (name, err)


def kinds(tmp: Path) -> list[tuple[list, str]]:
    """The kinds of bad input that once ended in a traceback or a misleading success, several values each:
    option values out of range (from the command, a sweep file), mistyped values in files (a random model's config,
    a sweep's slurm section), pickled checkpoint weights, damaged results."""
    run = ["run", "--model", "tiny-gpt2", "--task", "capitals", "--task-option", "ambiguous=flag", "--limit", "2",
           "--output", tmp / "never"]
    out = [([*run, "--probe", p, "--topk", v], v) for p in ("logit-lens", "ffn-readout") for v in ("1025", "99999")]
    out += [([*run, "--probe", "ffn-transplant", "--source-items", "Abkhazia", "--source-layer", v], v)
            for v in ("2", "40")]
    good = {"name": "s", "models": ["tiny-gpt2"], "tasks": ["capitals"], "probes": ["logit-lens"], "limit": 2}
    for i, (option, value) in enumerate((("topk", 0), ("topk", -1), ("topk", "x"), ("topk", 1.5), ("topk", True),
                                         ("sources", 0), ("early", 0), ("late", "late"), ("source_layer", -1))):
        probes = ["logit-lens"] if option == "topk" else ["ffn-transplant"] if "source" in option else ["icl-score"]
        tasks = ["text-stdlib"] if probes == ["icl-score"] else ["capitals"]
        (tmp / f"opt{i}.yaml").write_text(yaml.safe_dump({**good, "probes": probes, "tasks": tasks,
                                                          "options": {option: value}}))
        out.append((["sweep", tmp / f"opt{i}.yaml"], option))
    for i, (key, value) in enumerate((("gpus", "many"), ("gpus", -1), ("gpus", 1.5), ("cpus_per_task", 0),
                                      ("cpus_per_task", "four"))):
        (tmp / f"slurm{i}.yaml").write_text(yaml.safe_dump({**good, "slurm": {key: value}}))
        out.append((["sweep", tmp / f"slurm{i}.yaml", "--executor", "slurm", "--dry-run"], key))
    for i, (field, value) in enumerate((("n_layer", "two"), ("n_embd", 1.5), ("layer_norm_epsilon", "small"),
                                        ("n_head", 0), ("vocab_size", -5), ("n_positions", "many"))):
        (tmp / f"config{i}.yaml").write_text(yaml.safe_dump({"model_type": "gpt2", "n_layer": 2, "n_embd": 32,
                                                             "n_head": 2, field: value}))
        out.append((["run", "--model", tmp / f"config{i}.yaml", "--task", "capitals"], field))
    standard = TASKS.parent / "configs" / "training" / "nback-standard.yaml"
    out += [(["train", standard, "--set", f"model.{field}={value}", "--output", tmp / "never"], field)
            for field, value in (("n_layer", "two"), ("n_embd", "1.5"), ("layer_norm_epsilon", "tiny"))]
    for name in ("pytorch_model.bin", "model.pt", "weights.ckpt"):
        folder = tmp / f"pickled-{name}"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "gpt2"}')
        (folder / name).write_bytes(b"\x80\x04not really")
        out.append((["run", "--model", folder, "--task", "capitals"], name))
    good_meta = {"config": {"model": "m", "task": "t", "probe": "accuracy"}, "status": "complete", "summary": {}}
    for name, text in (("list", "[1, 2]"), ("truncated", json.dumps(good_meta)[:40]), ("empty", ""),
                       ("nokeys", json.dumps({"status": "complete", "config": {}})),
                       ("summary", json.dumps({**good_meta, "summary": "fine"})),
                       ("configlist", json.dumps({**good_meta, "config": [1]})),
                       ("probeint", json.dumps({**good_meta, "config": {**good_meta["config"], "probe": 3}})),
                       ("probename", json.dumps({**good_meta, "config": {**good_meta["config"], "probe": "x-ray"}}))):
        folder = tmp / f"damaged-{name}" / "m" / "t" / "accuracy"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(text)
        out += [([cmd, tmp / f"damaged-{name}"], "skipped") for cmd in ("aggregate", "report")]
    return out


def test_each_kind_of_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROBE_RESULTS", str(tmp_path / "results"))
    failures = []
    all_cases = kinds(tmp_path)
    for argv, shown in all_cases:
        code, out, err = run_case(capsys, argv)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(PROGRESS) and "prompt/s" not in ln
                 and not ln.startswith("skipped ")]
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("probe: error: ") and "Traceback" not in err
              and shown.lower() in lines[0].lower())
        if not ok:
            failures.append(f"{' '.join(map(str, argv))!r}: exit {code}: {err.strip()[-300:]!r}")
    assert not failures, f"{len(failures)} of {len(all_cases)}:\n" + "\n".join(failures)
    assert not (tmp_path / "never").exists()


def test_valid_controls_of_those_kinds_still_succeed(tmp_path, capsys, monkeypatch):
    """The same paths with good values: a damaged run beside a good one is skipped and named, not fatal."""
    monkeypatch.setenv("PROBE_RESULTS", str(tmp_path / "results"))
    base = ["--task", "capitals", "--task-option", "ambiguous=flag", "--limit", "2"]
    code, out, err = run_case(capsys, ["run", "--model", "tiny-gpt2", *base, "--topk", "1024", "--output",
                                       tmp_path / "results" / "a"])
    assert code == 0, err
    (tmp_path / "config.yaml").write_text("model_type: gpt2\nn_layer: 2\nn_embd: 32\nn_head: 2\n"
                                          "layer_norm_epsilon: 1e-05\n")
    code, out, err = run_case(capsys, ["run", "--model", tmp_path / "config.yaml", *base, "--output",
                                       tmp_path / "results" / "b"])
    assert code == 0, err
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", "models": ["tiny-gpt2"], "tasks": ["capitals"],
                                                         "probes": ["logit-lens"], "limit": 2, "options": {"topk": "3"},
                                                         "slurm": {"gpus": 0, "cpus_per_task": "2"}}))
    code, out, err = run_case(capsys, ["sweep", tmp_path / "sweep.yaml", "--executor", "slurm", "--dry-run"])
    assert code == 0, err
    damaged = tmp_path / "results" / "c"
    damaged.mkdir()
    (damaged / "meta.json").write_text("[1, 2]")
    for cmd in ("aggregate", "report"):
        code, out, err = run_case(capsys, [cmd, tmp_path / "results"])
        assert code == 0, err
        assert f"skipped {damaged}: meta.json is not a run's metadata (a JSON list)" in err


def test_option_values_judged_without_weights_are_refused_before_loading_in_one_line(tmp_path, capsys, monkeypatch):
    """From a sweep file: a --layers name only ffn-ablation takes (refused after loading, or never), values of a type
    the option does not take (a traceback), a position only some of a tree's items name. From the command line:
    erasing a label whose classes are single items, which leaves no item to score the model on (a KeyError in the
    summary)."""
    monkeypatch.setenv("PROBE_RESULTS", str(tmp_path / "results"))
    good = {"name": "s", "models": ["tiny-gpt2"], "tasks": ["capitals"], "limit": 2, "task_options": {"ambiguous": "flag"}}
    out = []
    for i, (probe, options, shown) in enumerate((
            ("activation-patching", {"layers": "sixths"}, "'sixths'"), ("ffn-transplant", {"layers": "sixths"}, "'sixths'"),
            ("ffn-ablation", {"layers": 2.5}, "2.5"), ("activation-patching", {"sites": 3}, "site 3"),
            ("linear-probe", {"label": {"group": 1}}, "{'group': 1}"), ("logit-lens", {"positions": [0.5]}, "0.5"),
            ("activation-patching", {"positions": "edge_up4"}, "edge_up4"))):
        sweep = {**good, "probes": [probe], "options": options}
        if "edge_up4" in str(options):
            sweep.update(tasks=["tree-trained"], task_options={"trees": 4})
        (tmp_path / f"sweep{i}.yaml").write_text(yaml.safe_dump(sweep))
        out.append((["sweep", tmp_path / f"sweep{i}.yaml", "--quiet"], shown))
    out.append((["run", "--model", "tiny-gpt2", "--task", "capitals", "--task-option", "ambiguous=flag", "--limit", "4",
                 "--probe", "linear-probe", "--label", "answer", "--erase", "1", "--output", tmp_path / "never"],
                "--erase: no item is left to score"))
    failures = []
    for argv, shown in out:
        code, stdout, err = run_case(capsys, argv)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(PROGRESS)]
        before = argv[0] == "run" or "loading " not in err  # the erasure needs the model's activations
        if not (code == 2 and len(lines) == 1 and shown in lines[0] and "Traceback" not in err and before):
            failures.append(f"{' '.join(map(str, argv))!r}: exit {code}: {err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "never").exists() and not (tmp_path / "results").exists()
