"""activation-patching: causal tracing on clean/corrupted prompt pairs, for every model of the registry.

A pair is an item's prompt (clean) and the same prompt, shots and all, with the query asked of another item
(corrupted: another country), chosen with the task's seed among the items whose prompt has the same number of
tokens and whose answer starts with another token, so positions line up. On N-back trials the corrupted prompt
changes the current letter so that the answer flips (match <-> no match); on trees, the corrupted prompt is the same
step of another held-out tree whose next path node differs (a resampled tree); on an in-context classifier's
sequences (vectors), the context items of the query's class are relabelled with a label the context does not use
(the in-context answer moves to it). Activations of the source run (clean,
or corrupted with --direction noise) are written into the destination run at one site, block and position per
patch: `resid` (the residual entering block i), `attn` (block i's attention update), `ffn` (its FFN update),
`head` (one attention head's output, each head on its own: its slice of the output projection's input).
The metric is the logit difference LD = logit(clean answer) - logit(corrupted answer) at the last position, as
recovery (LD_patched - LD_dest) / (LD_source - LD_dest): 1 = the patch carries the whole difference, 0 = none.

Many patches run in one forward: the pair's source and destination prompts run once, then the destination once per
patch, in chunks (memory bounded by the chunk, not by layers x positions), each skipping what its patches cannot
change (methods/patch_engine.py).
Positions: `last`, `argument` (the argument's last token in the query), the task's positions by meaning (trees:
`goal`, `root`, `bar`, `colon`, `edge_up0` = the edge token into the goal, `edge_up1` into its parent, ...), integers
(negative count from the end), `all` (every position, each on its own) or `whole` (every position at once).
"""

from __future__ import annotations

import dataclasses

from ..errors import ProbeError
from ..models.arch import parse_blocks
from ..stats import halves, interval_text, level, mean
from ..tasks.base import Item, answer_token, item_columns
from .patch_engine import answer_columns, patch_list, patch_logits
from .positions import named_positions, resolve_positions

SITES = ("resid", "attn", "ffn", "head")
DIRECTIONS = ("denoise", "noise")  # clean into corrupted (does it restore?), corrupted into clean (does it break?)


def parse_sites(value, has_ffn: bool = True) -> list[str]:
    sites = [s.strip() for s in (value.split(",") if isinstance(value, str) else value or ["resid"])]
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise ProbeError(f"unknown patching site {bad[0] if bad else value!r}; accepted: {', '.join(SITES)}")
    if "ffn" in sites and not has_ffn:
        raise ProbeError("patching site 'ffn': this model has no FFN; accepted: resid, attn")
    return sites


NO_PAIRS = ("a relational task (e.g. capitals), N-back trials (nback, nback-trained), trees (tree-trained) or IOI "
            "prompts (ioi)")


def prepare_patching(loaded, task, items: list[Item], options: dict):
    """Pair every item with a corrupted prompt (the task kind's `corrupted_pairs`; see the module's docstring);
    items with no partner are left out."""
    direction = options.get("direction", "denoise")
    if direction not in DIRECTIONS:
        raise ProbeError(f"unknown patching direction {direction!r}; accepted: {', '.join(DIRECTIONS)}")
    paired = task.corrupted_pairs(items, loaded.tokenizer)
    if paired is None:
        raise ProbeError(f"task {task.name!r} has no clean/corrupted pairs; accepted: {NO_PAIRS}")
    if not paired:
        raise ProbeError(task.no_pairs(loaded.spec.name))
    return paired, {}, {"pairs": len(paired), "unpaired": len(items) - len(paired), "direction": direction}


def run_patching(loaded, items: list[Item], state: dict | None = None, sites="resid", layers=None,
                 positions="all", direction: str = "denoise") -> list[dict]:
    arch, tok = loaded.arch, loaded.tokenizer
    sites = parse_sites(sites, arch.has_ffn)
    blocks = parse_blocks(layers if layers is not None else "all", arch.n_layers, "--layers")
    rows = []
    for it in items:
        clean, corrupted = it.prompt, it.extra["corrupted"]
        source, dest = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
        n = len(tok(clean).input_ids)
        pos = resolve_positions(positions, n, named_positions(tok, it))
        patches = patch_list(sites, blocks, pos, arch.n_heads)
        good, bad = answer_token(tok, it), answer_token(tok, dataclasses.replace(it, answer=it.extra["corrupted_answer"]))
        out = patch_logits(loaded, source, dest, patches, reduce=lambda logits: answer_columns(logits, good, bad))
        ld, rank = out[:, 0].tolist(), out[:, 1].long().tolist()
        gap = ld[0] - ld[1]
        cols = {**item_columns(tok, it), "corrupted_input": it.extra["corrupted_input"], "direction": direction,
                "tokens": n, "ld_source": ld[0], "ld_dest": ld[1]}
        for k, (site, block, p) in enumerate(patches, start=2):
            at = "whole" if isinstance(p, slice) else p
            head = int(site[5:]) if site.startswith("head.") else None
            rows.append({**cols, "site": "head" if head is not None else site, "head": head, "block": block,
                         "position": str(at),
                         "from_end": None if isinstance(p, slice) else p - n, "ld_patched": ld[k],
                         "recovery": (ld[k] - ld[1]) / gap if gap else None, "answer_rank": rank[k]})
    return rows


