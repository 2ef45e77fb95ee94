"""Training: the N-back generator has no accidental matches, a killed and resumed run equals an uninterrupted one,
a trained run loads as a model that every probe runs on, the trained architecture satisfies its identities, and
bad configs are one-line errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import probes
from probes.errors import ProbeError
from probes.methods.readout import last_residuals
from probes.training.config import load_training_config
from probes.training.data import nback_generator, nback_splits, tokenizer_for
from probes.training.trainer import train

from .test_cli import ENV, probe, probe_here

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "training" / "nback-paper.yaml"
TINY = {"model.n_embd": 32, "task.train": 64, "task.test": 16, "train.steps": 24, "train.batch_size": 8,
        "train.save_steps": 8, "train.eval_steps": 8, "train.lr": 1e-3}


def tiny_config(**changes):
    return load_training_config(PAPER, {**TINY, **changes}, seed=0)


@pytest.mark.parametrize("n", range(1, 7))
def test_no_accidental_matches_over_many_seeds(n):
    """At every position t >= N the label is 'match' exactly when the letter equals the one N back, and every
    sequence has exactly 8 matches, for 2,000 sequences from each of 5 seeds."""
    for seed in range(5):
        task = {**load_training_config(PAPER)["task"], "n": n, "seed": seed, "train": 2000, "test": 0}
        gen = nback_generator(task)
        for s in range(2000):
            letters, labels = gen.sequence(n, s)
            assert labels == [t >= n and letters[t] == letters[t - n] for t in range(24)]
            assert sum(labels) == 8 and len(letters) == 24 and set(letters) <= set(task["letters"])


def test_train_and_test_sequences_are_disjoint_and_tokenized_as_letters():
    cfg = tiny_config()
    tok = tokenizer_for(cfg["task"])
    data = nback_splits(cfg["task"], tok)
    train_seqs = {tuple(r["input_ids"]) for r in data["train"]}
    assert len(data["train"]) == 64 and len(data["test"]) == 16
    assert not train_seqs & {tuple(r["input_ids"]) for r in data["test"]}
    row = data["train"][0]
    assert row["target"][:2] == [0, 0] and set(row["target"][2:]) <= {0, 1}  # the authors' loss: every position
    assert tok(" m", add_special_tokens=False).input_ids == tok.convert_tokens_to_ids(["m"])


def _kill_after(step: int, out: Path, config: Path = PAPER, overrides: dict = TINY):
    """Train `config` with `overrides` (TINY nback-paper) in a subprocess that SIGKILLs itself right after the
    checkpoint of `step` is written."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from transformers import TrainerCallback
