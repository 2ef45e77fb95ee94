"""The logit lens: decode the residual stream at every layer through final norm and unembedding.

Rows are one per prompt x residual index (0 = embedding output, i = output of block i-1, L = last block, whose
lens equals the model's logits) x position: the last token by default (`--positions last`), or every token
(`all`), token indices (`0,5,-1`: negative from the end) or a slice (`-3:`), as TransformerLens'
accumulated_resid and tuned-lens' pictures. Ranks are 0-based (0 = top-1) and the reciprocal rank is
1 / (rank + 1), as in Merullo et al. Summaries are of the last position.

`--vocab text` leaves the tokenizer's special and control tokens (`<start_of_image>`, `<unused0>`, ...) out of
every top-k, rank and probability; the default, `all`, is the paper's (the whole vocabulary). Rows say whether the
model's own top-1 is a special token (`special_top1`), so a run can warn when it often is.
"""

from __future__ import annotations

import json
import re

import nnsight
import torch

import pandas as pd

from ..errors import ProbeError
from ..stats import interval_text, level, median_reached, proportion
from ..tasks.base import Item, answer_token, first_token, item_columns


VOCABS = ("all", "text")


# modality markers that some tokenizers add without marking them special (Gemma 3's GGUF: <start_of_image>)
MARKER = re.compile(r"<(start|end)_of_\w+>|<\w*(image|audio|video)\w*>|\[multimodal\]")


def special_ids(tokenizer) -> list[int]:
    """The tokenizer's special and control tokens: its special tokens, every added token marked special, and
    added modality markers (`MARKER`). Added text tokens (whitespace runs, HTML tags) stay."""
    ids = set(tokenizer.all_special_ids)
    for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(t, "special", False) or MARKER.fullmatch(str(t)):
            ids.add(i)
    return sorted(ids)


def excluded_ids(tokenizer, vocab: str | None) -> torch.Tensor | None:
    """The ids `--vocab` leaves out of top-k and ranks: None for all, the special tokens for text."""
    if vocab in (None, "all"):
        return None
    if vocab != "text":
        raise ProbeError(f"unknown --vocab {vocab!r}; accepted: {', '.join(VOCABS)}")
    return torch.tensor(special_ids(tokenizer), dtype=torch.long)


