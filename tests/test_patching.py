"""Activation patching: exact equivalences on tiny random models of every family (clean into clean changes
nothing; the whole residual at block 0 recovers everything), the batched patches against an independent
implementation with plain PyTorch hooks (one forward per patch), pairs that line up, and bad input."""

import pytest
import torch

import probes
from probes.errors import ProbeError
from probes.methods import patch_engine
from probes.methods.patch_engine import patch_list, patch_logits
from probes.methods.patching import parse_sites, prepare_patching, summarize_patching
from probes.methods.positions import resolve_positions
from probes.models.arch import _first, _get
from probes.tasks.files import load_task

from .conftest import TINY, loaded

WORDS = ["Poland", "France", "Spain", "Italy", "Japan", "Chile", "Kenya", "Peru", "Nepal", "Cuba", "Mali", "Oman"]


def pair(lm):
    """Two prompts of the same token length that differ in the country."""
    tok = lm.tokenizer
    make = "The capital of {} is the city of".format
    by_length = {}
    for w in WORDS:
        by_length.setdefault(len(tok(make(w)).input_ids), []).append(make(w))
    two = next(v for v in by_length.values() if len(v) >= 2)
    return two[0], two[1]


def hooked(lm, source: str, dest: str, site: str, block: int, pos) -> torch.Tensor:
    """The destination's last-position logits with one activation taken from the source run, by forward hooks
    on the transformers modules (no nnsight): the reference the batched patching must equal."""
    arch, tok = lm.arch, lm.tokenizer
    layer = _get(arch.hf, arch.spec.layers)[block]
    head = int(site[5:]) if site.startswith("head.") else None
    module = {"resid": layer, "attn": _get(layer, arch.spec.attn), "ffn": _get(layer, arch.spec.ffn)}.get(
        site, _get(layer, arch.spec.attn_out))
    store = {}

    def index(t):  # OPT's FFN runs on (batch*seq, d): batch 1, so a position is a row
        if head is not None:  # one head's slice of the output projection's input
            size = t.shape[-1] // arch.n_heads
            return (0, pos, slice(head * size, (head + 1) * size))
        return (pos,) if arch.spec.ffn_flat and site == "ffn" else (0, pos)

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if "value" in store:
            h = h.clone()
            h[index(h)] = store["value"]
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        store["value"] = h[index(h)].clone()

    def post(mod, args, out):
        t = out[0] if isinstance(out, tuple) else out
        if "value" in store:
            t = t.clone()
            t[index(t)] = store["value"]
            return (t, *out[1:]) if isinstance(out, tuple) else t
        store["value"] = t[index(t)].clone()

    handle = (module.register_forward_pre_hook(pre, with_kwargs=True) if site == "resid" or head is not None
              else module.register_forward_hook(post))
    try:
        with torch.no_grad():
            arch.hf(tok(source, return_tensors="pt").input_ids)
            out = arch.hf(tok(dest, return_tensors="pt").input_ids).logits[0, -1]
    finally:
        handle.remove()
    return out.float()


def sites(lm):
    return ["resid", "attn", "head"] + (["ffn"] if lm.arch.has_ffn else [])


@pytest.mark.parametrize("name", TINY)
def test_patching_the_clean_run_into_itself_changes_nothing(name):
    lm = loaded(name)
    clean, _ = pair(lm)
    n = len(lm.tokenizer(clean).input_ids)
    patches = patch_list(sites(lm), list(range(lm.arch.n_layers)), [0, n - 1, slice(None)], lm.arch.n_heads)
    # run, not taken as unchanged (every position is), so every write of the patching is exercised
    logits = patch_logits(lm, clean, clean, patches, skip_unchanged=False)
    assert all(torch.equal(logits[1], row) for row in logits[2:])


@pytest.mark.parametrize("name", TINY)
def test_the_whole_residual_at_block_0_recovers_the_clean_run_exactly(name):
    lm = loaded(name)
    clean, corrupted = pair(lm)
    logits = patch_logits(lm, clean, corrupted, [("resid", 0, slice(None))])
    assert torch.equal(logits[2], logits[0]) and not torch.equal(logits[1], logits[0])


