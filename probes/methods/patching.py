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

import numpy as np

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


def _nback_pairs(task, items: list[Item], length) -> list[Item]:
    """N-back trials: the corrupted prompt changes the current letter so that the answer flips (a match becomes
    another letter, a non-match becomes the letter N back); everything before it is the same."""
    rng = np.random.default_rng([task.seed, 7])
    out = []
    for it in items:
        n, t, letters = it.extra["n"], it.extra["position"], it.extra["letters"]
        back = letters[t - n]
        options = (rng.permutation([c for c in task.letters if c not in (back, letters[t])]).tolist()
                   if it.extra["match"] else [back])
        prefix = it.prompt[: len(it.prompt) - len(task.trial.format(letter=letters[t]))]
        for new in options:  # the first that keeps the prompt's token count (tokenizers merge some letters)
            corrupted = prefix + task.trial.format(letter=new)
            if length(corrupted) == length(it.prompt):
                out.append(dataclasses.replace(it, extra={**it.extra, "corrupted": corrupted, "corrupted_input": new,
                                                          "corrupted_answer": task._response(not it.extra["match"])}))
                break
    return out


def relational_pairs(task, items: list[Item], tok) -> list[Item]:
    """The items of a relational task that have a partner: the same prompt (shots and all) with the query asked of
    another item whose answer starts with another token, of the same token length; drawn with the task's seed."""
    rows = task.rows()
    length = lambda text: len(tok(text).input_ids)  # noqa: E731
    pool = task.items()  # partners: any item of the task, limited or not
    query = {it.index: task.template.format(**rows[it.index]) for it in pool}
    rng = np.random.default_rng([task.seed, 7])
    paired = []
    for it in items:
        prefix = it.prompt[: len(it.prompt) - len(query[it.index])]
        n, first = length(it.prompt), answer_token(tok, it)
        for j in rng.permutation(len(pool)):
            other = pool[int(j)]
            corrupted = prefix + query[other.index]
            if other.index != it.index and answer_token(tok, other) != first and length(corrupted) == n:
                paired.append(dataclasses.replace(it, extra={**it.extra, "corrupted": corrupted,
                                                             "corrupted_input": other.input,
                                                             "corrupted_answer": other.answer}))
                break
    return paired


def _tree_pairs(task, items: list[Item], tok, direction: str):
    """Each tree's step paired with the same step of another held-out tree (a resampled tree: same token count,
    since every tree has as many edges) whose next path node differs, drawn with the task's seed; with the task's
    `corrupt: goal`, with the same tree asking for another leaf whose path turns elsewhere at this step."""
    if task.corrupt == "goal":
        paired = []
        for it in items:
            other = task.other_goal(it)
            if other is not None:
                paired.append(dataclasses.replace(it, extra={**it.extra, "corrupted": other[0],
                                                             "corrupted_input": it.extra["tree"],
                                                             "corrupted_answer": other[1]}))
        if not paired:
            raise ProbeError(f"no item of task {task.name!r} has another leaf whose path turns elsewhere at its step")
        return paired, {}, {"pairs": len(paired), "unpaired": len(items) - len(paired), "direction": direction}
    pool: dict[int, list[Item]] = {}
    for other in task.items():
        pool.setdefault(other.extra["step"], []).append(other)
    rng = np.random.default_rng([task.seed, 7])
    paired = []
    for it in items:
        same = pool[it.extra["step"]]
        for j in rng.permutation(len(same)):
            other = same[int(j)]
            if other.extra["tree"] != it.extra["tree"] and answer_token(tok, other) != answer_token(tok, it):
                paired.append(dataclasses.replace(it, extra={**it.extra, "corrupted": other.prompt,
                                                             "corrupted_input": other.extra["tree"],
                                                             "corrupted_answer": other.answer}))
                break
    if not paired:
        raise ProbeError(f"no item of task {task.name!r} has another tree at the same step with another answer; "
                         "accepted: more trees (--task-option trees=N)")
    return paired, {}, {"pairs": len(paired), "unpaired": len(items) - len(paired), "direction": direction}