MIN_GAP = 0.1  # pairs whose source and destination logit differences differ by less carry no signal to recover


def pairs_used(df, min_gap: float = MIN_GAP):
    """The items whose source and destination logit differences differ by at least `min_gap`."""
    per = df.groupby("item").first()
    return per[(per.ld_source - per.ld_dest).abs() >= min_gap].index


def summarize_patching(df, seed: int = 0, min_gap: float = MIN_GAP) -> dict:
    """Per site and block (and, over positions, the position with the largest recovery, chosen on one half of the
    pairs and reported on the other), the mean recovery with a bootstrap interval over the pairs whose source and
    destination logit differences differ by at least `min_gap`."""
    per = df.groupby("item").first()
    used = pairs_used(df, min_gap)
    d = df[df.item.isin(used)]
    out = {"pairs": int(len(per)), "pairs_used": int(len(used)), "dropped_no_gap": int(len(per) - len(used)),
           "min_gap": min_gap,
           "direction": str(per.direction.iloc[0]) if len(per) else None, "by_site": {}}
    if not len(used):
        return out
    select, report = halves(sorted(used), seed)
    for site, g in d.groupby("site"):
        by_block = {int(b): mean(gb.recovery, "recovery", seed=seed)
                    for b, gb in g[g.position == "whole"].groupby("block")}
        named = g[g.position != "whole"].dropna(subset=["from_end"])
        best = None
        keys = ["block", "head", "from_end"] if site == "head" else ["block", "from_end"]  # a cell of the heat map
        if len(named):
            cells = named[named.item.isin(select)].groupby(keys).recovery.mean()
            if len(cells):
                cell = dict(zip(keys, cells.idxmax()))
                held = named[named.item.isin(report)]
                for k, v in cell.items():
                    held = held[held[k] == v]
                best = {**{k: int(v) for k, v in cell.items()}, "selected_on": len(select),
                        "reported_on": len(report), **mean(held.recovery, "recovery", seed=seed)}
        out["by_site"][site] = {"whole_by_block": by_block, "best": best}
    return out


def report_patching(df, summary) -> str:
    lines = [f"{summary['pairs']} clean/corrupted pairs ({summary['direction']}); {summary['pairs_used']} used, "
             f"{summary['dropped_no_gap']} dropped (source and destination logit differences within "
             f"{summary['min_gap']})"]
    d = df[df.item.isin(pairs_used(df, summary["min_gap"]))]
    for site, s in summary["by_site"].items():
        cells = d[(d.site == site) & (d.position != "whole")]
        if len(cells):
            across = "head" if site == "head" else "from_end"
            heat = cells.pivot_table(index="block", columns=across, values="recovery", aggfunc="mean")
            lines.append(f"\n{site}: mean recovery by block (rows) and "
                         + ("head (columns), over the positions patched" if site == "head" else
                            "position from the end (columns)") + ":\n" + heat.round(2).to_string())
        for b, r in s["whole_by_block"].items():
            lines.append(f"  {site} block {b}, every position: recovery {interval_text(r, 'recovery', 2)}")
        if s["best"]:
            b = s["best"]
            lines.append(f"  {site}: largest recovery at block {b['block']}"
                         + (f", head {b['head']}" if "head" in b else "") + f", position {b['from_end']} from the end "
                         f"(chosen on {b['selected_on']} pairs; on the other {b['reported_on']}: "
                         f"{interval_text(b, 'recovery', 2)})")
    return "\n".join(lines) + f"\n[{level():.0%} bootstrap intervals over pairs]"


def patching_passes(n_layers: int, options: dict) -> float:
    """Forward passes per item, for time limits: one row per patch (positions taken as 20 when 'all')."""
    sites = sum(16 if s == "head" else 1 for s in parse_sites(options.get("sites")))  # heads: taken as 16
    blocks = len(parse_blocks(options.get("layers") or "all", n_layers, "--layers"))
    positions = options.get("positions") or "all"
    n_pos = 20 if "all" in str(positions) else len(str(positions).split(","))
    return 2 + sites * blocks * n_pos
