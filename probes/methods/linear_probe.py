"""linear-probe: is a label the task defines per item linearly decodable from the model's activations, layer by
layer, and is that the model's doing?

Activations are read through nnsight at a site (`resid`: the residual at each index 0..L, 0 = embeddings;
`attn`, `ffn`: each block's update) and a position (`last`, `argument`: the argument's last token, one the task
names: a tree's `goal`, `root`, `edge_up1`..., or a token index); several comma-separated positions
(`--position root,36,38`) read the same forward passes and give one probe per position. A
scikit-learn logistic regression per layer is fitted on a seeded, stratified half of the items and scored on the
other half: accuracy (Wilson interval) and macro-F1 (bootstrap over the held-out items), against two controls: the
same probe on shuffled training labels (chance as this label's classes make it), and on the same architecture with
re-initialised random weights (selectivity = accuracy - random-weights accuracy). Labels (`--label`): `group`
(regular/irregular verbs, the N of an N-back trial), `answer` (N-back: match or not; relational: the answer),
`argument`, or any column a task adds per item (e.g. `match`, or a tree's `up2`: the node two steps up from the
goal). Several labels, comma-separated (`--label up0,up1,up2`), are probed on the same activations: a label x layer
matrix, as backward chaining is shown. Classes with a single item are left out of that label's fit (counted).

Activations of all items are collected while the run goes (one row per item, layer and site with the vector), and
the fits are made when the run is summarized: a probe needs every item at once. `--erase LAYER` also asks whether
the model uses the (first) label's feature there: LEACE concept erasure, then the model's answers (methods/erasure.py).
"""

from __future__ import annotations

import copy
import json

import nnsight
import numpy as np
import torch

from ..errors import ProbeError
from ..stats import bootstrap, interval_text, level, proportion
from ..tasks.base import Item, item_columns, token_ids
from . import erasure
from .positions import named_positions, token_index

SITES = ("resid", "attn", "ffn")


def _vectors(loaded, prompts: list[str], site: str, positions: list[list[int]]) -> torch.Tensor:
    """(batch, positions, layers, d) activations at each prompt's positions (prompts run one by one: positions
    differ)."""
    arch = loaded.arch
    out = []
    for prompt, pos in zip(prompts, positions):
        with loaded.trace(prompt, logits_to_keep=1):
            if site == "resid":
                got = [arch.block_input(0)[0, pos]] + [arch.block_output(i)[0, pos] for i in range(arch.n_layers)]
            elif site == "attn":
                got = [arch.attn_update(i)[0, pos] for i in range(arch.n_layers)]
            else:
                got = []
                for i in range(arch.n_layers):
                    x = arch.block_input(i)
                    got.append(arch.ffn_update(i, like=x)[0, pos])
            saved = nnsight.save([g.float().cpu() for g in got])
        out.append(torch.stack(saved, dim=1))
    return torch.stack(out)


def label_of(item: Item, label: str) -> str:
    if label in ("group", "answer", "argument", "input", "output"):
        return str(getattr(item, label)).strip()
    if label in item.extra:
        return str(item.extra[label])
    raise ProbeError(f"unknown probe label {label!r} for this task; accepted: group, answer, argument, input, output"
                     + "".join(f", {k}" for k in item.extra))


def label_names(label: str) -> list[str]:
    names = [n.strip() for n in str(label).split(",") if n.strip()]
    if not names:
        raise ProbeError(f"bad probe label {label!r}; accepted: a label, or several comma-separated")
    return names


