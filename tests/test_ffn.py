"""Exact equivalences of the FFN probes on tiny random models of every family and on a bundled model."""

import numpy as np
import pytest
import torch

from probes.methods.ffn_ablation import ablate, ablation_variants
from probes.methods.ffn_readout import last_position_updates, run_readout, stages
from probes.methods.ffn_transplant import Variant, add_sweep, control_vectors, replace_ffn
from probes.tasks.files import load_task

from .conftest import TINY, bundled, loaded

PROMPT = "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"
ATOL = dict(atol=2e-5, rtol=1e-5)


def final_logits(lm, prompt):
    with lm.model.trace(prompt):
        logits = lm.model.output.logits[:, -1].save()
    return logits.float()


def full_ffn(lm, prompt, block):
    with lm.model.trace(prompt):
        x = lm.arch.block_input(block)
        f = lm.arch.ffn_update(block, like=x).save()
    return f


def models():
    return TINY + ["gemma3-270m"]


def get(name):
    return bundled(name) if name == "gemma3-270m" else loaded(name)


@pytest.mark.parametrize("name", models())
def test_injecting_a_prompts_own_o_at_its_own_block_changes_nothing(name):
    lm = get(name)
    base = final_logits(lm, PROMPT)
    o = last_position_updates(lm, [PROMPT])["ffn"][0]
    for block in (0, lm.arch.n_layers - 1):
        out = replace_ffn(lm, PROMPT, [Variant("o", (block,))], {"o": o[block]}, positions="last")
        torch.testing.assert_close(out, base, **ATOL)
    # and a different vector does change the answer distribution (the test can fail)
    out = replace_ffn(lm, PROMPT, [Variant("o", (0,))], {"o": o[0] * 3 + 1}, positions="last")
    assert (out - base).abs().max() > 1e-3


@pytest.mark.parametrize("name", models())
def test_replacing_an_ffn_by_its_own_output_changes_nothing(name):
    lm = get(name)
    base = final_logits(lm, PROMPT)
    block = lm.arch.n_layers // 2
    own = full_ffn(lm, PROMPT, block)[0]  # (seq, d), every position
    out = replace_ffn(lm, PROMPT, [Variant("own", (block,))], {"own": own}, positions="all")
    torch.testing.assert_close(out, base, **ATOL)


@pytest.mark.parametrize("name", TINY)
def test_zero_ablation_equals_the_block_computed_by_hand_without_its_ffn(name):
    lm = loaded(name)
    arch = lm.arch
    block = arch.n_layers - 1
    with lm.model.trace(PROMPT):
        x = arch.block_input(block).save()
        a = arch.attn_update(block).save()
    # ablated run: the block's output must be its input plus its attention update, nothing else
    with lm.model.trace(PROMPT):
        xi = arch.block_input(block)
        out = arch.ffn_output(block, like=xi)
        out[:] = 0.0
        y = arch.block_output(block).save()
        logits = lm.model.output.logits[:, -1].save()
    torch.testing.assert_close(y, x + a, **ATOL)
    torch.testing.assert_close(arch.decode(y[:, -1]), logits.float(), atol=1e-4, rtol=1e-4)
    # the batched ablation gives the same logits, and the unablated row the clean ones
    batched = ablate(lm, [PROMPT], [(), (block,)], "zero")
    torch.testing.assert_close(batched[1:], logits.float(), **ATOL)
    torch.testing.assert_close(batched[:1], final_logits(lm, PROMPT), **ATOL)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bloom", "tiny-opt", "tiny-gemma3", "tiny-falcon"])
def test_identity_replacement_is_not_zero_ablation(name):
    lm = loaded(name)
    arch = lm.arch
    with lm.model.trace(PROMPT):
        xi = arch.block_input(0)
        inp = arch.ffn_input(0, like=xi)
        out = arch.ffn_output(0, like=xi)
        out[:] = inp
        y = arch.block_output(0).save()
    with lm.model.trace(PROMPT):
        x = arch.block_input(0).save()
        a = arch.attn_update(0).save()
        f_in = arch.ffn_input(0, like=x).save()
    torch.testing.assert_close(y, x + a + f_in, **ATOL)
    zero, ident = ablate(lm, [PROMPT], [(0,)], "zero"), ablate(lm, [PROMPT], [(0,)], "identity")
    assert (zero - ident).abs().max() > 1e-4


