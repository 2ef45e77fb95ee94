"""The logit lens: decode the residual stream at every layer through final norm and unembedding.

Rows are one per prompt x residual index (0 = embedding output, i = output of block i-1, L = last block, whose
lens equals the model's logits) x position: the last token by default (`--positions last`), or every token
(`all`), token indices (`0,5,-1`: negative from the end) or a slice (`-3:`), as TransformerLens'
accumulated_resid and tuned-lens' pictures. Ranks are 0-based (0 = top-1) and the reciprocal rank is
1 / (rank + 1), as in Merullo et al. `kl_to_final` is KL(model's distribution || lens distribution) in nats at the
row's position, the model's being the last index's (its logits); 0 at index L. Summaries are of the last position
(the answer's), the KL's per layer as a mean with its bootstrap interval over items.

The decoding itself (and `--vocab text`) is readout.py's, shared with the other probes. `--lens tuned` puts each
residual index through its tuned-lens translator first (tuned_lens.py; the last index has none), at every position:
the rows, the summary and the heat maps over positions are the chosen lens'.
"""

from __future__ import annotations

import nnsight
import pandas as pd
import torch

from ..stats import interval_text, level, mean, median_reached, proportion, reached_text
from ..tasks.base import Item, item_columns, token_ids
from .positions import entries, form_of, named_positions, token_positions
from .readout import excluded_ids, lens_tensors, special_flags, stats_rows, target_ids
from .tuned_lens import TunedLens, resolve_lens, translated


def positions_of(value: str | None, length: int, item: Item, tokenizer=None) -> list[int]:
    """The token indices (0-based, ascending, unique) of a prompt of `length` tokens that `--positions` names
    (positions.py's grammar; default last); names need the tokenizer."""
    wants = tokenizer is not None and any(form_of(e) == "name" for e in entries(value or "last"))
    named = named_positions(tokenizer, item) if wants else {}
    return sorted(token_positions(value or "last", length, named, "lens", item.index))


def prepare_lens(loaded, task, items: list[Item], options: dict):
    """Every item's positions checked against its prompt once, before the first batch; `--lens` resolved
    (tuned_lens.resolve_lens: the batches' state, None for the logit lens)."""
    for it in items:
        positions_of(options.get("positions"), len(token_ids(loaded.tokenizer, it.prompt)), it, loaded.tokenizer)
    return (items, *resolve_lens(loaded, options.get("lens")))


def run_lens(loaded, items: list[Item], topk: int = 5, positions: str | None = None,
             vocab: str | None = None, state: TunedLens | None = None) -> list[dict]:
    """Decoded inside the trace: the residuals never leave the model's devices (or the remote server), only the
    per-layer ranks, probabilities and top-k ids do. Prompts are left-padded, so each prompt's positions are taken
    as offsets from the end; all of a batch's vectors are decoded in chunks (`lens_tensors`), each position's L + 1
    together, ending with the model's own distribution for the KL. `state`: the tuned lens `prepare_lens` loaded
    (None: the logit lens)."""
    arch, tok = loaded.arch, loaded.tokenizer
    targets = target_ids(loaded, items)
    excluded = excluded_ids(tok, vocab)
    ids = [token_ids(tok, it.prompt) for it in items]
    picked = [positions_of(positions, len(x), it, tok) for x, it in zip(ids, items)]
    width = max(len(p) for p in picked)
    # offsets from the end (-1 = last token), each prompt's list padded with its last entry
    offsets = torch.tensor([[j - len(x) for j in p] + [p[-1] - len(x)] * (width - len(p))
                            for x, p in zip(ids, picked)])
    layers = arch.n_layers + 1
    with loaded.trace([it.prompt for it in items], logits_to_keep=1):
        h0 = arch.resid(0)
        index = (offsets.to(h0.device) + h0.shape[1])[..., None].expand(-1, -1, h0.shape[-1])
        hidden = torch.stack([arch.resid(i).gather(1, index.to(arch.resid(i).device)).to(arch.unembed_device)
                              for i in range(layers)], dim=1)  # (batch, L + 1, width, d)
        hidden = translated(state, hidden).transpose(1, 2)  # (batch, width, L + 1, d): each position's layers
        # assigned, then saved: a remote trace returns only the names it assigns and saves
        stats = nnsight.save(lens_tensors(arch, hidden.flatten(1, 2), targets, topk, excluded=excluded,
                                          final_every=layers))
    special = special_flags(tok, stats["top"][..., 0].flatten().tolist())  # per (item, position, layer)
    rows_of = stats_rows(tok, stats)
    rows = []
    for b, it in enumerate(items):
        cols = item_columns(tok, it)
        last = len(ids[b]) - 1
        for layer in range(layers):
            for k, pos in enumerate(picked[b]):
                r = rows_of[b][k * layers + layer]
                final = layer == arch.n_layers and pos == last
                rows.append({**cols, "layer": layer, "position": pos, "token": tok.decode(ids[b][pos]),
                             "last_position": pos == last, **r,
                             "special_top1": special[(b * width + k) * layers + layer] if final else None})
    return rows