def run_linear_probe(loaded, items: list[Item], state: dict | None = None, label: str = "group", site: str = "resid",
                     position: str = "last") -> list[dict]:
    if site not in SITES:
        raise ProbeError(f"unknown probe site {site!r}; accepted: {', '.join(SITES)}")
    if site == "ffn" and not loaded.arch.has_ffn:
        raise ProbeError("probe site 'ffn': this model has no FFN; accepted: resid, attn")
    wanted = position_names(position)
    pos = _positions(loaded.tokenizer, items, wanted)
    tok = loaded.tokenizer
    real = _vectors(loaded, [it.prompt for it in items], site, pos)
    random = _vectors(state["random"], [it.prompt for it in items], site, pos)
    names = label_names(label)
    rows = []
    for b, it in enumerate(items):
        cols = {**item_columns(tok, it), "label": label_of(it, names[0]), "site": site}
        if len(names) > 1:
            cols.update({f"label_{n}": label_of(it, n) for n in names})
        if state.get("erase"):
            cols.update(erasure.score(loaded, it, state["erase"], site, pos[b][0]))
        for k, where in enumerate(wanted):
            for layer in range(real.shape[2]):
                rows.append({**cols, "position": where, "token_index": pos[b][k], "layer": layer,
                             "vector": json.dumps(real[b, k, layer].tolist()),
                             "random_vector": json.dumps(random[b, k, layer].tolist())})
    return rows


def position_names(position) -> list[str]:
    names = [p.strip() for p in str(position).split(",") if p.strip()]
    if not names:
        raise ProbeError(f"bad probe position {position!r}; accepted: a position, or several comma-separated")
    return names


def _positions(tok, items: list[Item], names: list[str]) -> list[list[int]]:
    """Each item's tokens at the named positions: last, argument, one the task names (trees: goal, root, ...) or a
    token index (negative from the end: the authors' register positions on trees are 36, 38, 39, 41, 42, 44)."""
    out = []
    for it in items:
        n = len(token_ids(tok, it.prompt))
        named = named_positions(tok, it) if set(names) - {"last"} else {}
        out.append([token_index(name, n, named, "probe", it.index) for name in names])
    return out


def prepare_linear_probe(loaded, task, items: list[Item], options: dict):
    """The control model: the same architecture (config) and tokenizer with freshly initialised random weights
    (seeded with the task's seed); it doubles the memory the model takes. With `erase`, the LEACE eraser too."""
    import dataclasses

    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM

    from ..models.arch import Arch

    for name in label_names(options.get("label", "group")):
        labels = {label_of(it, name) for it in items}
        if len(labels) < 2:
            raise ProbeError(f"probe label {name!r} has {len(labels)} value(s) on these items; accepted: a label "
                             "with at least two classes (e.g. --label group on past-tense)")
    torch.manual_seed(task.seed)
    config = copy.deepcopy(loaded.arch.config)
    config.__dict__.pop("quantization_config", None)  # the control is built in the dtype the model computes in
    hf = AutoModelForCausalLM.from_config(config, dtype=loaded.arch.hf.dtype)
    hf.eval().requires_grad_(False)
    model = TransformersModel(hf, task="text-generation", tokenizer=loaded.tokenizer)
    random = dataclasses.replace(loaded, model=model, arch=Arch(model), remote=False)
    state, meta = {"random": random}, {"labels": label_names(options.get("label", "group")),
                                       "control": "random weights (re-initialised)"}
    if options.get("erase") is not None:
        site, position = options.get("site", "resid"), options.get("position", "last")
        if site not in SITES or any(not it.answer for it in items):
            raise ProbeError(f"--erase needs a site of {', '.join(SITES)} (got {site!r}) and items with answers; "
                             "accepted: a task whose items have answers")
        if len(position_names(position)) > 1:
            raise ProbeError(f"--erase edits one position; got --position {position!r}; accepted: one position")
        layer = erasure.parse_layer(options["erase"], loaded.arch.n_layers, site)
        first = label_names(options.get("label", "group"))[0]
        state["erase"] = erasure.fit(
            loaded, items, [label_of(it, first) for it in items],
            lambda its: _vectors(loaded, [it.prompt for it in its], site,
                                 _positions(loaded.tokenizer, its, [position]))[:, 0],
            layer, task.seed)
        if all(it.index in state["erase"]["fit"] for it in items):  # a class of one item is fitted, never scored
            raise ProbeError(f"--erase: no item is left to score the model on: every class of label {first!r} on "
                             f"these {len(items)} items has one item or is fitted whole; accepted: a label with at "
                             "least two items in a class (or a larger --limit)")
        meta.update({"erase_layer": layer, "erase_label": first, "erase_rank": state["erase"]["rank"]})
    return items, state, meta


