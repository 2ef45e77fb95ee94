"""AtP*'s corrections (methods/atp_star.py), each against a computation made here with plain PyTorch hooks on the
families' own eager attention: the QK fix is AtP minus the first-order term through the block's scores plus
<dLD/dA, A' - A>, with A' the probabilities of a run whose query and key at p are the source's; GradDrop is the mean
|AtP| over passes that each drop one block's gradient. Recording (models/attention_record.py) leaves every family's
logits as they were."""

import dataclasses

import pytest
import torch

import probes
from probes.methods.patching import prepare_patching
from probes.models.arch import _get
from probes.models.attention_record import recordable, recording
from probes.tasks.base import answer_token
from probes.tasks.files import load_task

from .conftest import TINY, loaded
from .test_attribution import _by_hand

SEPARATE_QK = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma", "tiny-gemma2", "tiny-gemma3"]


@pytest.mark.parametrize("name", TINY)
def test_recording_leaves_the_logits_and_records_every_layer(name):
    model = loaded(name)
    ids = torch.tensor([model.tokenizer("The capital of France is Paris").input_ids])
    with torch.no_grad():
        plain = model.arch.hf(input_ids=ids).logits
        with recording(model.arch) as got:
            recorded = model.arch.hf(input_ids=ids).logits
    if recordable(model.arch):
        assert not got
        task = load_task("capitals", {"ambiguous": "flag"})
        with pytest.raises(probes.ProbeError, match="--qk-fix needs each attention layer's queries and keys"):
            probes.run(model, task, "attribution-patching", limit=2, qk_fix=True)
        return
    assert torch.allclose(plain, recorded, atol=1e-5)
    assert sorted(got) == list(range(model.arch.n_layers))
    probs = got[0].probs[0]
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)


def _pair(model, limit=3):
    task = load_task("capitals", {"ambiguous": "flag"})
    items, _ = task.scored_items(model.tokenizer, limit)
    return task, prepare_patching(model, task, items, {})[0][0]


def _ids(model, prompt):
    return torch.tensor([model.tokenizer(prompt).input_ids])


def _ld(model, item, logits):
    tok = model.tokenizer
    good = answer_token(tok, item)
    bad = answer_token(tok, dataclasses.replace(item, answer=item.extra["corrupted_answer"]))
    return logits[0, -1, good] - logits[0, -1, bad]


