"""ffn-readout (Merullo, Eickhoff & Pavlick): per prompt and block, the FFN update at the last position decoded
through final norm and unembedding, its norm, and how it moves the answer's lens logit; per prompt, the stages:
where the argument and the answer first become top-1 in the residual lens, and whether an FFN or an attention
update made the answer top-1 (the paper's function application).

"FFN update" and layer numbers are those of probes/models/arch.py: block i's FFN moves residual index i (after
block i's attention) to residual index i + 1.

What is decoded (through final norm and unembedding, readout.lens_tensors) under `--lens` (tuned_lens.translated):
- the residual at index i (the stages, `*_after_ffn`, `correct`): the logit lens decodes h_i, the tuned lens
  T_i(h_i) = h_i + A_i h_i + b_i (index L: h_L, the model's logits);
- after block i's attention, before its FFN (m_i; `answer_rank_before_ffn`, the switch's attention/FFN verdict and
  `answer_logit_delta`'s start): m_i, or T_{i+1}(m_i), the translator of the residual the FFN's output lands in, so
  that before and after differ by the FFN update alone (T_{i+1}(m_i + u_i) - T_{i+1}(m_i) = u_i + A_{i+1} u_i);
- block i's FFN update u_i alone (`ffn_*`): u_i, or u_i + A_{i+1} u_i, the translator's linear part: the update's
  share of the translated residual after it. The bias b belongs to a residual, not to a difference of two, so it is
  never added to an update. `ffn_norm` is |u_i| under either lens.

The causal check (relational tasks): each prompt is paired, as activation-patching pairs it, with the same prompt
asking about another item (another country); every block's FFN update at the last position is patched from the
clean run into the corrupted one, one block per row of one batched forward, and the logit difference between the
two answers recovered is `ffn_patch_recovery`. The summary gives it at the held-out FFN switch block against the
other blocks: if that FFN applies the relation, moving its update alone should move the answer, others much less.
"""

from __future__ import annotations

import nnsight
import torch

from ..tasks.base import Item, answer_token, item_columns, token_ids
from ..stats import halves, interval_text, level, mean, median_reached, proportion, reached_text
from .readout import excluded_ids, lens_tensors, stats_rows, target_ids
from .tuned_lens import TunedLens, resolve_lens, translated


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


def run_readout(loaded, items: list[Item], topk: int = 5, vocab: str | None = None,
                state: TunedLens | None = None) -> list[dict]:
    """Decoded inside the trace, as the lens: only ranks, logits, top-k ids and norms leave the model. `state`: the
    tuned lens `prepare_readout` loaded (None: the logit lens); what it decodes where: the module docstring."""
    arch, tok = loaded.arch, loaded.tokenizer
    targets = target_ids(loaded, items)
    ex = excluded_ids(tok, vocab)
    with loaded.trace([it.prompt for it in items], logits_to_keep=1):
        u = updates_in_trace(arch)
        mid = u["resid"][:, :-1] + u["attn"]  # after block i's attention, before its FFN
        stats = nnsight.save({
            "lens": lens_tensors(arch, translated(state, u["resid"]), targets, 1, logit=True, excluded=ex),
            "before": lens_tensors(arch, translated(state, mid, first=1), targets, 1, logit=True, excluded=ex),
            "ffn": lens_tensors(arch, translated(state, u["ffn"], first=1, update=True), targets, topk, excluded=ex),
            "norms": u["ffn"].float().norm(dim=-1)})
    lens, before = stats_rows(tok, stats["lens"]), stats_rows(tok, stats["before"])
    ffn = stats_rows(tok, stats["ffn"], prefix="ffn_")
    norms = stats["norms"].tolist()
    recovery = {it.index: ffn_patch_recovery(loaded, it) for it in items if "corrupted" in it.extra}
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
                         "correct": lens[b][-1]["answer_rank"] == 0, **st,
                         "ffn_patch_recovery": recovery[it.index][0][i] if it.index in recovery else None,
                         "ffn_patch_gap": recovery[it.index][1] if it.index in recovery else None})
    return rows