def _fit(x_train, y_train, x_test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return clf.fit(x_train, y_train).predict(x_test)


def _macro_f1(truth, pred):
    """Macro-F1 of integer labels as sklearn's f1_score(average="macro", zero_division=0) scores it (Brinkmann et
    al.'s probe score): the mean F1 over the classes in the truth or the predictions (a class predicted but absent
    scores 0), vectorized over resamples (arrays of shape (..., items))."""
    scores, present = [], []
    for c in np.union1d(truth, pred):
        tp = ((truth == c) & (pred == c)).sum(-1)
        wrong = ((truth == c) != (pred == c)).sum(-1)
        scores.append(np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0))
        present.append(((truth == c) | (pred == c)).any(-1))
    return np.sum(np.array(scores) * present, axis=0) / np.sum(present, axis=0)


def summarize_linear_probe(df, seed: int = 0) -> dict:
    """Per layer: held-out accuracy (Wilson) and macro-F1 (bootstrap) of the real model, the shuffled-label and
    random-weights controls, and the selectivity; the split is stratified by label and seeded. Several labels:
    the same for each, under `labels`."""
    where = list(dict.fromkeys(df.position.astype(str)))
    if len(where) > 1:
        return {"items": int(df.item.nunique()),
                "positions": {p: summarize_linear_probe(df[df.position.astype(str) == p], seed) for p in where}}
    names = [c[len("label_"):] for c in df.columns if c.startswith("label_")]
    erased = {"erasure": erasure.summarize(df)} if "erase_half" in df else {}
    layers = _layer_vectors(df)
    if not names:
        return {**_summarize_label(df, layers, "label", seed), **erased}
    return {"items": int(df.item.nunique()),
            "labels": {n: _summarize_label(df, layers, f"label_{n}", seed) for n in names}, **erased}


def _layer_vectors(df) -> dict[int, tuple]:
    """Per layer: {item: row} and the real and random-weights vectors as arrays, parsed from their JSON once for
    every label, fit and control."""
    out = {}
    for layer, g in df.groupby("layer"):
        out[int(layer)] = ({it: k for k, it in enumerate(g.item)}, np.array([json.loads(v) for v in g.vector]),
                           np.array([json.loads(v) for v in g.random_vector]))
    return out


def _summarize_label(df, layers: dict, col: str, seed: int) -> dict:
    from sklearn.model_selection import train_test_split

    per = df[df.layer == 0].sort_values("item")
    counts = per[col].astype(str).value_counts()
    rare = counts[counts < 2].index
    per = per[~per[col].astype(str).isin(rare)]
    out = {"items": int(len(per)), "left_out": int(counts[counts < 2].sum()), "layers": {}}
    if per[col].nunique() < 2:
        return {**out, "note": "fewer than two classes with two items each: nothing to hold out"}
    items, labels = per.item.to_numpy(), per[col].astype(str).to_numpy()
    train, test = train_test_split(items, test_size=0.5, random_state=seed, stratify=labels)
    rng = np.random.default_rng(seed)
    out.update({"train": int(len(train)), "test": int(len(test)),
                "classes": {str(k): int(v) for k, v in counts.drop(rare).items()}})
    label = per.set_index("item")[col].astype(str)
    y_train, y_test = label.loc[train].to_numpy(), label.loc[test].to_numpy()
    for layer, (index, real, random) in layers.items():
        shuffled = rng.permutation(y_train)
        rows_train, rows_test = [index[i] for i in train], [index[i] for i in test]
        row = {}
        for name, x, y in (("", real, y_train), ("shuffled_", real, shuffled), ("random_", random, y_train)):
            pred = _fit(x[rows_train], y, x[rows_test])
            right = pred == y_test
            row.update(proportion(int(right.sum()), len(right), f"{name}accuracy"))
            codes = {c: k for k, c in enumerate(sorted(set(y_test) | set(pred)))}
            f1, lo, hi = bootstrap(_macro_f1, [codes[c] for c in y_test], [codes[c] for c in pred], seed=seed,
                                   vectorized=True)
            row.update({f"{name}macro_f1": f1, f"{name}macro_f1_lo": lo, f"{name}macro_f1_hi": hi})
        row["selectivity"] = row["accuracy"] - row["random_accuracy"]
        out["layers"][int(layer)] = row
    return out