def first_top1(df, col: str, items) -> list:
    """Per item (in `items` order), the first residual index at which `col` is 0 (top-1), None if never."""
    first = df[df[col] == 0].groupby("item").layer.min()
    return [None if pd.isna(v) else float(v) for v in first.reindex(items)]


def at_last_position(df):
    """The rows of each prompt's last token (all rows of a table without positions)."""
    return df[df.last_position.astype(bool)] if "last_position" in df else df


def summarize_lens(df, seed: int = 0) -> dict:
    """At the last position: accuracy at the last layer (with its interval), the median first layer at which
    the answer / argument is top-1, over the items that ever reach it (their count is kept), per layer the mean
    KL to the model's distribution with its bootstrap interval over items (`kl_to_final`: a list, one entry per
    layer; tables written before the column have none), and per layer the answer's and argument's top-1 share
    (Wilson) and mean reciprocal rank (bootstrap) with their intervals (`by_layer`)."""
    df = at_last_position(df)
    last = df[df.layer == df.layer.max()]
    n = int(last.item.nunique())
    out = {"items": n, **proportion(int((last.answer_rank == 0).sum()), len(last), "accuracy"),
           **median_reached(first_top1(df, "answer_rank", last.item), n, "answer_top1_layer"),
           "n_layers": int(df.layer.max())}
    if "argument_rank" in df:
        out.update(median_reached(first_top1(df, "argument_rank", last.item), n, "argument_top1_layer"))
    if "kl_to_final" in df:
        out["kl_to_final"] = [{"layer": int(layer), **mean(g.kl_to_final, "kl_to_final", seed=seed)}
                              for layer, g in df.groupby("layer")]
    targets = [t for t in ("answer", "argument") if f"{t}_rank" in df]
    out["by_layer"] = [{"layer": int(layer), **{k: v for t in targets for k, v in {
        **proportion(int((g[f"{t}_rank"] == 0).sum()), len(g), f"{t}_top1"),
        **mean(g[f"{t}_rr"], f"{t}_rr", seed=seed)}.items()}} for layer, g in df.groupby("layer")]
    return out


def report_lens(table, summary) -> str:
    """Per-layer top-1 fraction and mean reciprocal rank of answer and argument at the last position, and the mean
    KL to the model's distribution with its interval, then the summary lines."""
    targets = [t for t in ("answer", "argument") if f"{t}_rank" in table]
    at_last = at_last_position(table)
    rows = {r["layer"]: r for r in summary["by_layer"]}  # each with its interval: Wilson (share), bootstrap (mean)
    by_layer = pd.DataFrame({f"{t}_{m}": {layer: interval_text(r, f"{t}_{m}") for layer, r in rows.items()}
                             for t in targets for m in ("top1", "rr")}).rename_axis("layer")
    kl = ""
    if summary.get("kl_to_final"):
        by_layer["kl_to_final"] = by_layer.index.map({r["layer"]: interval_text(r, "kl_to_final")
                                                      for r in summary["kl_to_final"]})
        kl = (f", kl_to_final = mean KL(model's distribution || lens distribution) in nats [{level():.0%} "
              "bootstrap over items] (n items)")
    where = " at the last position" if len(at_last) < len(table) else ""
    lines = [f"per residual index (0 = embeddings){where}, over {summary['items']} items: *_top1 = fraction whose "
             f"token is the lens top-1 [{level():.0%} Wilson], *_rr = mean reciprocal rank 1/(rank+1) [bootstrap]{kl}",
             by_layer.round(3).to_string(), "",
             f"items {summary['items']}  accuracy {interval_text(summary, 'accuracy')} [{level():.0%} Wilson]"]
    lines += [f"{t} first top-1 {reached_text(summary, f'{t}_top1_layer')}" for t in targets]
    lines.append(f"of {summary['n_layers']} layers (0 = embeddings)")
    if len(at_last) < len(table):
        lines.append(f"all {table.position.groupby(table.item).nunique().sum()} positions of the items are in "
                     "table.csv (position, token) and the plot's heat maps")
    return "\n".join(lines)