def prepare_readout(loaded, task, items: list[Item], options: dict):
    """`--lens` resolved (tuned_lens.resolve_lens: the batches' state); relational tasks: each item paired for the
    causal check (items without a partner keep no check)."""
    from ..tasks.relational import Relational

    lens, meta = resolve_lens(loaded, options.get("lens"))
    if not isinstance(task, Relational):
        return items, lens, {"causal_check": False, **meta}
    paired = {it.index: it for it in task.corrupted_pairs(items, loaded.tokenizer)}
    return [paired.get(it.index, it) for it in items], lens, {"causal_check": True, "pairs": len(paired), **meta}


def ffn_patch_recovery(loaded, item: Item) -> tuple[list[float], float]:
    """(per block: the share of the clean-minus-corrupted logit difference (clean answer vs the other) that patching
    that block's FFN update at the last position, clean into corrupted, recovers; the difference itself)."""
    import dataclasses

    from .patch_engine import patch_logits

    tok = loaded.tokenizer
    last = len(token_ids(tok, item.prompt)) - 1
    logits = patch_logits(loaded, item.prompt, item.extra["corrupted"],
                          [("ffn", b, last) for b in range(loaded.arch.n_layers)])
    good = answer_token(tok, item)
    bad = answer_token(tok, dataclasses.replace(item, answer=item.extra["corrupted_answer"]))
    ld = (logits[:, good] - logits[:, bad]).tolist()
    gap = ld[0] - ld[1]
    return [(x - ld[1]) / gap if gap else None for x in ld[2:]], gap  # None: undefined where the pair ties



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
            out["causal_check"] = causal_check(df, block, report, seed)
    return out


def causal_check(df, block: int, report, seed: int) -> dict | None:
    from .patching import MIN_GAP

    """On the held-out half: the recovery from patching the chosen switch block's FFN update, against the other
    blocks' (their mean, and the largest of them, each with a bootstrap interval over pairs)."""
    if "ffn_patch_recovery" not in df:
        return None
    held = df[df.item.isin(report)].dropna(subset=["ffn_patch_recovery"])
    held = held[held.ffn_patch_gap.abs() >= MIN_GAP]  # pairs whose answers the two runs tell apart
    if held.empty:
        return None
    per_block = held.groupby("block").ffn_patch_recovery
    chosen = held[held.block == block].ffn_patch_recovery
    others = held[held.block != block].groupby("item").ffn_patch_recovery.mean()
    strongest = per_block.mean().drop(block, errors="ignore")
    top = int(strongest.idxmax()) if len(strongest) else None
    return {"block": block, **mean(chosen, "recovery", seed=seed), **mean(others, "others", seed=seed),
            "strongest_other": top,
            **(mean(held[held.block == top].ffn_patch_recovery, "strongest", seed=seed) if top is not None else {})}


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
            + _switch_text(summary["ffn_switch_block"], summary.get("causal_check"))
            + f"\n[{level():.0%} Wilson intervals]")


def _switch_text(chosen: dict | None, check: dict | None = None) -> str:
    if not chosen:
        return "\nFFN switch block: none (no FFN switch among the selecting half)"
    text = (f"\nFFN switch block {chosen['block']}, chosen on {chosen['selected_on']} items: on the other "
            f"{chosen['reported_on']}, the answer is switched on by that block's FFN in {interval_text(chosen, 'share')}")
    if check:
        text += (f"\ncausal check on those items (its FFN update at the last position patched from the clean prompt "
                 f"into one about another item, {check['recovery_n']} pairs with a logit difference): recovers "
                 f"{interval_text(check, 'recovery')} of the logit difference; the other blocks "
                 f"{interval_text(check, 'others')} on average, the largest of their means (block "
                 f"{check['strongest_other']}, picked on these pairs) {interval_text(check, 'strongest')} "
                 "[bootstrap over pairs]")
    return text