def report_linear_probe(df, summary) -> str:
    text = _report(df, summary)
    return text + ("\n" + erasure.report(summary["erasure"]) if "erasure" in summary else "")


def _report(df, summary) -> str:
    if "positions" in summary:
        return "\n\n".join(f"position {p}: " + _report(df[df.position.astype(str) == p], s)
                             for p, s in summary["positions"].items())
    if "labels" in summary:
        return report_matrix(df, summary)
    if not summary["layers"]:
        return f"{summary['items']} items: {summary['note']}"
    lines = [f"classes {json.dumps(summary['classes'])}; fitted on {summary['train']} items, scored on the other "
             f"{summary['test']} (site {df.site.iloc[0]}, position {df.position.iloc[0]}):"]
    for layer, r in summary["layers"].items():
        lines.append(f"  layer {layer:2d}: accuracy {interval_text(r, 'accuracy', 2)}, macro-F1 "
                     f"{interval_text(r, 'macro_f1', 2)}; shuffled labels {r['shuffled_accuracy']:.2f}, random "
                     f"weights {r['random_accuracy']:.2f}, selectivity {r['selectivity']:+.2f}")
    return "\n".join(lines) + f"\n[{level():.0%} intervals: Wilson for accuracy, bootstrap over held-out items for F1]"


def report_matrix(df, summary) -> str:
    """Several labels: held-out accuracy [interval] per label (rows) and layer (columns), the same for macro-F1 (the
    authors' score), then per label its count, controls at its best layer and what was left out."""
    import pandas as pd

    cells, notes = {"accuracy": {}, "macro_f1": {}}, []
    for name, s in summary["labels"].items():
        if not s["layers"]:
            notes.append(f"  {name}: {s['note']}")
            continue
        for score, table in cells.items():
            table[name] = {layer: f"{r[score]:.2f} [{r[f'{score}_lo']:.2f}, {r[f'{score}_hi']:.2f}]"
                           for layer, r in s["layers"].items()}
        best = max(s["layers"], key=lambda layer: s["layers"][layer]["accuracy"])
        r = s["layers"][best]
        notes.append(f"  {name}: {len(s['classes'])} classes, fitted on {s['train']}, scored on {s['test']}"
                     + (f" ({s['left_out']} items of single-item classes left out)" if s["left_out"] else "")
                     + f"; at its best layer {best}: shuffled labels {r['shuffled_accuracy']:.2f} (macro-F1 "
                     f"{r['shuffled_macro_f1']:.2f}), random weights {r['random_accuracy']:.2f} (macro-F1 "
                     f"{r['random_macro_f1']:.2f}), selectivity {r['selectivity']:+.2f}")
    tables = []
    for score, title in (("accuracy", "held-out accuracy"), ("macro_f1", "held-out macro-F1 (the authors' score)")):
        table = pd.DataFrame(cells[score]).T
        table.columns.name = "layer"
        tables.append(f"{title} by label and layer (site {df.site.iloc[0]}, position {df.position.iloc[0]}, "
                      f"{summary['items']} items):\n" + table.to_string())
    return ("\n".join(tables) + "\n" + "\n".join(notes)
            + f"\n[{level():.0%} intervals: Wilson for accuracy, bootstrap over held-out items for macro-F1]")
