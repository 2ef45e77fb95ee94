"""ffn-readout (Merullo, Eickhoff & Pavlick): per prompt and block, the FFN update at the last position decoded
through final norm and unembedding, its norm, and how it moves the answer's lens logit; per prompt, the stages:
where the argument and the answer first become top-1 in the residual lens, and whether an FFN or an attention
update made the answer top-1 (the paper's function application).

"FFN update" and layer numbers are those of probes/models/arch.py: block i's FFN moves residual index i (after
block i's attention) to residual index i + 1.
"""

from __future__ import annotations

import nnsight
import torch

from ..tasks.base import Item, item_columns
from ..stats import halves, interval_text, level, median_reached, proportion
from .lens import excluded_ids, lens_tensors, reached_text, stats_rows, target_ids


def updates_in_trace(arch) -> dict[str, torch.Tensor]:
    """Called inside a trace: at the last position, the residual (batch, L+1, d), attention and FFN updates
    (batch, L, d), gathered on the unembedding's device."""
    dev = arch.unembed_device
    resid, attn, ffn = [arch.block_input(0)[:, -1].to(dev)], [], []
    for i in range(arch.n_layers):
        x = arch.block_input(i)
        attn.append(arch.attn_update(i)[:, -1].to(dev))
        ffn.append(arch.ffn_update(i, like=x)[:, -1].to(dev))
        resid.append(arch.block_output(i)[:, -1].to(dev))
    return {"resid": torch.stack(resid, dim=1), "attn": torch.stack(attn, dim=1), "ffn": torch.stack(ffn, dim=1)}


def last_position_updates(loaded, prompts: list[str]) -> dict[str, torch.Tensor]:
    """At the last position: residual (batch, L+1, d), attention and FFN updates (batch, L, d)."""
    with loaded.trace(prompts, logits_to_keep=1):
        updates = nnsight.save(updates_in_trace(loaded.arch))
    return updates


def stages(answer_ranks: list[int], argument_ranks: list[int], mid_answer_ranks: list[int]) -> dict:
    """Stage layers of one prompt from its residual-lens ranks (index 0..L) and the answer's rank after each
    block's attention (before its FFN)."""
    first = lambda ranks: next((i for i, r in enumerate(ranks) if r == 0), None)  # noqa: E731
    arg, ans = first(argument_ranks), first(answer_ranks)
    switch_block = switch_by = None
    if ans is not None and ans > 0:
        switch_block = ans - 1
        switch_by = "attention" if mid_answer_ranks[switch_block] == 0 else "ffn"
    return {"argument_top1_layer": arg, "answer_top1_layer": ans, "switch_block": switch_block,
            "switch_by": switch_by, "argument_first": arg is not None and ans is not None and arg < ans}


def run_readout(loaded, items: list[Item], topk: int = 5, vocab: str | None = None) -> list[dict]:
    """Decoded inside the trace, as the lens: only ranks, logits, top-k ids and norms leave the model."""
    arch, tok = loaded.arch, loaded.tokenizer
    targets = target_ids(loaded, items)
    ex = excluded_ids(tok, vocab)
    with loaded.trace([it.prompt for it in items], logits_to_keep=1):
        u = updates_in_trace(arch)
        mid = u["resid"][:, :-1] + u["attn"]  # after block i's attention, before its FFN
        stats = nnsight.save({"lens": lens_tensors(arch, u["resid"], targets, 1, logit=True, excluded=ex),
                              "before": lens_tensors(arch, mid, targets, 1, logit=True, excluded=ex),
                              "ffn": lens_tensors(arch, u["ffn"], targets, topk, excluded=ex),
                              "norms": u["ffn"].float().norm(dim=-1)})
    lens, before = stats_rows(tok, stats["lens"]), stats_rows(tok, stats["before"])
    ffn = stats_rows(tok, stats["ffn"], prefix="ffn_")
    norms = stats["norms"].tolist()
    rows = []
    for b, it in enumerate(items):
        st = stages([s["answer_rank"] for s in lens[b]], [s["argument_rank"] for s in lens[b]],
                    [s["answer_rank"] for s in before[b]])
        cols = item_columns(loaded.tokenizer, it)
        for i in range(loaded.arch.n_layers):
            after = lens[b][i + 1]
            rows.append({**cols, "block": i, "ffn_norm": norms[b][i],
                         **{k: v for k, v in ffn[b][i].items() if not k.endswith("_prob")},
                         "answer_rank_before_ffn": before[b][i]["answer_rank"],
                         "answer_rank_after_ffn": after["answer_rank"],
                         "argument_rank_after_ffn": after["argument_rank"],
                         "top1_after_ffn": after["top1"],
                         "answer_logit_delta": after["answer_logit"] - before[b][i]["answer_logit"],
                         "correct": lens[b][-1]["answer_rank"] == 0, **st})
    return rows