def _icl_pairs(task, items: list[Item], direction: str):
    """Each classifier sequence paired with itself relabelled (`IclTask.corrupted`): the context items of the
    query's class carry a label the context does not use, which becomes the answer; sequences with no such item
    (iw) are left out."""
    paired = []
    for it in items:
        other = task.corrupted(it)
        if other is not None:
            paired.append(dataclasses.replace(it, extra={**it.extra, "corrupted": other[0],
                                                         "corrupted_input": f"{it.input} relabelled",
                                                         "corrupted_answer": other[1]}))
    if not paired:
        raise ProbeError(f"no sequence of task {task.name!r} has a context item of its query's class to relabel; "
                         "accepted: set in, ic or ic2")
    return paired, {}, {"pairs": len(paired), "unpaired": len(items) - len(paired), "direction": direction}


def _ioi_pairs(task, items: list[Item], tok) -> list[Item]:
    """Each IOI prompt paired with the same sentence whose other name is repeated (its answer is this one's
    subject), where both have the same token count."""
    paired = []
    for it in items:
        other = task.swapped(it)
        if len(tok(other.prompt).input_ids) == len(tok(it.prompt).input_ids):
            paired.append(dataclasses.replace(it, extra={**it.extra, "corrupted": other.prompt,
                                                         "corrupted_input": other.input,
                                                         "corrupted_answer": other.answer}))
    return paired


def prepare_patching(loaded, task, items: list[Item], options: dict):
    """Pair every item with a corrupted prompt (see the module's docstring); items with no partner are left out."""
    nback = task.kind == "nback" and getattr(task, "unit", "") == "trial"
    direction = options.get("direction", "denoise")
    if direction not in DIRECTIONS:
        raise ProbeError(f"unknown patching direction {direction!r}; accepted: {', '.join(DIRECTIONS)}")
    if task.kind == "icl":
        return _icl_pairs(task, items, direction)
    if task.kind == "tree":
        return _tree_pairs(task, items, loaded.tokenizer, direction)
    if not nback and task.kind != "ioi" and (not hasattr(task, "template") or not hasattr(task, "rows")):
        raise ProbeError(f"task {task.name!r} has no clean/corrupted pairs; accepted: a relational task "
                         "(e.g. capitals), N-back trials (nback, nback-trained), trees (tree-trained) or IOI prompts (ioi)")
    tok = loaded.tokenizer
    if task.kind == "ioi":
        paired = _ioi_pairs(task, items, tok)
        if not paired:
            raise ProbeError(f"no IOI prompt of task {task.name!r} has a swapped partner of the same token length")
        return paired, {}, {"pairs": len(paired), "unpaired": len(items) - len(paired), "direction": direction}
    if nback:
        paired = _nback_pairs(task, items, lambda text: len(tok(text).input_ids))
        if not paired:
            raise ProbeError(f"no trial of task {task.name!r} has a corrupted partner of the same token length")
        return paired, {}, {"pairs": len(paired), "unpaired": len(items) - len(paired), "direction": direction}
    paired = relational_pairs(task, items, tok)
    if not paired:
        raise ProbeError(f"no item of task {task.name!r} has a corrupted partner of the same token length on "
                         f"{loaded.spec.name}; accepted: a task with more items")
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
        ld, rank = (out[:, 0] - out[:, 1]).tolist(), out[:, 2].long().tolist()
        gap = ld[0] - ld[1]
        cols = {**item_columns(tok, it), "corrupted_input": it.extra["corrupted_input"], "direction": direction,
                "tokens": n, "ld_source": ld[0], "ld_dest": ld[1]}
        for k, (site, block, p) in enumerate(patches, start=2):
            at = "whole" if isinstance(p, slice) else p
            head = int(site[5:]) if site.startswith("head.") else None
            rows.append({**cols, "site": "head" if head is not None else site, "head": head, "block": block,
                         "position": str(at),
                         "from_end": None if isinstance(p, slice) else p - n, "ld_patched": ld[k],
                         "recovery": (ld[k] - ld[1]) / gap if gap else float("nan"), "answer_rank": rank[k]})
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