def restrict(logits: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
    """Logits with the excluded ids at -inf (never top-k, never ahead of a target, probability 0)."""
    if excluded is None or not len(excluded):
        return logits
    return logits.index_fill(-1, excluded.to(logits.device), float("-inf"))


def special_flags(tokenizer, top_ids) -> list[bool]:
    """Per predicted token id: is it a special token?"""
    special = set(special_ids(tokenizer))
    return [int(t) in special for t in top_ids]


def residuals_in_trace(arch) -> torch.Tensor:
    """Called inside a trace: (batch, L + 1, d) residual stream at the last position, every layer, gathered on
    the unembedding's device."""
    return torch.stack([arch.resid(index)[:, -1].to(arch.unembed_device) for index in range(arch.n_layers + 1)],
                       dim=1)


def last_residuals(loaded, prompts: list[str]) -> torch.Tensor:
    """(batch, L + 1, d) residual stream at the last position of each (left-padded) prompt, every layer."""
    with loaded.trace(prompts, logits_to_keep=1):  # the lens decodes itself: skip the full-vocab logits
        residuals = nnsight.save(residuals_in_trace(loaded.arch))
    return residuals


def next_token_logits(loaded, prompts: list[str]) -> torch.Tensor:
    """(batch, vocab) float logits of the next token after each (left-padded) prompt."""
    with loaded.trace(prompts, logits_to_keep=1):
        logits = loaded.model.output.logits[:, -1].save()
    return logits.float()


def rank_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of token ids[b] in logits[b, ..., :] (number of strictly larger logits)."""
    target = logits.gather(-1, ids.view(-1, *[1] * (logits.dim() - 1)).expand(*logits.shape[:-1], 1))
    return (logits > target).sum(-1)


def target_ids(loaded, items: list[Item]) -> dict[str, torch.Tensor]:
    """First token ids of each item's answer (as emitted after its prompt) and argument (when every item has one:
    a user's prompts may give none)."""
    tok = loaded.tokenizer
    out = {"answer": torch.tensor([answer_token(tok, it) for it in items])}
    if all(it.argument for it in items):
        out["argument"] = torch.tensor([first_token(tok, it.argument) for it in items])
    return out


LOGITS_CHUNK = 2**28  # bytes of float32 logits decoded at once: bounds memory for big vocabularies and batches


def lens_tensors(arch, hidden: torch.Tensor, targets: dict, topk: int, logit: bool = False,
                 excluded: torch.Tensor | None = None) -> dict:
    """Decode residual vectors hidden (batch, n, d) and reduce the logits to what the rows keep: top-k ids, and
    per target (ids of shape (batch,)) its rank, probability (and raw logit if asked), each (batch, n[, k]).

    All batch x n vectors go through the unembedding together, in chunks of LOGITS_CHUNK bytes of logits: with a
    few prompts, one decode per layer would read the whole unembedding matrix once per layer, which costs more than
    the forward pass. Plain torch on the model's modules, so it also runs inside a trace (on a remote server).
    `excluded`: token ids left out of the vocabulary (see `restrict`)."""
    batch, n, _ = hidden.shape
    flat = hidden.reshape(batch * n, -1)
    rows = max(1, LOGITS_CHUNK // (4 * arch.vocab_size))
    parts = []
    for start in range(0, batch * n, rows):
        logits = restrict(arch.decode(flat[start:start + rows]), excluded)  # (rows, vocab) float32
        norm = logits.logsumexp(-1)  # not log_softmax: no second (rows, vocab) tensor
        part = {"top": logits.topk(topk, dim=-1).indices}
        for name, ids in targets.items():
            ids = ids.to(logits.device).repeat_interleave(n)[start:start + rows]
            target = logits.gather(-1, ids[:, None])[:, 0]
            part[f"{name}_rank"] = rank_of(logits, ids)
            part[f"{name}_prob"] = (target - norm).exp()
            if logit:
                part[f"{name}_logit"] = target
        parts.append(part)
    return {k: torch.cat([p[k] for p in parts]).reshape(batch, n, *parts[0][k].shape[1:]) for k in parts[0]}


def stats_rows(tok, stats: dict, prefix: str = "") -> list[list[dict]]:
    """`lens_tensors` output -> rows[b][index]: top-1 and top-k tokens, and per target its rank, reciprocal rank
    and probability (and logit); column names prefixed by `prefix`."""
    top = stats["top"].tolist()
    text = {i: tok.decode(i) for i in {i for per_b in top for per_i in per_b for i in per_i}}
    cols = {}
    for key, values in stats.items():
        if key != "top":
            cols[prefix + key] = values.tolist()
            if key.endswith("_rank"):
                cols[prefix + key[:-5] + "_rr"] = (1.0 / (values.double() + 1)).tolist()
    return [[{prefix + "top1": text[ids[0]],
              prefix + "topk": json.dumps([text[i] for i in ids], ensure_ascii=False),
              **{key: values[b][index] for key, values in cols.items()}}
             for index, ids in enumerate(per_b)] for b, per_b in enumerate(top)]


def parse_positions(value) -> str:
    """`--positions` of the lens, checked before loading: last (default), all, token indices '0,5,-1' or a slice
    'a:b' ('-3:' the last three); returned as given."""
    text = "last" if value is None else str(value).strip()
    if text in ("last", "all"):
        return text
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 2:
                raise ValueError
            [int(x) for x in parts if x.strip()]
        else:
            [int(x) for x in text.split(",")]
    except ValueError:
        raise ProbeError(f"bad lens --positions {value!r}; accepted: last, all, token indices such as 0,5,-1 "
                         "(negative from the end) or a slice such as -3: or 2:8") from None
    return text


def positions_of(spec: str, length: int, item: Item) -> list[int]:
    """The token indices (0-based, ascending, unique) of a prompt of `length` tokens that `spec` names."""
    if spec == "last":
        return [length - 1]
    if spec == "all":
        return list(range(length))
    if ":" in spec:
        a, b = (int(x) if x.strip() else None for x in spec.split(":"))
        picked = list(range(length))[slice(a, b)]
        if not picked:
            raise ProbeError(f"lens --positions {spec!r} names no token of item {item.index} ({length} tokens); "
                             f"accepted: a slice within 0:{length}")
        return picked
    out = []
    for x in (int(v) for v in spec.split(",")):
        if not -length <= x < length:
            raise ProbeError(f"lens position {x} is outside the prompt of item {item.index} ({length} tokens); "
                             f"accepted: {-length} to {length - 1}")
        out.append(x % length)
    return sorted(set(out))


def prepare_lens(loaded, task, items: list[Item], options: dict):
    """Every item's positions checked against its prompt once, before the first batch."""
    spec = parse_positions(options.get("positions"))
    for it in items:
        positions_of(spec, len(loaded.tokenizer(it.prompt).input_ids), it)
    return items, None, {}


def run_lens(loaded, items: list[Item], topk: int = 5, positions: str | None = None,
             vocab: str | None = None) -> list[dict]:
    """Decoded inside the trace: the residuals never leave the model's devices (or the remote server), only the
    per-layer ranks, probabilities and top-k ids do. Prompts are left-padded, so each prompt's positions are taken
    as offsets from the end; all of a batch's vectors are decoded in chunks (`lens_tensors`)."""
    arch, tok = loaded.arch, loaded.tokenizer
    spec = parse_positions(positions)
    targets = target_ids(loaded, items)
    excluded = excluded_ids(tok, vocab)
    ids = [tok(it.prompt).input_ids for it in items]
    picked = [positions_of(spec, len(x), it) for x, it in zip(ids, items)]
    width = max(len(p) for p in picked)
    # offsets from the end (-1 = last token), each prompt's list padded with its last entry
    offsets = torch.tensor([[j - len(x) for j in p] + [p[-1] - len(x)] * (width - len(p))
                            for x, p in zip(ids, picked)])
    with loaded.trace([it.prompt for it in items], logits_to_keep=1):
        h0 = arch.resid(0)
        index = (offsets.to(h0.device) + h0.shape[1])[..., None].expand(-1, -1, h0.shape[-1])
        hidden = torch.stack([arch.resid(i).gather(1, index.to(arch.resid(i).device)).to(arch.unembed_device)
                              for i in range(arch.n_layers + 1)], dim=1)  # (batch, L + 1, width, d)
        # assigned, then saved: a remote trace returns only the names it assigns and saves
        stats = nnsight.save(lens_tensors(arch, hidden.flatten(1, 2), targets, topk, excluded=excluded))
    special = special_flags(tok, stats["top"][..., 0].flatten().tolist())  # per (item, layer, position)
    rows_of = stats_rows(tok, stats)
    rows = []
    for b, it in enumerate(items):
        cols = item_columns(tok, it)
        last = len(ids[b]) - 1
        for layer in range(arch.n_layers + 1):
            for k, pos in enumerate(picked[b]):
                r = rows_of[b][layer * width + k]
                final = layer == arch.n_layers and pos == last
                rows.append({**cols, "layer": layer, "position": pos, "token": tok.decode(ids[b][pos]),
                             "last_position": pos == last, **r,
                             "special_top1": special[(b * (arch.n_layers + 1) + layer) * width + k] if final else None})
    return rows


def first_top1(df, col: str, items) -> list:
    """Per item (in `items` order), the first residual index at which `col` is 0 (top-1), None if never."""
    first = df[df[col] == 0].groupby("item").layer.min()
    return [None if pd.isna(v) else float(v) for v in first.reindex(items)]


def at_last_position(df):
    """The rows of each prompt's last token (all rows of a table without positions)."""
    return df[df.last_position.astype(bool)] if "last_position" in df else df


def summarize_lens(df, seed: int = 0) -> dict:
    """At the last position: accuracy at the last layer (with its interval) and the median first layer at which
    the answer / argument is top-1, over the items that ever reach it (their count is kept)."""
    df = at_last_position(df)
    last = df[df.layer == df.layer.max()]
    n = int(last.item.nunique())
    out = {"items": n, **proportion(int((last.answer_rank == 0).sum()), len(last), "accuracy"),
           **median_reached(first_top1(df, "answer_rank", last.item), n, "answer_top1_layer"),
           "n_layers": int(df.layer.max())}
    if "argument_rank" in df:
        out.update(median_reached(first_top1(df, "argument_rank", last.item), n, "argument_top1_layer"))
    return out


def reached_text(summary: dict, name: str, where: str = "layer") -> str:
    """'at layer 13.5 (median of 141 of 196 items; 55 never)', or 'never (none of 196 items)'."""
    k, n = summary[f"{name}_reached"], summary[f"{name}_of"]
    if not k:
        return f"never (none of {n} items)"
    return f"at {where} {summary[name]:g} (median of {k} of {n} items" + (f"; {n - k} never)" if n > k else ")")


def report_lens(table, summary) -> str:
    """Per-layer top-1 fraction and mean reciprocal rank of answer and argument at the last position, then the
    summary lines."""
    targets = [t for t in ("answer", "argument") if f"{t}_rank" in table]
    at_last = at_last_position(table)
    by_layer = at_last.groupby("layer").agg(**{
        k: v for t in targets for k, v in ((f"{t}_top1", (f"{t}_rank", lambda r: (r == 0).mean())),
                                           (f"{t}_rr", (f"{t}_rr", "mean")))})
    where = " at the last position" if len(at_last) < len(table) else ""
    lines = [f"per residual index (0 = embeddings){where}, over {summary['items']} items: *_top1 = fraction whose "
             "token is the lens top-1, *_rr = mean reciprocal rank 1/(rank+1)", by_layer.round(3).to_string(), "",
             f"items {summary['items']}  accuracy {interval_text(summary, 'accuracy')} [{level():.0%} Wilson]"]
    lines += [f"{t} first top-1 {reached_text(summary, f'{t}_top1_layer')}" for t in targets]
    lines.append(f"of {summary['n_layers']} layers (0 = embeddings)")
    if len(at_last) < len(table):
        lines.append(f"all {table.position.groupby(table.item).nunique().sum()} positions of the items are in "
                     "table.csv (position, token) and the plot's heat maps")
    return "\n".join(lines)
