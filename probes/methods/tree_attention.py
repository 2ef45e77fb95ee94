"""The attention probe on tree tasks (Brinkmann et al.'s attention tables along the path): per layer and head, where
the last position of each path step's prompt (the root at step 0, then each path token) attends.

Every key position has a role: `goal`, `bar`, `colon`, `root`, `path` (path tokens generated so far), `comma`,
`edge_up<k>` (the target token ">v" of the edge into the node k steps up the path from the goal), `source_up<k>`
(that edge's source token: the node k+1 up), `edge` and `source` (the tokens of edges off the path). Backward
chaining as the authors describe it predicts a diagonal: layer 0 reads the goal, layer l >= 1 the edge into the node
l-1 steps up (`edge_up<l-1>`, whose position holds that edge's parent after layer 0), one level per layer. Per row:
the role of the top key, the mass on the predicted position and what uniform attention would give it, and the mass
on each role. Tokens map to the task's words through the tokenizer's offsets, so any tokenizer works.
"""

from __future__ import annotations

import bisect
import json

import numpy as np

from ..stats import interval_text, level, mean, proportion
from ..tasks.base import Item, item_columns

GROUPS = {"first": "the root (step 0)", "later": "path tokens (steps 1 on)"}


def word_roles(item: Item) -> list[str]:
    """The role of each word of a tree item's prompt (see the module docstring)."""
    words = item.prompt.split(" ")
    path = [int(v) for v in item.extra["path"].split()]
    up = {v: len(path) - 1 - i for i, v in enumerate(path)}  # node -> steps up from the goal
    start = words.index(":") + 1  # the root
    roles = []
    for i in range(start - 3):  # the edges "A >B ,"
        if i % 3 == 2:
            roles.append("comma")
            continue
        target = int(words[i - i % 3 + 1][1:])  # a path node's one edge in comes from its path parent
        kind = "edge" if i % 3 == 1 else "source"
        roles.append(f"{kind}_up{up[target]}" if target in up else kind)
    return roles + ["bar", "goal", "colon", "root"] + ["path"] * (len(words) - start - 1)


def chain_role(layer: int) -> str:
    """The role backward chaining reads at `layer`: the goal, then the edge into the node layer-1 steps up."""
    return "goal" if layer == 0 else f"edge_up{layer - 1}"


def token_role(prompt: str, start: int, end: int, starts: list[int], by_word: list[str]) -> str:
    """A token's word's role, its offsets (start, end) past any leading space (byte-level BPE puts the space in the
    token: 'Ġ>' spans ' >'); a special token with no text (BOS) has a role of its own."""
    while start < end and prompt[start].isspace():
        start += 1
    if start == end:
        return "special"
    return by_word[bisect.bisect_right(starts, start) - 1]


def run_path_attention(loaded, items: list[Item], attention_weights) -> list[dict]:
    """Rows per item, layer and head (`attention_weights`: attention.py's, eager attention of one prompt)."""
    tok = loaded.tokenizer
    rows = []
    for it in items:
        words = it.prompt.split(" ")
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).tolist()
        offsets = tok(it.prompt, return_offsets_mapping=True)["offset_mapping"]
        by_word = word_roles(it)
        roles = [token_role(it.prompt, a, b, starts, by_word) for a, b in offsets]
        cols = item_columns(tok, it)  # with the tree, step and path length
        for layer, w in enumerate(attention_weights(loaded, it.prompt)):
            query = w[:, -1, :].cpu().numpy()  # (heads, keys): the last position's row
            want = chain_role(layer)
            for h, row in enumerate(query):
                masses: dict[str, float] = {}
                for role, m in zip(roles, row.tolist()):
                    masses[role] = masses.get(role, 0.0) + m
                top = int(row.argmax())
                has = want in masses  # edge_up<k> only where the path has k + 1 edges
                rows.append({**cols, "layer": layer, "head": h, "top_role": roles[top], "top_mass": float(row[top]),
                             "chain_role": want, "chain_mass": masses[want] if has else None,
                             "chain_top": float(roles[top] == want) if has else None,
                             "uniform_mass": roles.count(want) / len(roles) if has else None,
                             "role_mass": json.dumps(masses)})
    return rows


def role_means(df) -> dict[str, float]:
    """The mean mass on each role over the rows (a role absent from a row counts 0 there)."""
    masses = [json.loads(x) for x in df.role_mass]
    roles = sorted({r for m in masses for r in m})
    return {r: float(np.mean([m.get(r, 0.0) for m in masses])) for r in roles}


def summarize_path_attention(df, seed: int = 0) -> dict:
    """Per step group (the root, later path tokens), layer and head: how often the top key is the one backward
    chaining predicts (over the items that have it) and the mean mass on it against uniform attention's, the
    commonest top-key roles, and the mean mass per role."""
    out = {}
    for group, g in (("first", df[df.step == 0]), ("later", df[df.step > 0])):
        heads = {}
        for (layer, head), h in g.groupby(["layer", "head"]):
            has = h[h.chain_mass.notna()]
            top = h.top_role.value_counts(normalize=True)
            heads[f"L{layer}H{head}"] = {
                "layer": int(layer), "head": int(head), "chain_role": h.chain_role.iloc[0],
                **proportion(int(has.chain_top.sum()), len(has), "chain_top"),
                **mean(has.chain_mass.astype(float), "chain_mass", seed=seed),
                "uniform_mass": float(has.uniform_mass.mean()) if len(has) else None,
                "top_roles": {str(r): float(v) for r, v in top.head(3).items()},
                "role_mass": role_means(h)}
        if heads:
            out[group] = {"items": int(g.item.nunique()), "heads": heads}
    return {"path_attention": out}


def report_path_attention(df, summary) -> str:
    t = lambda d, k: interval_text(d, k, digits=2)  # noqa: E731
    lines = []
    for group, s in summary["path_attention"].items():
        lines.append(f"{GROUPS[group]}, {s['items']} items: the last position's top key per layer and head "
                     "(backward chaining reads the goal at layer 0, then edge_up<l-1> at layer l):")
        for h in s["heads"].values():
            common = ", ".join(f"{r} {v:.2f}" for r, v in h["top_roles"].items())
            chain = (f"{h['chain_role']} is the top key in {t(h, 'chain_top')}, its mass {t(h, 'chain_mass')} "
                     f"(uniform {h['uniform_mass']:.2f})") if h["chain_top_n"] else f"no item has {h['chain_role']}"
            lines.append(f"  layer {h['layer']} head {h['head']}: {chain}; top keys: {common}")
    return "\n".join(lines) + f"\n[{level():.0%} intervals: Wilson for shares, bootstrap over items for masses]"
