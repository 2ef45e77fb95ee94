"""tree-scrub: Brinkmann et al.'s causal scrubbing of backward chaining at the root (their figures.ipynb, "Causal
Scrubbing": `test_hypothesis_1`, `get_matching_graph`, `layer_specific`), run through the patching engine.

Their hypothesis, per block L: the attention update of block L at the root (the last position of a tree's first-step
prompt: 47 with 16 nodes) carries only the node L steps up the path from the goal (`up<L>`; on a path of L edges or
fewer, the root's child, where the chain has already arrived). Each tree's update there is replaced by that of
another tree whose path has more than L edges and whose node L steps up is that node (`matched`), and the first path
step is scored; the same update taken from any other tree (`random`) is the baseline the hypothesis must beat, and
the clean run the other.

Metric, theirs: loss recovered = (loss_scrubbed - loss_uniform) / (loss_clean - loss_uniform) per tree, the loss
being -log p of the clean run's top-1 token and loss_uniform = log(vocabulary size), a uniform prediction: 1 = as
clean (the clean run's own value), 0 = as uniform. Mean over trees with a bootstrap interval, per block and per path
length (their figure: a line per block over path lengths 1-14, 150 trees each); also the shares of trees whose
scrubbed top-1 is the clean run's and the answer (Wilson).

Where it differs. From causal scrubbing proper: one activation of one block is resampled per run (a single-level
interchange, as theirs), not a treeified hypothesis whose every node is resampled, the sources' own inputs in turn.
From theirs: the sources are the task's other trees (theirs: fresh trees of any path length from L+1 to 14) with the
clean prompt's token count; clean and source trees come in the task's edge order (theirs: backward for both; use
--task-option order=backward); their clean trees have a second branch of at least two edges. Their hypotheses 2 and
3 (the registers' and edge tokens' share of the attention kept clean, the rest resampled) are not here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ProbeError
from ..models.arch import parse_blocks
from ..stats import interval_text, level, mean, proportion
from ..tasks.base import Item, answer_token, item_columns, token_ids
from .patch_engine import patch_logits

CONDITIONS = ("matched", "random")  # the source tree: the same node up<L> (the hypothesis), or any other tree


def up_node(path: tuple, layer: int) -> int:
    """The node `layer` steps up `path` (root, ..., goal) from the goal; the root's child when the path is shorter
    (their get_inverse_path, padded with the first node after the root)."""
    below = path[1:][::-1]
    return below[min(layer, len(below) - 1)]


def first_step(tree, nodes: int) -> str:
    """A tree's first-step prompt: up to the root."""
    return " ".join(tree.tokens(nodes)[:tree.start() + 1])


def draw_sources(task, items: list[Item], blocks: list[int], length) -> dict[int, dict]:
    """Per item: {(block, condition): source tree index}, drawn with the task's seed (per item and block) among the
    task's other trees whose first-step prompt has the item's `length` (a function of a prompt): for `matched`, those
    whose path has more than `block` edges and whose node `block` steps up is the item's `up_node`; for `random`,
    any. A block with no matched tree is left out of the item."""
    pool = range(task.first_tree, task.first_tree + task.trees)
    size = {t: length(first_step(task.tree(t), task.nodes)) for t in pool}
    by_node: dict = {}  # (block, node up<block>, prompt length) -> trees whose path has more than block edges
    for s in pool:
        path = task.tree(s).path
        for block in blocks:
            if len(path) > block + 1:
                by_node.setdefault((block, path[-1 - block], size[s]), []).append(s)
    out = {}
    for it in items:
        t = it.extra["tree"]
        path, others = task.tree(t).path, [s for s in pool if s != t and size[s] == size[t]]
        out[it.index] = {}
        for block in blocks:
            rng = np.random.default_rng([task.seed, 41, t, block])
            matched = [s for s in by_node.get((block, up_node(path, block), size[t]), []) if s != t]
            if matched:
                out[it.index][block, "matched"] = matched[int(rng.integers(len(matched)))]
                out[it.index][block, "random"] = others[int(rng.integers(len(others)))]
    return out


