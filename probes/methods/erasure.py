"""Concept erasure for the linear probe (`--erase LAYER`): is the decodable feature one the model uses?

LEACE (Belrose et al. 2023, through the `concept-erasure` package) is fitted on half the items (seeded, within each
class) to the activations at the probe's site, position and the chosen layer and the probe's (first) label: an affine
map that leaves no linear trace of the label there (no linear classifier does better than a constant) while moving
the activations as little as possible. The model then runs on the other half with that activation erased in place,
and its answer (the top-1 next token against the item's answer) is scored: clean, erased, and a control erasure of
as many random directions (LEACE's rank: classes - 1) through the same mean. A drop under erasure that the control
does not show says the model reads the feature there; McNemar tests pair each erasure with the clean run by item.
"""

from __future__ import annotations

import nnsight
import torch

from ..errors import ProbeError
from ..stats import halves, interval_text, mcnemar, proportion
from ..tasks.base import Item, answer_token


def parse_layer(value, layers: int, site: str) -> int:
    top = layers if site == "resid" else layers - 1
    if isinstance(value, bool) or not str(value).lstrip("-").isdigit() or not 0 <= int(value) <= top:
        raise ProbeError(f"bad --erase {value!r} for site {site}; accepted: a layer 0..{top}")
    return int(value)


def fit(loaded, items: list[Item], labels: list[str], vectors, layer: int, seed: int) -> dict:
    """The LEACE eraser and the random control, fitted on one half of `items` (their `vectors(items)` at `layer`);
    the other half is where the model is scored."""
    from concept_erasure import LeaceEraser

    classes = sorted(set(labels))
    codes = [classes.index(y) for y in labels]
    fit_half, _ = halves([it.index for it in items], seed, strata=codes)
    fitting = [k for k, it in enumerate(items) if it.index in fit_half]
    if len({codes[k] for k in fitting}) < 2:
        raise ProbeError("--erase: the fitting half holds fewer than two classes; accepted: a label with at least "
                         "two items in each of two classes")
    x = vectors([items[k] for k in fitting])[:, layer].double()
    z = torch.nn.functional.one_hot(torch.tensor([codes[k] for k in fitting]), len(classes)).double()
    eraser = LeaceEraser.fit(x, z)
    rank = len(classes) - 1
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], rank, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    mean = x.mean(0)
    return {"eraser": lambda v: eraser(v.double()), "control": lambda v: v.double() - ((v.double() - mean) @ q) @ q.T,
            "fit": fit_half, "layer": layer, "rank": rank}


def edited_logits(loaded, prompt: str, site: str, layer: int, pos: int, edit) -> torch.Tensor:
    """The next-token logits of `prompt` with the activation at (site, layer, pos) replaced by edit(it) (None:
    clean)."""
    arch = loaded.arch
    with loaded.trace(prompt, logits_to_keep=1):
        if edit is not None:
            if site == "resid":
                x = arch.block_input(layer) if layer < arch.n_layers else arch.block_output(arch.n_layers - 1)
            elif site == "attn":
                x = arch.attn_update(layer)
            else:
                x = arch.ffn_output(layer, like=arch.block_input(layer))
            x[0, pos] = edit(x[0, pos].float().cpu()).to(x.device, x.dtype)
        logits = nnsight.save(loaded.model.output.logits[0, -1])
    return logits.float()


def score(loaded, item: Item, state: dict, site: str, pos: int) -> dict:
    """Columns of one item: whether the clean, erased and control runs give its answer (held-out items only)."""
    if item.index in state["fit"]:
        return {"erase_half": "fit", "erase_layer": state["layer"], "erase_rank": state["rank"]}
    want = answer_token(loaded.tokenizer, item)
    layer = state["layer"]
    return {"erase_half": "scored", "erase_layer": layer, "erase_rank": state["rank"],
            **{f"erase_{name}": int(edited_logits(loaded, item.prompt, site, layer, pos, edit).argmax()) == want
               for name, edit in (("clean", None), ("erased", state["eraser"]), ("control", state["control"]))}}


def summarize(df) -> dict:
    per = df[(df.layer == df.layer.min()) & (df.erase_half == "scored")]
    out = {"layer": int(df.erase_layer.iloc[0]), "rank": int(df.erase_rank.iloc[0]), "items": int(len(per))}
    for name in ("clean", "erased", "control"):
        right = per[f"erase_{name}"].astype(bool)
        out.update(proportion(int(right.sum()), len(right), name))
    for name in ("erased", "control"):
        out[f"p_{name}"] = mcnemar(per.erase_clean.astype(bool), per[f"erase_{name}"].astype(bool))
    return out


def report(s: dict) -> str:
    return (f"erasure at layer {s['layer']} (LEACE, rank {s['rank']}; fitted on the other half), the model's answer "
            f"top-1 on {s['items']} held-out items: clean {interval_text(s, 'clean', 2)}, erased "
            f"{interval_text(s, 'erased', 2)} (McNemar p {s['p_erased']:.3g}), {s['rank']} random directions "
            f"{interval_text(s, 'control', 2)} (p {s['p_control']:.3g})")