@pytest.mark.parametrize("name", models())
def test_batched_layer_sweep_equals_the_layers_one_at_a_time(name):
    lm = get(name)
    arch = lm.arch
    o = last_position_updates(lm, [PROMPT])["ffn"][0, arch.n_layers // 2]
    vectors = control_vectors(o.float().cpu())
    blocks = range(arch.n_layers) if arch.n_layers <= 4 else (0, arch.n_layers // 2, arch.n_layers - 1)
    variants = [Variant("none")] + [Variant(k, (b,), 2.0) for b in blocks for k in ("o", "random")]
    swept = add_sweep(lm, PROMPT, variants, vectors)
    torch.testing.assert_close(swept[0], final_logits(lm, PROMPT)[0], atol=1e-4, rtol=1e-4)
    for row, v in enumerate(variants[1:], start=1):
        with lm.model.trace(PROMPT):
            h = arch.block_output(v.blocks[0])
            h[:, -1] += (vectors[v.vector] * v.scale).to(h.dtype)
            one = lm.model.output.logits[:, -1].save()
        torch.testing.assert_close(swept[row], one[0].float(), atol=1e-4, rtol=1e-4)


def test_control_vectors_keep_the_norm():
    o = torch.randn(64)
    c = control_vectors(o, seed=3)
    assert torch.equal(c["o"], o)
    assert torch.equal(c["shuffled"].sort().values, o.sort().values) and not torch.equal(c["shuffled"], o)
    torch.testing.assert_close(c["random"].norm(), o.norm())
    assert torch.equal(control_vectors(o, seed=3)["random"], c["random"])


def test_ablation_sixths_remove_blocks_from_the_top():
    v = ablation_variants(30)
    assert v["none"] == () and v["top 1/6"] == tuple(range(25, 30)) and v["top 6/6"] == tuple(range(30))
    assert ablation_variants(30, "3,5")["blocks 3,5"] == (3, 5)


def test_stages_find_argument_answer_and_who_switched():
    # argument top-1 at residual 2, answer at 4; after block 3's attention the answer was still rank 5
    st = stages([9, 9, 9, 3, 0, 0], [9, 5, 0, 0, 1, 2], [9, 9, 9, 5, 0])
    assert st == {"argument_top1_layer": 2, "answer_top1_layer": 4, "switch_block": 3, "switch_by": "ffn",
                  "argument_first": True}
    assert stages([9, 0, 0], [9, 9, 9], [0, 0])["switch_by"] == "attention"
    assert stages([9, 9, 9], [0, 9, 9], [9, 9])["switch_block"] is None


def test_readout_rows_agree_with_the_model_on_gemma():
    lm = bundled("gemma3-270m")
    items = load_task("capitals").items(inputs=["Poland", "France", "Japan"])
    rows = run_readout(lm, items)
    L = lm.arch.n_layers
    assert len(rows) == 3 * L
    last = [r for r in rows if r["block"] == L - 1]
    assert all(r["answer_rank_after_ffn"] == 0 and r["correct"] for r in last)  # Warsaw, Paris, Tokyo
    assert all(r["answer_top1_layer"] is not None and r["switch_block"] is not None for r in last)
    assert all(r["ffn_norm"] > 0 for r in rows)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-opt"])
def test_the_readout_s_causal_check_equals_ffn_patching_at_the_last_position(name):
    """ffn-readout's per-block recovery is the activation-patching probe's, site ffn at the last position, on the
    same pairs; and the summary reports it at the held-out switch block."""
    import probes

    lm = loaded(name)
    task = probes.task("capitals", ambiguous="flag")
    readout = probes.run(lm, task, "ffn-readout", limit=12).table
    patched = probes.run(lm, task, "activation-patching", limit=12, sites="ffn", positions="last").table
    assert readout.corrupted.notna().all()
    mine = readout.set_index(["item", "block"]).ffn_patch_recovery
    theirs = patched.set_index(["item", "block"]).recovery.reindex(mine.index)
    both = mine.notna() & theirs.notna()
    assert both.all() and np.allclose(mine, theirs, atol=1e-4, rtol=1e-3)
    gap = patched.groupby("item").ld_source.first() - patched.groupby("item").ld_dest.first()
    assert np.allclose(readout.groupby("item").ffn_patch_gap.first(), gap.reindex(readout.item.unique()), atol=1e-5)


def test_the_causal_check_is_reported_on_held_out_pairs_with_a_gap():
    import pandas as pd

    from probes.methods.ffn_readout import causal_check

    rows = [{"item": i, "block": b, "ffn_patch_recovery": (0.8 if b == 2 else 0.1 * b), "ffn_patch_gap": gap}
            for i, gap in enumerate([1.0, 2.0, 0.05, 1.5]) for b in range(4)]
    check = causal_check(pd.DataFrame(rows), 2, report=[0, 1, 2], seed=0)
    assert check["recovery"] == pytest.approx(0.8) and check["recovery_n"] == 2  # item 3 selects; item 2: no gap
    assert check["others"] == pytest.approx((0.0 + 0.1 + 0.3) / 3) and check["strongest_other"] == 3