def summarize_readout(df, seed: int = 0) -> dict:
    """Accuracy, stage layers and who makes the switch to the answer; the FFN switch block (the block whose FFN
    most often makes the answer top-1) is chosen on a seeded half of the items and how often it is the switch
    block is reported on the other half, so the figure is not the mode it was picked as."""
    per = df.groupby("item").first()
    n = len(per)
    switched = per.dropna(subset=["switch_block"])
    out = {"items": int(n), **proportion(int(per.correct.sum()), n, "accuracy"),
           **median_reached(per.argument_top1_layer, n, "argument_top1_layer"),
           **median_reached(per.answer_top1_layer, n, "answer_top1_layer"),
           **proportion(int(per.argument_first.sum()), n, "argument_first"),
           **proportion(int((switched.switch_by == "ffn").sum()), len(switched), "switch_by_ffn"),
           "switch_block_mode": int(switched.switch_block.mode().iloc[0]) if len(switched) else None}
    ffn_switch = per[per.switch_by == "ffn"]
    out["ffn_switch_block_mode"] = int(ffn_switch.switch_block.mode().iloc[0]) if len(ffn_switch) else None
    out["ffn_switch_block"] = None
    if n >= 2:
        select, report = halves(per.index, seed)
        chosen = ffn_switch[ffn_switch.index.isin(select)].switch_block
        held = per[per.index.isin(report)]
        if len(chosen):
            block = int(chosen.mode().iloc[0])
            out["ffn_switch_block"] = {"block": block, "selected_on": len(select), "reported_on": len(held),
                                       **proportion(int(((held.switch_by == "ffn") & (held.switch_block == block)).sum()),
                                                    len(held), "share")}
    return out


def report_readout(df, summary) -> str:
    per_block = df.groupby("block").agg(ffn_norm=("ffn_norm", "mean"),
                                        ffn_answer_top1=("ffn_answer_rank", lambda r: (r == 0).mean()),
                                        answer_logit_delta=("answer_logit_delta", "mean"),
                                        answer_top1_after=("answer_rank_after_ffn", lambda r: (r == 0).mean()))
    per = df.groupby("item").first()
    counts = per[per.switch_by == "ffn"].switch_block.value_counts().sort_index()
    return (per_block.round(3).to_string()
            + f"\n\nitems {summary['items']}  accuracy {interval_text(summary, 'accuracy')}"
            f"\nargument first top-1 {reached_text(summary, 'argument_top1_layer', 'residual index')}"
            f"\nanswer first top-1 {reached_text(summary, 'answer_top1_layer', 'residual index')}"
            f"\nargument before answer: {interval_text(summary, 'argument_first')}; the switch to the answer is "
            f"made by an FFN in {interval_text(summary, 'switch_by_ffn')} of switches; FFN switch blocks: "
            + (", ".join(f"{int(k)}: {v}" for k, v in counts.items()) or "none")
            + _switch_text(summary["ffn_switch_block"])
            + f"\n[{level():.0%} Wilson intervals]")


def _switch_text(chosen: dict | None) -> str:
    if not chosen:
        return "\nFFN switch block: none (no FFN switch among the selecting half)"
    return (f"\nFFN switch block {chosen['block']}, chosen on {chosen['selected_on']} items: on the other "
            f"{chosen['reported_on']}, the answer is switched on by that block's FFN in {interval_text(chosen, 'share')}")
