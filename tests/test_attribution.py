"""attribution-patching: the estimate of each patch is the first-order term (a_source - a_dest) . dLD/da, computed
here independently with plain PyTorch hooks on every tiny family; a patch shrunk to a small step converges to it;
its exact re-runs are activation-patching's numbers."""

import dataclasses

import pandas as pd
import pytest
import torch

import probes
from probes.methods.attribution import _verified, report_attribution, summarize_attribution
from probes.models.arch import _get
from probes.tasks.base import answer_token
from probes.tasks.files import load_task

from .conftest import loaded

SITES = "resid,attn,ffn,head"


def _module(arch, block: int, site: str):
    """The hf module whose input (resid, head) or output (attn, ffn) is the site."""
    layer = _get(arch.hf, arch.spec.layers)[block]
    return layer if site == "resid" else _get(layer, {"head": arch.spec.attn_out, "attn": arch.spec.attn,
                                                      "ffn": arch.spec.ffn}[site])


def _run(model, prompt: str, site: str, block: int, edit=None):
    """The LD-ready last-position logits of one unpadded prompt and the site's value (batch 1, seq, width); `edit`
    (value -> new value) changes the site in the run."""
    arch, tok = model.arch, model.tokenizer
    module, seen = _module(arch, block, site), {}

    def change(value):
        shaped = value.view(1, -1, value.shape[-1])
        seen["value"] = shaped.detach().clone()  # as it is here: some families add into it in place later (falcon)
        return (edit(shaped) if edit else shaped).view(value.shape)

    if site in ("resid", "head"):
        hook = module.register_forward_pre_hook(lambda m, args: (change(args[0]), *args[1:]))
    else:
        hook = module.register_forward_hook(
            lambda m, args, out: (change(out[0]), *out[1:]) if isinstance(out, tuple) else change(out))
    try:
        ids = torch.tensor([tok(prompt).input_ids], device=arch.hf.device)
        logits = arch.hf(input_ids=ids).logits[0, -1]
    finally:
        hook.remove()
    return logits, seen["value"]


def _by_hand(model, item, site: str, block: int, position: int, head: int | None) -> float:
    """(a_clean - a_corrupted) . dLD/da at the corrupted run (denoise), from plain hooks and autograd."""
    arch, tok = model.arch, model.tokenizer
    good = answer_token(tok, item)
    bad = answer_token(tok, dataclasses.replace(item, answer=item.extra["corrupted_answer"]))
    with torch.no_grad():
        _, clean = _run(model, item.prompt, site, block)
    leaf = {}

    def add(value):
        leaf["d"] = torch.zeros_like(value, requires_grad=True)
        return value + leaf["d"]

    with torch.enable_grad():
        logits, dest = _run(model, item.extra["corrupted"], site, block, add)
        (grad,) = torch.autograd.grad(logits[good] - logits[bad], leaf["d"])
    term = ((clean - dest.detach()) * grad)[0, position]
    if head is not None:
        size = term.shape[-1] // arch.n_heads
        term = term[head * size:(head + 1) * size]
    return float(term.sum())


def test_the_estimate_is_the_first_order_term_computed_with_hooks(tiny):
    task = load_task("capitals", {"ambiguous": "flag"})
    result = probes.run(tiny, task, "attribution-patching", limit=3, verify=0, sites=SITES, layers="0,1",
                        positions="last,0", batch_size=3)
    table = result.table
    assert not table.verified.any() and set(table.site) == {"resid", "attn", "ffn", "head"} - (
        set() if tiny.arch.has_ffn else {"ffn"})
    from probes.methods.patching import prepare_patching

    items, _ = task.scored_items(tiny.tokenizer, 3)
    paired = {it.index: it for it in prepare_patching(tiny, task, items, {})[0]}
    checked = 0
    for row in table.itertuples():
        if row.site == "head" and int(row.head) > 1:  # two heads per block are enough
            continue
        head = None if row.site != "head" else int(row.head)
        want = _by_hand(tiny, paired[row.item], row.site, row.block, int(row.position), head)
        assert row.estimate == pytest.approx(want, rel=1e-3, abs=1e-5), (row.site, row.block, row.position, head)
        checked += 1
    assert checked >= 8


def test_a_small_step_of_the_patch_converges_to_the_estimate():
    model = loaded("tiny-llama")
    task = load_task("capitals", {"ambiguous": "flag"})
    result = probes.run(model, task, "attribution-patching", limit=2, verify=0, sites="resid", layers="1",
                        positions="last")
    from probes.methods.patching import prepare_patching

    items, _ = task.scored_items(model.tokenizer, 2)
    item = prepare_patching(model, task, items, {})[0][0]
    estimate = result.table.set_index("item").estimate[item.index]
    tok = model.tokenizer
    good = answer_token(tok, item)
    bad = answer_token(tok, dataclasses.replace(item, answer=item.extra["corrupted_answer"]))
    with torch.no_grad():
        _, clean = _run(model, item.prompt, "resid", 1)
        base, dest = _run(model, item.extra["corrupted"], "resid", 1)
        errors = []
        for eps in (1.0, 0.1, 0.01):
            def step(value, eps=eps):
                out = value.clone()
                out[0, -1] += eps * (clean[0, -1] - dest[0, -1])
                return out
            logits, _ = _run(model, item.extra["corrupted"], "resid", 1, step)
            moved = ((logits[good] - logits[bad]) - (base[good] - base[bad])) / eps
            errors.append(abs(float(moved) - estimate))
    assert errors[2] <= 1e-2 * abs(estimate) + 1e-4, errors
    assert errors[2] <= errors[0] + 1e-6, errors