import probes.training.trainer as t
from probes.training.config import load_training_config
class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)
orig = t._trainer_class
def patched():
    cls = orig()
    class K(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(Kill())
    return K
t._trainer_class = patched
t.train(load_training_config({str(config)!r}, {overrides!r}, seed=0), {str(out)!r}, progress=False)
"""
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


def test_a_killed_run_resumed_equals_an_uninterrupted_one(tmp_path):
    whole = train(tiny_config(), tmp_path / "whole", progress=False)
    _kill_after(16, tmp_path / "killed")
    assert (tmp_path / "killed" / "checkpoint-16").is_dir() and not (tmp_path / "killed" / "model.safetensors").exists()
    with pytest.raises(ProbeError, match="unfinished run of this config; accepted: --resume"):
        train(tiny_config(), tmp_path / "killed", progress=False)
    resumed = train(tiny_config(), tmp_path / "killed", resume=True, progress=False)
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, on this CPU
    log_a = (whole / "log.csv").read_text().splitlines()
    log_b = (resumed / "log.csv").read_text().splitlines()
    assert log_a == log_b
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24", "checkpoint-8"]


def test_a_trained_run_is_a_model_every_probe_runs_on(tmp_path):
    run = train(tiny_config(**{"model.ffn": True, "model.residual": True, "model.norm": True}), tmp_path / "r",
                progress=False)
    for folder in (run, run / "checkpoint-8"):
        model = probes.load(str(folder), attn_implementation="eager")
        assert model.spec.family == "probe_transformer" and model.arch.has_ffn
        for probe_name, task in (("nback", "nback-trained"), ("attention", "nback-trained-sequence"),
                                 ("logit-lens", "nback-trained"), ("accuracy", "nback-trained"),
                                 ("ffn-readout", "nback-trained"), ("ffn-ablation", "nback-trained")):
            result = probes.run(model, probes.task(task, n=[2], sequences=2), probe_name)
            assert len(result.table) > 0, probe_name
    attention_only = train(tiny_config(), tmp_path / "paper", progress=False)
    model = probes.load(str(attention_only))
    with pytest.raises(ProbeError, match="has no FFN blocks, so probe 'ffn-readout' has nothing to read"):
        probes.run(model, probes.task("nback-trained", n=[2], sequences=1), "ffn-readout")
    r = probe("run", "--model", str(attention_only), "--task", "nback-trained", "--task-option", "n=2",
              "--task-option", "sequences=2", "--probe", "nback", "--output", str(tmp_path / "cli"))
    assert r.returncode == 0 and "accuracy over all 44 trials" in r.stdout, r.stderr


@pytest.mark.parametrize("parts", [dict(ffn=False, norm=False, residual=False), dict(ffn=True, norm=False, residual=False),
                                   dict(ffn=True, norm=True, residual=True), dict(ffn=False, norm=True, residual=True),
                                   # Burns et al.'s toy model: no biases, projection, scaling or positions, the value
                                   # residual, ReLU layers before the readout
                                   dict(ffn=False, norm=False, residual=True, positions=False, attn_bias=False,
                                        attn_out=False, attn_scale=False, value_residual="previous", head_layers=3)])
def test_the_trained_architecture_satisfies_its_identities(tmp_path, parts):
    """Block out = in + attn + ffn with a residual, = the last update without one; last-layer lens = logits."""
    cfg = tiny_config(**{f"model.{k}": v for k, v in parts.items()}, **{"model.n_layer": 2, "train.steps": 1})
    model = probes.load(str(train(cfg, tmp_path / "r", progress=False)))
    arch = model.arch
    prompt = "b c d b c d f g h"
    got = []
    with model.trace(prompt):
        for i in range(arch.n_layers):
            x = arch.block_input(i).save()
            a = arch.attn_update(i).save()
            f = arch.ffn_update(i, like=x).save() if arch.has_ffn else None
            got.append((x, a, f, arch.block_output(i).save()))
        logits = model.model.output.logits.save()
    for x, a, f, out in got:
        if arch.residual:
            expected = x + a + (f if f is not None else 0)
        else:
            expected = f if f is not None else a
        assert (out - expected).abs().max() < 1e-5
    h = last_residuals(model, [prompt])
    assert (arch.decode(h[:, -1]) - logits[:, -1].float()).abs().max() < 1e-4


@pytest.mark.parametrize("change, message", [
    ({"task.generator": "parity"}, "unknown task generator 'parity'; accepted: nback"),
    ({"model.architecture": "alien"}, "unknown architecture 'alien'"),
    ({"model.n_embd": 30, "model.n_head": 4}, "width 30 is not divisible by 4 heads"),
    ({"train.steps": 0}, r"train.steps 0; accepted: a positive integer"),
    ({"train.batch_size": -1}, r"train.batch_size -1; accepted: a positive integer"),
    ({"train.lr": "fast"}, r"train.lr 'fast' is not a number"),
    ({"task.letters": "bcm"}, "accepted: distinct letters other than"),
    ({"train.schedule": "wavy"}, "unknown schedule 'wavy'"),
    ({"task.colour": 1}, "unknown task field 'colour'"),
])
def test_bad_training_configs_are_one_line_errors(tmp_path, change, message, capsys):
    args = ["train", str(PAPER), "--output", str(tmp_path / "r"), "--quiet"]
    for k, v in change.items():
        args += ["--set", f"{k}={v}"]
    r = probe(*args) if "task.generator" in change else probe_here(capsys, *args)  # one as a real process
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert message.replace("\\", "") in r.stderr or __import__("re").search(message, r.stderr), r.stderr


def test_a_folder_holding_another_run_is_refused(tmp_path):
    train(tiny_config(), tmp_path / "r", progress=False)
    with pytest.raises(ProbeError, match=r"holds a different training run \(differs in model\)"):
        train(tiny_config(**{"model.n_embd": 64}), tmp_path / "r", progress=False)
    assert train(tiny_config(), tmp_path / "r", progress=False) == tmp_path / "r"  # the same: left as it is
    bad = tmp_path / "cfg.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "model": {"n_embd": 8}}))
    with pytest.raises(ProbeError, match="model needs an architecture"):
        load_training_config(bad)
    assert os.path.exists(tmp_path / "r" / "log.csv")


def test_two_processes_train_as_one_at_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of the global batch of 16; the loss curve and the final
    weights equal those of 1 process (within 1e-5 relative and 1e-6 absolute: the gradients are summed in
    another order), and the main process alone wrote the run's files."""
    cfg = tmp_path / "tiny.yaml"
    # transformers' init (zero biases, small weights): with nback-paper's init: torch, 1 and 2 processes end 6.5e-5
    # apart on the qkv bias (every other weight within 6e-8), most likely its key part, a direction the softmax ignores
    # whose gradient is rounding noise that Adam normalises, and that noise differs with the order the processes sum in
    cfg.write_text(yaml.safe_dump(tiny_config(**{"train.batch_size": 16, "train.steps": 8, "train.save_steps": 4,
                                                 "train.eval_steps": 4, "model.init": "hf"})))
    one = probe("train", cfg, "--output", tmp_path / "one", "--quiet")
    assert one.returncode == 0, one.stderr
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "probes", "train", str(cfg), "--output",
                          str(tmp_path / "two"), "--quiet"], capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("trained nback-paper") == 1  # reported by the main process only
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["processes"] == 2
    logs = [pd.read_csv(tmp_path / r / "log.csv") for r in ("one", "two")]
    assert list(logs[0].step) == list(logs[1].step) == [0, 4, 8]  # 0, 4: the epochs' first batches' entropy
    for col in ("loss", "eval_loss", "eval_accuracy", "train_first_batch_entropy"):  # the global batch's
        assert np.allclose(logs[0][col], logs[1][col], rtol=1e-5, atol=0, equal_nan=True), col
    a, b = (load_file(tmp_path / r / "model.safetensors") for r in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


@pytest.mark.parametrize("eval_steps", [8, 10])
def test_the_final_metrics_are_the_last_step_evaluation_done_once(tmp_path, eval_steps, monkeypatch):
    """24 steps: evaluated every 8 (the last at 24: reused, not repeated) or every 10 (then once more at 24)."""
    from transformers import Trainer

    calls = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a, **k: calls.append(self.state.global_step) or evaluate(self, *a, **k))
    run = train(tiny_config(**{"train.eval_steps": eval_steps}), tmp_path / "run", progress=False)
    assert calls == [s for s in range(eval_steps, 25, eval_steps)] + ([24] if 24 % eval_steps else [])
    log = pd.read_csv(run / "log.csv").dropna(subset=["eval_loss"])
    final = json.loads((run / "meta.json").read_text())["final"]
    assert list(log.step) == [s for s in range(eval_steps, 24, eval_steps)] + [24]
    assert final["eval_loss"] == pytest.approx(float(log.eval_loss.iloc[-1]), abs=0)
    assert final["eval_accuracy"] == pytest.approx(float(log.eval_accuracy.iloc[-1]), abs=0)