def prepare_scrub(loaded, task, items: list[Item], options: dict):
    """The source trees of every item and block (`draw_sources`); items with none for any block are left out."""
    blocks = parse_blocks(options.get("layers") or "all", loaded.arch.n_layers, "--layers")
    sources = draw_sources(task, items, blocks, lambda p: len(token_ids(loaded.tokenizer, p)))
    kept = [it for it in items if sources[it.index]]
    if not kept:
        raise ProbeError(f"no tree of task {task.name!r} has another with the same node as many steps up from its goal "
                         f"as any of blocks {', '.join(map(str, blocks))}; accepted: more trees (--task-option trees=N)")
    state = {it.index: {key: (s, first_step(task.tree(s), task.nodes), " ".join(map(str, task.tree(s).path)))
                        for key, s in sources[it.index].items()} for it in kept}
    unmatched = {b: sum((b, "matched") not in sources[it.index] for it in items) for b in blocks}
    return kept, state, {"trees": len(kept), "dropped": len(items) - len(kept), "blocks": blocks,
                         "unmatched_by_block": unmatched}


def run_scrub(loaded, items: list[Item], state: dict) -> list[dict]:
    """Per item, block and condition: block's attention update at the last position (the root) taken from the
    source tree, and the first step scored against the clean run."""
    tok = loaded.tokenizer
    rows = []
    for it in items:
        last = len(token_ids(tok, it.prompt)) - 1
        answer = answer_token(tok, it)
        cols = item_columns(tok, it)
        for (block, condition), (tree, prompt, path) in state[it.index].items():
            logits = patch_logits(loaded, prompt, it.prompt, [("attn", block, last)])  # source, clean, scrubbed
            logp = torch.log_softmax(logits[1:].double(), -1)
            top, scrubbed_top = (int(x) for x in logp.argmax(-1))
            clean, scrubbed = (float(x) for x in -logp[:, top])
            uniform = math.log(logits.shape[-1])
            rows.append({**cols, "block": block, "condition": condition, "source_tree": tree, "source_path": path,
                         "node": up_node(tuple(int(v) for v in it.extra["path"].split()), block),
                         "loss_clean": clean, "loss_scrubbed": scrubbed, "loss_uniform": uniform,
                         "recovered": (scrubbed - uniform) / (clean - uniform) if clean != uniform else None,
                         "clean_top": tok.decode(top), "scrubbed_top": tok.decode(scrubbed_top),
                         "clean_right": top == answer, "agrees": scrubbed_top == top, "right": scrubbed_top == answer})
    return rows


def _figures(g, seed: int) -> dict:
    return {**mean(g.recovered.astype(float), "recovered", seed=seed),
            **proportion(int(g.agrees.sum()), len(g), "agrees"), **proportion(int(g.right.sum()), len(g), "right")}


def summarize_scrub(df, seed: int = 0) -> dict:
    """The clean run's accuracy; per block and condition, the mean loss recovered, the shares of scrubbed top-1s
    that are the clean one and the answer, and the mean loss recovered per path length."""
    clean = df.groupby("item").first()
    out = {"trees": int(len(clean)), **proportion(int(clean.clean_right.sum()), len(clean), "clean_right"),
           "blocks": {}}
    for block, g in df.groupby("block"):
        out["blocks"][int(block)] = {
            cond: {**_figures(c, seed), "by_length": {int(n): mean(cl.recovered.astype(float), "recovered", seed=seed)
                                                      for n, cl in c.groupby("path_length")}}
            for cond, c in g.groupby("condition")}
    return out


def report_scrub(df, summary) -> str:
    t = lambda d, k: interval_text(d, k, digits=2)  # noqa: E731
    lines = [f"{summary['trees']} trees, their first step (the prompt ends at the root); the clean run's top-1 is the "
             f"answer in {t(summary, 'clean_right')}",
             "Block L's attention update at the root resampled from a tree with the same node L steps up from the goal "
             "(the hypothesis) or from any tree; loss recovered (1 = as clean, 0 = as a uniform prediction):"]
    for block, s in summary["blocks"].items():
        lines.append(f"  block {block}: " + "; ".join(
            f"{cond} {t(s[cond], 'recovered')}, top-1 kept {t(s[cond], 'agrees')}, right {t(s[cond], 'right')}"
            for cond in CONDITIONS if cond in s))
    matched = df[df.condition == "matched"]
    if len(matched):
        table = matched.pivot_table(index="block", columns="path_length", values="recovered", aggfunc="mean")
        lines.append("Matched loss recovered by block (rows) and path length (columns), as their figure:\n"
                     + table.round(2).to_string())
    return "\n".join(lines) + f"\n[{level():.0%} intervals: bootstrap over trees for means, Wilson for shares]"


def scrub_passes(n_layers: int, options: dict) -> float:
    """Forward rows per item: source, clean and scrubbed, per block and condition."""
    return 3 * len(CONDITIONS) * len(parse_blocks(options.get("layers") or "all", n_layers, "--layers"))