def test_verified_patches_are_activation_patchings_numbers():
    model = loaded("tiny-gpt2")
    task = load_task("capitals", {"ambiguous": "flag"})
    options = {"sites": SITES, "layers": "0,1", "positions": "all"}
    atp = probes.run(model, task, "attribution-patching", limit=3, verify="all", **options).table
    exact = probes.run(model, task, "activation-patching", limit=3, **options).table
    key = ["item", "site", "head", "block", "position"]
    both = atp.merge(exact, on=key, suffixes=("", "_ap"))
    assert len(both) == len(atp) == len(exact) and atp.verified.all()
    assert (both.recovery_exact - both.recovery_ap).abs().max() < 1e-5
    unchanged = atp[~atp.changes.astype(bool)]  # before the first token where the pair differs: nothing moves
    assert len(unchanged) and unchanged.effect_exact.abs().max() < 1e-6 and unchanged.estimate.abs().max() < 1e-6
    some = probes.run(model, task, "attribution-patching", limit=3, verify=5, **options).table
    assert (some.groupby("item").verified.sum() == 5).all()
    assert _verified([0.1, -3.0, 2.0, 0.0], 2) == [1, 2] and _verified([1.0], "all") == [0]


def test_bad_verify_values_are_refused_before_loading():
    task = load_task("capitals")
    for value in ("-1", "some", 1.5):
        with pytest.raises(probes.ProbeError, match="bad verify"):
            probes.run("tiny-gpt2", task, "attribution-patching", verify=value)


def test_verification_cells_key_on_the_position_from_the_end():
    """Pairs of 5 and 6 tokens: absolute position 4 is the last token of one and the second-to-last of the other,
    so its patches belong to two cells (as in the heat maps), not one."""
    rows = []
    for item, n, patches in ((0, 5, [(3, 0.1, 0.0), (4, 0.9, 0.96), ("whole", 1.0, 1.0)]),
                             (1, 6, [(4, 0.0, -0.0001), (5, 0.8, 0.9), ("whole", 0.8, 0.7)])):
        for p, recovery, exact in patches:
            rows.append({"item": item, "direction": "denoise", "tokens": n, "ld_source": 2.0, "ld_dest": 0.0,
                         "estimator": "AtP", "site": "resid", "head": None, "block": 0, "position": str(p),
                         "from_end": None if p == "whole" else p - n, "estimate": 2 * recovery, "changes": True,
                         "recovery": recovery, "verified": True, "effect_exact": 2 * exact,
                         "recovery_exact": exact})
    df = pd.DataFrame(rows)
    summary = summarize_attribution(df)
    cells = {c["from_end"]: c for c in summary["verification"]["cells"]}
    assert set(cells) == {-1, -2, None} and all(c["site"] == "resid" and c["block"] == 0 for c in cells.values())
    assert (cells[-1]["estimate"], cells[-1]["exact"]) == (pytest.approx(0.85), pytest.approx(0.93))
    assert (cells[-2]["estimate"], cells[-2]["exact"]) == (pytest.approx(0.05), pytest.approx(-0.00005))
    assert (cells[None]["estimate"], cells[None]["exact"]) == (pytest.approx(0.9), pytest.approx(0.85))
    report = report_attribution(df, summary)
    assert "resid block 0 position -1 from the end: 0.850 vs 0.930" in report
    assert "resid block 0 every position: 0.900 vs 0.850" in report


def test_logit_differences_are_float32_subtractions_of_the_models_logits():
    """In bfloat16, the pair's LDs (which the pair filter reads) are the float32 difference of the two answers'
    bfloat16 logits, each upcast, as exact patching has it; not a bfloat16 subtraction."""
    model = loaded("tiny-llama", dtype="bfloat16")
    task = load_task("capitals", {"ambiguous": "flag"})
    table = probes.run(model, task, "attribution-patching", limit=6, verify=0, sites="resid", layers="0",
                       positions="last", batch_size=1).table  # one pair per forward: no padding
    from probes.methods.patching import prepare_patching

    items, _ = task.scored_items(model.tokenizer, 6)
    rounded = 0
    for item in prepare_patching(model, task, items, {})[0]:
        tok = model.tokenizer
        good = answer_token(tok, item)
        bad = answer_token(tok, dataclasses.replace(item, answer=item.extra["corrupted_answer"]))
        ids = torch.tensor([tok(item.prompt).input_ids, tok(item.extra["corrupted"]).input_ids])
        with torch.no_grad():
            logits = model.arch.hf(input_ids=ids, logits_to_keep=1).logits[:, -1]
        assert logits.dtype == torch.bfloat16
        want = (logits[:, good].float() - logits[:, bad].float()).tolist()
        row = table[table.item == item.index].iloc[0]
        assert (row.ld_source, row.ld_dest) == (want[0], want[1])
        rounded += (logits[:, good] - logits[:, bad]).float().tolist() != want
    assert rounded  # a bfloat16 subtraction would have given other numbers