@pytest.mark.parametrize("rows", [64, 5])
@pytest.mark.parametrize("name", TINY)
def test_batched_patches_equal_one_hooked_forward_per_patch(name, rows, monkeypatch):
    """In chunks of 5 rows, every chunk after the first starts part-way, its earlier blocks skipped (not on the
    value-residual model, which runs every block)."""
    monkeypatch.setattr(patch_engine, "PATCH_ROWS", rows)
    lm = loaded(name)
    clean, corrupted = pair(lm)
    n = len(lm.tokenizer(clean).input_ids)
    patches = patch_list(sites(lm), list(range(lm.arch.n_layers)), [0, n // 2, n - 1], lm.arch.n_heads)
    batched = patch_logits(lm, clean, corrupted, patches)
    for row, (site, block, pos) in enumerate(patches, start=2):
        ref = hooked(lm, clean, corrupted, site, block, pos)
        assert torch.allclose(batched[row], ref, atol=1e-4, rtol=1e-4), (site, block, pos)
    assert not all(torch.allclose(batched[row], batched[1], atol=1e-6) for row in range(2, len(patches) + 2))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2-value-residual"])
def test_chunks_after_the_first_start_at_their_first_block_and_position(name, monkeypatch):
    """12 patches at the last block, positions 0-11, in chunks of 4: the first chunk runs whole with the pair; the
    second runs positions 4 on after a 4-token KV cache, the third 8 on, both skipping the blocks before the last.
    Counted as token rows through each block's attention (a skipped block's own hooks still fire, its insides do
    not run). The value-residual model runs every chunk whole."""
    monkeypatch.setattr(patch_engine, "PATCH_ROWS", 4)
    lm = loaded(name)
    clean, corrupted = pair(lm)
    n, last = len(lm.tokenizer(clean).input_ids), lm.arch.n_layers - 1
    work = {i: 0 for i in range(lm.arch.n_layers)}

    def count(i):
        return lambda module, args, out: work.__setitem__(i, work[i] + _first(out).shape[0] * _first(out).shape[1])

    hooks = [_get(lm.arch.hf, f"{lm.arch.spec.layers}.{i}.{lm.arch.spec.attn}").register_forward_hook(count(i))
             for i in work]
    try:
        logits = patch_logits(lm, clean, corrupted, [("resid", last, p) for p in range(12)], skip_unchanged=False)
    finally:
        for h in hooks:
            h.remove()
    if lm.arch.independent_layers:
        assert work[0] == 6 * n + 4 + 8  # the whole first chunk, then the two prefixes' caches
        assert work[last] == 6 * n + (4 + 4 * (n - 4)) + (8 + 4 * (n - 8))
    else:
        assert work[0] == work[last] == 6 * n + 4 * n + 4 * n
    for row, p in enumerate(range(12), start=2):
        assert torch.allclose(logits[row], hooked(lm, clean, corrupted, "resid", last, p), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-probe-transformer"])
def test_patches_before_the_first_differing_token_give_the_destination_run(name):
    """Before the first token where the pair differs, every site holds the same values in both runs: those
    patches are taken as the destination run (exactly), and running them gives the same up to rounding."""
    lm = loaded(name)
    clean, corrupted = pair(lm)
    a, b = lm.tokenizer(clean).input_ids, lm.tokenizer(corrupted).input_ids
    differ = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert 0 < differ < len(a) - 1
    patches = patch_list(sites(lm), list(range(lm.arch.n_layers)), [0, differ - 1, differ, len(a) - 1, slice(None)],
                         lm.arch.n_heads)
    taken = patch_logits(lm, clean, corrupted, patches)
    run = patch_logits(lm, clean, corrupted, patches, skip_unchanged=False)
    for row, (site, block, pos) in enumerate(patches, start=2):
        if isinstance(pos, int) and pos < differ:
            assert torch.equal(taken[row], taken[1]), (site, block, pos)
        assert torch.allclose(taken[row], run[row], atol=1e-5, rtol=1e-5), (site, block, pos)
    assert not all(torch.equal(taken[row], taken[1]) for row in range(2, len(patches) + 2))


def test_pairs_line_up_and_recovery_runs_from_the_corrupted_to_the_clean_run(tmp_path):
    lm = loaded("tiny-llama")
    task = load_task("capitals", {"ambiguous": "flag"})
    items = task.items(limit=12)
    paired, _, meta = prepare_patching(lm, task, items, {})
    tok = lm.tokenizer
    assert meta["pairs"] == len(paired) > 0 and meta["pairs"] + meta["unpaired"] == 12
    for it in paired:
        assert len(tok(it.prompt).input_ids) == len(tok(it.extra["corrupted"]).input_ids)
        query = lambda inp: task.template.format(input=inp)  # noqa: E731
        assert it.prompt[:-len(query(it.input))] == it.extra["corrupted"][:-len(query(it.extra["corrupted_input"]))]
        assert it.extra["corrupted_input"] != it.input
    r = probes.run(lm, probes.task("capitals", ambiguous="flag"), "activation-patching", limit=6,
                   output=tmp_path / "run", positions="whole", layers="0")
    whole = r.table[r.table.position == "whole"]
    assert (whole.recovery == 1.0).all()  # block 0, every position: the clean run itself
    assert r.summary["pairs_used"] + r.summary["dropped_no_gap"] == r.summary["pairs"] == 6
    s = summarize_patching(r.table, min_gap=0.0)  # a random model's clean and corrupted runs barely differ
    assert (s["by_site"]["resid"]["whole_by_block"][0]["recovery"], s["by_site"]["resid"]["whole_by_block"][0]
            ["recovery_lo"]) == (1.0, 1.0)


def test_nback_pairs_flip_the_answer_by_changing_the_current_letter_only():
    lm = loaded("tiny-gpt2")
    task = load_task("nback", {"sequences": 1, "n": [2]})
    items = task.items()
    paired, _, meta = prepare_patching(lm, task, items, {})
    # GPT-2's tokenizer merges some letters with what follows: a pair must keep the token count, so some
    # non-match trials (whose corrupted letter is forced: the one N back) have none; every match trial has one
    assert meta["pairs"] == len(paired) >= len(items) / 2
    assert sum(it.extra["match"] for it in paired) == sum(it.extra["match"] for it in items)
    for it in paired:
        assert it.extra["corrupted_answer"] != it.answer
        clean, corrupted = it.prompt, it.extra["corrupted"]
        assert clean[:-12] == corrupted[:-12] and clean != corrupted  # only the last trial's letter differs
        letters = it.extra["letters"]
        assert (it.extra["corrupted_input"] == letters[it.extra["position"] - 2]) == (not it.extra["match"])


@pytest.mark.parametrize("call, message", [
    (lambda lm: parse_sites("heads"), "unknown patching site 'heads'; accepted: resid, attn, ffn"),
    (lambda lm: resolve_positions("99", 10, {"argument": 3}), "patching position 99 is outside the prompt (10 tokens)"),
    (lambda lm: resolve_positions("middle", 10, {"argument": 3}), "unknown patching position 'middle'; accepted:"),
    (lambda lm: prepare_patching(lm, load_task("nback-sequence"), [], {}),
     "task 'nback-sequence' has no clean/corrupted pairs"),
    (lambda lm: prepare_patching(lm, load_task("capitals"), [], {"direction": "up"}), "unknown patching direction 'up'"),
])
def test_bad_patching_input_is_a_clear_error(call, message):
    with pytest.raises(ProbeError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        call(loaded("tiny-gpt2"))


def test_a_linear_probe_finds_a_planted_feature_and_shuffled_labels_sit_at_chance():
    """Dimension 0 carries the label at layer 1 only; the random-weights vectors carry nothing."""
    import json

    import numpy as np
    import pandas as pd

    from probes.methods.linear_probe import summarize_linear_probe

    rng = np.random.default_rng(0)
    rows = []
    for i in range(200):
        label = "a" if i % 2 else "b"
        for layer in range(2):
            v = rng.normal(size=8)
            if layer == 1:
                v[0] += 6.0 if label == "a" else -6.0
            rows.append({"item": i, "layer": layer, "label": label, "site": "resid", "position": "last",
                         "vector": json.dumps(v.tolist()), "random_vector": json.dumps(rng.normal(size=8).tolist())})
    s = summarize_linear_probe(pd.DataFrame(rows))
    assert (s["train"], s["test"]) == (100, 100)
    planted, blank = s["layers"][1], s["layers"][0]
    assert planted["accuracy"] >= 0.99 and planted["macro_f1"] >= 0.99 and planted["selectivity"] > 0.35
    assert abs(blank["accuracy"] - 0.5) < 0.15 and abs(planted["random_accuracy"] - 0.5) < 0.15
    # shuffled labels: chance on average over seeds (one shuffle can correlate with the planted feature by luck)
    shuffled = [summarize_linear_probe(pd.DataFrame(rows), seed)["layers"][layer]["shuffled_accuracy"]
                for seed in range(8) for layer in (0, 1)]
    assert abs(np.mean(shuffled) - 0.5) < 0.06


def test_the_linear_probe_runs_on_a_model_with_its_random_weights_control(tmp_path):
    r = probes.run(loaded("tiny-llama"), probes.task("past-tense", ambiguous="flag"), "linear-probe", limit=24,
                   output=tmp_path / "run")
    assert set(r.summary["layers"]) == set(range(loaded("tiny-llama").arch.n_layers + 1))
    assert r.summary["train"] + r.summary["test"] == 24 and "random weights" in r.report
    with pytest.raises(ProbeError, match="^probe label 'group' has 1 value"):
        probes.run(loaded("tiny-llama"), probes.task("capitals", ambiguous="flag"), "linear-probe", limit=4,
                   output=tmp_path / "one")