def _qk_by_hand(model, item, block: int, at) -> float:
    """What the QK fix adds to AtP for patching the input of `block` at position `at` (an index, or slice(None) for
    every position), from hooks on the family's q_proj, k_proj, v_proj and o_proj and its eager probabilities."""
    hf = model.arch.hf
    layer = hf.model.layers[block]
    attn, norm = layer.self_attn, layer.input_layernorm
    seen, hooks = {}, []

    def keep(name):
        return lambda m, a, o: seen.__setitem__(name, o[1].detach().clone() if isinstance(o, tuple) else
                                                o.detach().clone())

    try:
        hooks += [attn.q_proj.register_forward_hook(keep("q")), attn.k_proj.register_forward_hook(keep("k")),
                  layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))]
        with torch.no_grad():
            hf(input_ids=_ids(model, item.prompt))
        src = dict(seen)
        for h in hooks:
            h.remove()
        hooks = [attn.register_forward_hook(keep("probs_out"))]

        def probs(run_hooks=()):
            hs = [m.register_forward_hook(f) for m, f in run_hooks]
            with torch.no_grad():
                hf(input_ids=_ids(model, item.extra["corrupted"]))
            for h in hs:
                h.remove()
            return seen["probs_out"][0]

        def take(name):
            def edit(m, a, o):
                o = o.clone()
                o[:, at] = src[name][:, at]
                return o
            return edit

        a = probs()
        patched = probs([(attn.q_proj, take("q")), (attn.k_proj, take("k"))])
        for h in hooks:
            h.remove()
        hooks = []
        # G = dLD/dA: (dLD/d head output at t) . (value at s), per head
        grads, values = {}, {}
        leaf = {}

        def add_leaf(m, a):
            leaf["z"] = torch.zeros_like(a[0], requires_grad=True)
            return (a[0] + leaf["z"],)

        hooks += [attn.o_proj.register_forward_pre_hook(add_leaf),
                  attn.v_proj.register_forward_hook(lambda m, a, o: values.__setitem__("v", o.detach()))]
        dest = {}
        hooks.append(layer.register_forward_pre_hook(lambda m, a: dest.__setitem__("x", a[0].detach().clone())))
        with torch.enable_grad():
            ld = _ld(model, item, hf(input_ids=_ids(model, item.extra["corrupted"])).logits)
            (grads["z"],) = torch.autograd.grad(ld, leaf["z"])
        for h in hooks:
            h.remove()
        hooks = []
        heads, kv = a.shape[0], values["v"].shape[-1] // (grads["z"].shape[-1] // a.shape[0])
        size = grads["z"].shape[-1] // heads
        gz = grads["z"][0].view(-1, heads, size)
        v = values["v"][0].view(-1, kv, size).repeat_interleave(heads // kv, dim=1)
        g = torch.einsum("thd,shd->hts", gz, v)
        exact = float((g * (patched - a)).sum())
        # the first-order term through the block's scores: q and k read norm(x + eps * delta) at the patched
        # positions, everything else reads x
        eps = torch.zeros((), requires_grad=True)
        delta = torch.zeros_like(dest["x"])
        delta[:, at] = src["x"][:, at] - dest["x"][:, at]

        def moved(m, args):
            return (norm(dest["x"] + eps * delta),)

        with torch.enable_grad():
            hooks += [attn.q_proj.register_forward_pre_hook(moved), attn.k_proj.register_forward_pre_hook(moved)]
            ld = _ld(model, item, hf(input_ids=_ids(model, item.extra["corrupted"])).logits)
            (linear,) = torch.autograd.grad(ld, eps)
        return exact - float(linear)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", SEPARATE_QK)
def test_the_qk_fix_is_atp_with_the_blocks_softmax_exact(name):
    model = loaded(name, attn_implementation="eager")
    task, item = _pair(model)
    n = len(model.tokenizer(item.prompt).input_ids)
    for block in range(model.arch.n_layers):
        got = probes.run(model, task, "attribution-patching", limit=3, verify=0, sites="resid", layers=str(block),
                         positions="1,last,whole", qk_fix=True, batch_size=3).table
        plain = probes.run(model, task, "attribution-patching", limit=3, verify=0, sites="resid",
                           layers=str(block), positions="1,last,whole", batch_size=3).table
        got, plain = (t[t.item == item.index].set_index("position").estimate for t in (got, plain))
        for position, at in (("1", 1), (str(n - 1), n - 1), ("whole", slice(None))):
            correction = _qk_by_hand(model, item, block, at)
            assert got[position] - plain[position] == pytest.approx(correction, rel=1e-3, abs=1e-5), (block, position)


def _drop_gradient(module, args, out):
    """A forward hook: no gradient flows back through the module's output (its first element)."""
    value = out[0] if isinstance(out, tuple) else out
    if value.requires_grad:
        value.register_hook(torch.zeros_like)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-falcon", "tiny-gemma2"])
def test_graddrop_is_the_mean_atp_over_passes_each_dropping_a_block(name):
    model = loaded(name)
    arch = model.arch
    task, item = _pair(model)
    table = probes.run(model, task, "attribution-patching", limit=3, verify=0, sites="resid,attn", layers="all",
                       positions="last", graddrop=True, batch_size=3).table
    table = table[table.item == item.index]
    parts = [(_get(b, arch.spec.attn), _get(b, arch.spec.ffn)) for b in _get(arch.hf, arch.spec.layers)]
    n = len(model.tokenizer(item.prompt).input_ids)
    for row in table.itertuples():
        scores = []
        for dropped in range(arch.n_layers):
            if row.site != "resid" and dropped == row.block:  # the patch's own block: its gradient is dropped
                scores.append(0.0)
                continue
            hooks = [m.register_forward_hook(_drop_gradient) for m in parts[dropped]]
            try:
                scores.append(abs(_by_hand(model, item, row.site, row.block, n - 1, None)))
            finally:
                for h in hooks:
                    h.remove()
        want = sum(scores) / (arch.n_layers - 1)
        assert row.estimate == pytest.approx(want, rel=1e-3, abs=1e-5), (row.site, row.block)
    assert (table.estimate >= 0).all() and set(table.estimator) == {"AtP + GradDrop"}


def test_gradients_through_8bit_layers_are_the_quantized_models_own():
    """bitsandbytes' int8 layers give gradients with respect to activations: the estimate on an 8-bit model is
    its first-order term by plain hooks and autograd (bfloat16 compute: to 2%), and the QK fix runs through them."""
    model = loaded("tiny-llama", quantize="8bit")
    task, item = _pair(model)
    options = {"limit": 3, "verify": 0, "sites": "resid,attn,ffn,head", "layers": "0,1", "positions": "last",
               "batch_size": 3}
    table = probes.run(model, task, "attribution-patching", **options).table
    n = len(model.tokenizer(item.prompt).input_ids)
    rows = table[(table.item == item.index) & (table.site != "head")]
    scale = rows.estimate.abs().max()
    for row in rows.itertuples():
        want = _by_hand(model, item, row.site, row.block, n - 1, None)
        assert row.estimate == pytest.approx(want, abs=2e-2 * scale), (row.site, row.block)
    fixed = probes.run(model, task, "attribution-patching", qk_fix=True, **options).table
    assert fixed.estimate.notna().all() and len(fixed) == len(table)


def test_a_remote_model_is_refused_in_one_line():
    from probes.methods.attribution import prepare_attribution

    model = dataclasses.replace(loaded("tiny-llama"), remote=True)
    task, _ = _pair(model)
    with pytest.raises(probes.ProbeError, match="remote"):
        prepare_attribution(model, task, [], {})


def test_graddrop_passes_started_part_way_equal_full_backward_passes(monkeypatch):
    """Pass l starts at block l + 1's input where a block reads only the previous block's output: the same
    numbers as a full backward per pass, QK fix included."""
    model = loaded("tiny-llama", attn_implementation="eager")
    task, _ = _pair(model)
    options = {"limit": 3, "verify": 0, "sites": "resid,attn,ffn,head", "positions": "all,whole", "qk_fix": True,
               "graddrop": True, "batch_size": 3}
    short = probes.run(model, task, "attribution-patching", **options).table
    monkeypatch.setattr(model.arch, "independent_layers", False)
    full = probes.run(model, task, "attribution-patching", **options).table
    assert len(short) == len(full) and (short.estimate - full.estimate).abs().max() < 1e-6
    assert short.estimate.abs().max() > 1e-4


def test_corrections_a_model_or_sites_cannot_have_are_refused_in_one_line(monkeypatch):
    model = loaded("tiny-llama")
    task = load_task("capitals", {"ambiguous": "flag"})
    with pytest.raises(probes.ProbeError, match="--qk-fix changes resid patches only"):
        probes.run(model, task, "attribution-patching", limit=2, sites="attn,head", qk_fix=True)
    monkeypatch.setattr(model.arch, "n_layers", 1)
    with pytest.raises(probes.ProbeError, match="--graddrop drops one block's gradient at a time"):
        probes.run(model, task, "attribution-patching", limit=2, layers="0", graddrop=True)
