"""attention (Gong & Zhang): per layer and head, on whole N-back sequences (task `nback-sequence`), from each
letter's token to all earlier tokens: Shannon entropy of the row (natural log, over the causal keys), with and
without the first-token attention sink (key 0 removed, row renormalised); attention mass to the letter N back,
split by match and non-match, against the mean mass to the other earlier letters. Letter positions come from the
tokenizer's offsets. The letter-to-letter attention matrix (rows renormalised over letters) is kept per sequence
so the paper's "total entropy" (entropy of the trial-averaged rows, summed over rows) and heat maps can be
computed across trials. Attention weights need eager attention; grouped-query models come out per query head.
In-context classification: the query's attention on its class's items; trees: where each path step reads
(tree_attention.py).
"""

from __future__ import annotations

import json
import math
import re

import nnsight
import numpy as np
import torch

from ..errors import ProbeError
from ..models.arch import _get
from ..stats import finite_or_none, halves, interval_text, level, mean
from ..tasks.base import Item, item_columns
from ..tasks.icl_sequences import query_mass
from .tree_attention import report_path_attention, run_path_attention, summarize_path_attention

def entropy(rows: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of probabilities (zeros contribute nothing)."""
    p = rows.clamp_min(0)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def without_sink(rows: torch.Tensor) -> torch.Tensor:
    """Rows with key 0 (the first token) removed and renormalised."""
    rest = rows[..., 1:]
    return rest / rest.sum(-1, keepdim=True).clamp_min(1e-12)


def letter_positions(tokenizer, prompt: str, pattern: str = r"Letter: ([A-Z])") -> list[int]:
    """Token index of each letter of an N-back prompt, through the tokenizer's character offsets."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    out = []
    for m in re.finditer(pattern, prompt):
        char = m.start(1)
        hit = [i for i, (a, b) in enumerate(offsets) if a <= char < b]
        if not hit:
            raise ProbeError(f"letter at character {char} has no token in {tokenizer.name_or_path}")
        out.append(hit[0])
    return out


def attention_weights(loaded, prompt, with_logits: bool = False):
    """Per block, the attention probabilities (heads, seq, seq) of one prompt (text, or token ids (1, seq)) with
    eager attention; with_logits: (those, the logits at every position (seq, vocab)) from the same forward."""
    arch = loaded.arch
    saved = []
    with loaded.trace(prompt, **({} if with_logits else {"logits_to_keep": 1})):
        for i in range(arch.n_layers):
            out = _get(arch.block(i), arch.spec.attn_probs_module).output
            saved.append(out[1] if isinstance(out, tuple) and len(out) > 1 else None)
        saved = nnsight.save(saved)  # assigned: a remote trace returns only the names it assigns and saves
        logits = loaded.model.output.logits.save() if with_logits else None
    if any(w is None for w in saved):
        raise ProbeError(f"{loaded.spec.name} returns no attention weights from its attention modules; "
                         "accepted: models loaded with eager attention (the attention probe loads them so)")
    weights = [w[0].float() for w in saved]
    return (weights, logits[0].float()) if with_logits else weights


def run_attention(loaded, items: list[Item]) -> list[dict]:
    if items and "match_items" in items[0].extra:
        return run_query_attention(loaded, items)
    if items and "path" in items[0].extra:  # trees: where each path step reads (tree_attention.py)
        return run_path_attention(loaded, items, attention_weights)
    if not items or "matches" not in items[0].extra:
        raise ProbeError("the attention probe needs whole N-back sequences; accepted: --task nback-sequence")
    tok = loaded.tokenizer
    rows = []
    for it in items:
        pos = letter_positions(tok, it.prompt, it.extra.get("letter_pattern", r"Letter: ([A-Z])"))
        n, letters = it.extra["n"], it.extra["letters"]
        match = [t >= n and letters[t] == letters[t - n] for t in range(len(letters))]
        cols = item_columns(tok, it)
        for layer, w in enumerate(attention_weights(loaded, it.prompt)):
            q = w[:, pos]  # (heads, letters, seq): rows of the letter queries
            ent = entropy(q)
            ent_ns = torch.stack([entropy(without_sink(q[:, t, :p + 1])) for t, p in enumerate(pos)], dim=1)
            raw = q[:, :, pos]  # letter -> letter
            sub = torch.tril(raw)  # renormalised over the earlier letters
            sub = sub / sub.sum(-1, keepdim=True).clamp_min(1e-12)
            # what the rows read leaves the model's device once per layer (the rest is on the host)
            ent, ent_ns, raw, sub = (x.cpu() for x in (ent, ent_ns, raw, sub))
            for h in range(w.shape[0]):
                back = {True: [], False: []}
                other = []
                for t in range(n, len(pos)):
                    back[match[t]].append(float(raw[h, t, t - n]))
                    other += [float(raw[h, t, t - k]) for k in range(1, t + 1) if k != n]
                rows.append({**cols, "layer": layer, "head": h,
                             "entropy": float(ent[h, 1:].mean()), "entropy_nosink": float(ent_ns[h, 1:].mean()),
                             "nback_mass_match": float(np.mean(back[True])) if back[True] else None,
                             "nback_mass_nonmatch": float(np.mean(back[False])) if back[False] else None,
                             "other_letter_mass": float(np.mean(other)) if other else None,
                             "letter_attention": json.dumps(np.round(sub[h].numpy(), 5).tolist())})
    return rows


def run_query_attention(loaded, items: list[Item]) -> list[dict]:
    """In-context classification (kind: icl): per layer and head, the query's (last position's) attention on the
    context items of its class and on their labels, what uniform attention would give them (matches / positions),
    and the entropy of the query's row: the circuit the task is known for reads the matching item's label."""
    tok = loaded.tokenizer
    rows = []
    for it in items:
        match = [int(j) for j in it.extra["match_items"].split()]
        cols = item_columns(tok, it)
        for layer, w in enumerate(attention_weights(loaded, it.prompt)):
            query = w[:, -1, :]  # (heads, positions)
            matching = torch.zeros(query.shape[-1] // 2, dtype=query.dtype, device=query.device)
            matching[match] = 1
            per_head = torch.stack([entropy(query), *query_mass(query, matching)], dim=1).cpu().tolist()  # one transfer
            for h, (ent, item_mass, label_mass) in enumerate(per_head):
                rows.append({**cols, "layer": layer, "head": h, "query_entropy": ent, "item_mass": item_mass,
                             "label_mass": label_mass, "uniform_mass": len(match) / query.shape[-1]})
    return rows


def total_entropies(probs: torch.Tensor) -> torch.Tensor:
    """The paper's total entropy per head of one layer's attention (sequences, heads, queries, keys): the matrices
    averaged over the sequences, the entropies of each row summed (Gong & Zhang's `total_entropy`)."""
    return entropy(probs.mean(0)).sum(-1)


def total_entropy(matrices: list[np.ndarray]) -> float:
    """The paper's total entropy of one head's attention matrices (one per trial)."""
    return float(total_entropies(torch.tensor(np.stack(matrices))[:, None])[0])


def attention_table(df):
    grouped = df.groupby(["n", "layer", "head"])
    table = grouped[["entropy", "entropy_nosink", "nback_mass_match", "nback_mass_nonmatch",
                     "other_letter_mass"]].mean()
    table["total_entropy"] = grouped.letter_attention.apply(
        lambda s: total_entropy([np.array(json.loads(x)) for x in s]))
    return table


def _total_entropy_interval(g, seed: int) -> dict:
    """The paper's total entropy of one N, averaged over layers and heads, with a bootstrap over sequences (the
    same resampled sequences for every layer and head)."""
    seqs = sorted(g.item.unique())
    stacks = np.stack([np.stack([np.array(json.loads(x)) for x in g[g.item == s].sort_values(["layer", "head"])
                                 .letter_attention]) for s in seqs])  # (sequences, layers x heads, rows, keys)

    def stat(weights):  # weights: (resamples, sequences) counts of each sequence in a resample
        avg = np.tensordot(np.atleast_2d(weights), stacks, axes=(1, 0)) / np.atleast_2d(weights).sum(1)[:, None, None, None]
        p = np.clip(avg, 0, None)
        ent = -(p * np.log(np.where(p > 0, p, 1))).sum(-1).sum(-1)  # (resamples, layers x heads)
        return ent.mean(-1)

    ones = np.ones(len(seqs))
    value = float(stat(ones)[0])
    idx = np.random.default_rng(seed).integers(0, len(seqs), size=(500, len(seqs)))
    counts = np.stack([np.bincount(i, minlength=len(seqs)) for i in idx]).astype(float)
    alpha = 1 - level()
    lo, hi = np.quantile(stat(counts), [alpha / 2, 1 - alpha / 2]) if len(seqs) > 1 else (np.nan, np.nan)
    return {"total_entropy": value, "total_entropy_lo": finite_or_none(float(lo)),
            "total_entropy_hi": finite_or_none(float(hi)), "total_entropy_n": len(seqs)}


def summarize_attention(df, seed: int = 0) -> dict:
    if "item_mass" in df:
        return summarize_query_attention(df, seed)
    if "chain_mass" in df:
        return summarize_path_attention(df, seed)
    return summarize_nback_attention(df, seed)


def summarize_query_attention(df, seed: int = 0) -> dict:
    """Per layer and head, the means over sequences of the query's mass on the matching items and labels (bootstrap
    intervals), against uniform attention's, and of its entropy."""
    out = {}
    for (layer, head), g in df.groupby(["layer", "head"]):
        out[f"L{layer}H{head}"] = {"layer": int(layer), "head": int(head),
                                   **{k: v for c in ("item_mass", "label_mass", "uniform_mass", "query_entropy")
                                      for k, v in mean(g[c], c, seed=seed).items()}}
    return {"sequences": int(df.item.nunique()), "query": out}


def summarize_nback_attention(df, seed: int = 0) -> dict:
    """Entropies by N (bootstrap intervals over sequences), and per N the head with the most N-back mass: chosen
    on one half of the sequences and its masses reported on the other half (both halves' sizes kept, intervals
    over the reporting half), so the figure is not the maximum it was picked as. With one sequence per N there
    is nothing to hold out, and both halves are that sequence (said so)."""
    by_n = {}
    for n, g in df.groupby("n"):
        per_seq = g.groupby("item")[["entropy", "entropy_nosink"]].mean()
        by_n[int(n)] = {**mean(per_seq.entropy, "entropy", seed=seed), **mean(per_seq.entropy_nosink, "entropy_nosink", seed=seed),
                        **_total_entropy_interval(g, seed)}
    select, report = halves(df.item, seed, strata=df.n)
    best = nback_heads(attention_table(df[df.item.isin(select)]))
    sizes = {int(n): (len(set(g.item) & select), len(set(g.item) & report)) for n, g in df.groupby("n")}
    heads = {}
    for n, (_, layer, head) in best.items():
        held = df[df.item.isin(report) & (df.n == n) & (df.layer == layer) & (df["head"] == head)]
        gap = held.nback_mass_nonmatch - held.other_letter_mass
        heads[int(n)] = {"layer": int(layer), "head": int(head),
                         **{k: v for c in ("nback_mass_match", "nback_mass_nonmatch", "other_letter_mass")
                            for k, v in mean(held[c], c, seed=seed).items()},
                         **mean(gap, "nonmatch_above_other", seed=seed),
                         "selected_on": sizes[int(n)][0], "reported_on": sizes[int(n)][1],
                         "held_out": not (select & report)}
    return {"sequences": int(df.item.nunique()), "by_n": by_n, "nback_head": heads}


def nback_heads(table):
    """Per N, the (n, layer, head) with the most mass on the N-back letter above the other letters, judged on
    non-match trials: on match trials the N-back letter is the current letter again, which any head attending
    to repeated tokens finds without tracking positions."""
    return (table.nback_mass_nonmatch - table.other_letter_mass).groupby("n").idxmax()


def report_attention(df, summary) -> str:
    t = lambda d, k: interval_text(d, k, digits=2)  # noqa: E731
    if "path_attention" in summary:
        return report_path_attention(df, summary)
    if "query" in summary:
        lines = [f"{summary['sequences']} sequences; the query's attention, mean over sequences:"]
        lines += [f"  layer {r['layer']} head {r['head']}: on the matching items {t(r, 'item_mass')}, on their labels "
                  f"{t(r, 'label_mass')} (uniform attention: {r['uniform_mass']:.2f}); entropy {t(r, 'query_entropy')}"
                  for r in summary["query"].values()]
        return "\n".join(lines) + f"\n[{level():.0%} bootstrap intervals over sequences]"
    lines = [f"{summary['sequences']} sequences; mean over layers and heads, by N:"]
    for n, r in summary["by_n"].items():
        lines.append(f"  N={n}: entropy {t(r, 'entropy')}, no sink {t(r, 'entropy_nosink')}, "
                     f"total entropy {t(r, 'total_entropy')}")
    lines.append("head putting the most mass on the N-back letter in non-match trials, above other letters (chosen "
                 "on one half of the sequences, its masses on the other half):")
    for n, h in summary["nback_head"].items():
        lines.append(f"  N={n}: layer {h['layer']} head {h['head']}: non-match {t(h, 'nback_mass_nonmatch')}, "
                     f"match {t(h, 'nback_mass_match')}, other letters {t(h, 'other_letter_mass')} "
                     f"(chosen on {h['selected_on']}, reported on {h['reported_on']} sequences"
                     + ("" if h["held_out"] else "; the same one: too few to hold any out") + ")")
    return "\n".join(lines) + f"\n[{level():.0%} bootstrap intervals over sequences]"