class Clock:
    """time.monotonic for the trainer module: one second per reading, so windows end at the same steps each run."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 1.0
        return self.now


def test_three_windows_end_as_an_uninterrupted_run(tmp_path, monkeypatch):
    """`minutes` checkpoints and stops mid-run (meta.json: paused, step of total, time left); --resume continues;
    after the windows, the weights, the optimizer state and the log are the uninterrupted run's, bit for bit."""
    from probes.training import trainer as trainer_module

    whole = train(tiny_config(), tmp_path / "whole", progress=False)
    monkeypatch.setattr(trainer_module, "time", Clock())
    out, paused = tmp_path / "windows", []
    for window in range(6):
        train(tiny_config(), out, resume=window > 0, progress=False, minutes=1 / 60)
        meta = json.loads((out / "meta.json").read_text())
        if meta["status"] == "complete":
            break
        paused.append(meta["steps"])
        assert meta["status"] == "paused" and meta["total_steps"] == 24 and meta["eta_seconds"] > 0
        assert (out / f"checkpoint-{meta['steps']}").is_dir()
    assert paused == [8, 16]  # the first logging step (every 8) past each window
    assert meta["status"] == "complete" and meta["steps"] == 24
    assert_same_run(whole, out, 24)


def test_a_window_must_be_positive(tmp_path):
    r = probe("train", PAPER, "--minutes", "0", "--output", tmp_path / "r")
    assert r.returncode == 2 and r.stderr.strip().endswith("--minutes 0; accepted: a positive number of minutes")


def assert_same_run(whole, out, last: int) -> None:
    """Two run folders end alike, bit for bit: final weights, optimizer state at step `last`, and log."""
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt = [torch.load(r / f"checkpoint-{last}" / "optimizer.pt", weights_only=True)["state"] for r in (whole, out)]
    assert opt[0].keys() == opt[1].keys() and all(torch.equal(opt[0][k][x], opt[1][k][x])
                                                  for k in opt[0] for x in opt[0][k])
    assert (whole / "log.csv").read_text() == (out / "log.csv").read_text()
