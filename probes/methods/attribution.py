"""attribution-patching: every patch's effect on the logit difference estimated from one forward and one backward
(attribution patching: Nanda 2023; AtP in Kramar et al. 2024), the largest estimates then re-run exactly.

Pairs, sites, blocks, positions, direction and the metric are activation-patching's (patching.py): a patch writes
the source run's value of a site (resid, attn, ffn, head) at one block and position into the destination run, and
LD = logit(clean answer) - logit(corrupted answer) at the last position. To first order, the patch changes LD by

    (a_source - a_destination) . dLD/da,   the gradient taken in the destination run.

A batch of pairs runs as one forward of their source and destination prompts (left-padded), with a zero leaf added
to every site read, then one backward of the destination rows' LD: every patch of every pair at once, where exact
patching runs a row per patch. A head's estimate is its slice of the output projection's input (grouped-query
attention needs no ungrouping: the slices are the query heads'); `whole` sums the positions' (the term is linear).
Gradients flow through 8-bit and 4-bit layers and across devices as the forward does.

Verification: each pair's `--verify K` patches of largest |estimate| (`all`: every patch) are re-run exactly by the
batched engine (patch_engine.py), so rows carry both. The summary is activation-patching's on the estimates (heat
maps, the held-out best cell) and, over the verified patches, the Spearman correlation of estimate and exact effect
per pair (mean over pairs, bootstrap interval), and with `all`, how many of each pair's exact top 10 patches are in
the estimate's top 20.

Not here: AtP*'s corrections (Kramar et al.): the QK fix (attention patterns recomputed for patched queries and keys,
where the linear term misses a saturated softmax) and GradDrop (gradients with each layer's path dropped, against
effects that cancel). Where they matter, the verification shows it: an estimate far from its exact re-run."""

from __future__ import annotations

import dataclasses

import nnsight
import numpy as np
import torch

from ..errors import ProbeError
from ..models.arch import parse_blocks
from ..stats import interval_text, level, mean
from ..tasks.base import Item, answer_token, item_columns, token_ids
from .patch_engine import answer_columns, patch_list, patch_logits, site_value
from .patching import parse_sites, pairs_used, report_patching, summarize_patching
from .positions import named_positions, resolve_positions

TOP_EXACT, TOP_ESTIMATE = 10, 20  # with --verify all: the exact top 10 patches looked for in the estimate's top 20


def attribution_forward(loaded, prompts: list, good: torch.Tensor, bad: torch.Tensor, sites: list[str],
                        blocks: list[int]):
    """For left-padded `prompts` (source, destination, source, destination, ...): each row's LD (rows,) and, per
    (block, site), the first-order effect of patching each destination row's value at each column from its
    source row: (pairs, columns) per site, (pairs, columns, heads) for `head`."""
    arch = loaded.arch
    acts, leaves = {}, {}
    with torch.enable_grad(), loaded.trace(prompts, logits_to_keep=1):  # gradients, whatever the caller's mode
        for i in sorted(blocks):
            x = arch.block_input(i)
            for site in ("resid", "head", "attn", "ffn"):  # forward order within the block
                if site not in sites:
                    continue
                value = site_value(arch, i, site, x)
                acts[i, site] = value.detach().clone()
                leaves[i, site] = torch.zeros_like(value).requires_grad_(True)
                if site == "head":  # the attention kernel's output, which its backward needs unchanged
                    arch.set_heads_input(i, value + leaves[i, site])
                else:  # the same run, with a leaf whose gradient is dLD/d(value)
                    value += leaves[i, site]
        logits = loaded.model.output.logits[:, -1]
        rows = torch.arange(len(prompts), device=logits.device)
        ld = nnsight.save(logits[rows, good.to(logits.device).repeat_interleave(2)]
                          - logits[rows, bad.to(logits.device).repeat_interleave(2)])
        acts = nnsight.save(acts)
    with torch.enable_grad():
        ld[1::2].sum().backward()
    effects = {}
    for key, value in acts.items():
        term = (value[0::2] - value[1::2]).float() * leaves[key].grad[1::2].float()
        if key[1] == "head":
            term = term.view(*term.shape[:-1], arch.n_heads, -1)
        effects[key] = term.sum(-1)
    return ld.detach().float(), effects


def prepare_attribution(loaded, task, items: list[Item], options: dict):
    """activation-patching's pairs, once the model is known to give gradients at every site."""
    from .patching import prepare_patching

    cpu_4bit = [name for name, m in loaded.arch.hf.named_modules()
                if type(m).__name__ == "Linear4bit" and m.weight.device.type == "cpu"]
    if cpu_4bit:
        raise ProbeError(f"attribution-patching needs gradients through {loaded.spec.name}'s 4-bit layers, which "
                         f"bitsandbytes computes on the CPU with an inference-only kernel ({cpu_4bit[0]}); accepted: "
                         "8-bit or unquantized on the CPU, 4-bit on a GPU, or activation-patching")
    return prepare_patching(loaded, task, items, options)


def run_attribution(loaded, items: list[Item], state: dict | None = None, sites="resid", layers=None,
                    positions="all", direction: str = "denoise", verify=32) -> list[dict]:
    arch, tok = loaded.arch, loaded.tokenizer
    sites = parse_sites(sites, arch.has_ffn)
    blocks = parse_blocks(layers if layers is not None else "all", arch.n_layers, "--layers")
    prompts, good, bad = [], [], []
    for it in items:
        clean, corrupted = it.prompt, it.extra["corrupted"]
        prompts += [clean, corrupted] if direction == "denoise" else [corrupted, clean]
        good.append(answer_token(tok, it))
        bad.append(answer_token(tok, dataclasses.replace(it, answer=it.extra["corrupted_answer"])))
    ld, effects = attribution_forward(loaded, prompts, torch.tensor(good), torch.tensor(bad), sites, blocks)
    ld = ld.cpu().tolist()
    effects = {k: v.cpu() for k, v in effects.items()}  # one transfer per batch
    width = max(len(token_ids(tok, p)) for p in prompts)
    rows = []
    for b, it in enumerate(items):
        n = len(token_ids(tok, it.prompt))
        pos = resolve_positions(positions, n, named_positions(tok, it))
        patches = patch_list(sites, blocks, pos, arch.n_heads)
        shift = width - n  # left padding: the pair's token p is column shift + p
        estimate = [_estimate(effects, patch, b, shift) for patch in patches]
        chosen = _verified(estimate, verify)
        exact = {}
        if chosen:
            source, dest = prompts[2 * b], prompts[2 * b + 1]
            out = patch_logits(loaded, source, dest, [patches[k] for k in chosen],
                               reduce=lambda logits: answer_columns(logits, good[b], bad[b]))
            got = (out[:, 0] - out[:, 1]).tolist()
            exact = {k: (got[j + 2], got[0], got[1]) for j, k in enumerate(chosen)}
        gap = ld[2 * b] - ld[2 * b + 1]
        cols = {**item_columns(tok, it), "corrupted_input": it.extra["corrupted_input"], "direction": direction,
                "tokens": n, "ld_source": ld[2 * b], "ld_dest": ld[2 * b + 1]}
        for k, (site, block, p) in enumerate(patches):
            head = int(site[5:]) if site.startswith("head.") else None
            ld_exact, source_exact, dest_exact = exact.get(k, (None, None, None))
            rows.append({**cols, "site": "head" if head is not None else site, "head": head, "block": block,
                         "position": "whole" if isinstance(p, slice) else str(p),
                         "from_end": None if isinstance(p, slice) else p - n, "estimate": estimate[k],
                         "recovery": estimate[k] / gap if gap else float("nan"), "verified": k in exact,
                         "effect_exact": None if ld_exact is None else ld_exact - dest_exact,
                         "recovery_exact": (None if ld_exact is None else (ld_exact - dest_exact) / (source_exact - dest_exact)
                                            if source_exact != dest_exact else float("nan"))})
    return rows


def _estimate(effects: dict, patch: tuple, b: int, shift: int) -> float:
    """Pair b's estimated effect of one patch: its column's term, or the sum over the prompt's columns (whole)."""
    site, block, p = patch
    per = effects[block, "head"][:, :, int(site[5:])] if site.startswith("head.") else effects[block, site]
    return float(per[b, shift:].sum() if isinstance(p, slice) else per[b, shift + p])


def _verified(estimate: list[float], verify) -> list[int]:
    """The patches to re-run exactly: all, or the `verify` of largest |estimate|."""
    if verify == "all":
        return list(range(len(estimate)))
    order = np.argsort(-np.abs(np.asarray(estimate)), kind="stable")
    return sorted(int(k) for k in order[:int(verify)])


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def summarize_attribution(df, seed: int = 0) -> dict:
    """activation-patching's summary of the estimates, and how they compare with the exact re-runs (pairs whose
    source and destination logit differences differ by at least patching's MIN_GAP)."""
    out = summarize_patching(df, seed)
    v = df[df.verified.astype(bool) & df.item.isin(pairs_used(df))]
    rho = [_spearman(g.estimate.to_numpy(float), g.effect_exact.to_numpy(float)) for _, g in v.groupby("item")]
    rho = [r for r in rho if np.isfinite(r)]
    check = {"patches": int(len(v)), "pairs": int(v.item.nunique()), "every_patch": bool(df.verified.all()),
             **mean(rho, "spearman", seed=seed)}
    if check["every_patch"]:
        found = []
        for _, g in v.groupby("item"):
            top = set(g.effect_exact.abs().nlargest(TOP_EXACT).index)
            found.append(len(top & set(g.estimate.abs().nlargest(TOP_ESTIMATE).index)) / min(TOP_EXACT, len(g)))
        check.update(mean(found, "top_found", seed=seed))
    cells = v.groupby(["site", "block", "position", "head"], dropna=False)[["recovery", "recovery_exact"]].mean()
    cells = cells.reindex(cells.recovery.abs().sort_values(ascending=False).index).head(10)
    check["cells"] = [{"site": s, "block": int(b), "position": p, "head": None if h != h else int(h),
                       "estimate": float(r), "exact": float(e)} for (s, b, p, h), (r, e) in cells.iterrows()]
    out["verification"] = check
    return out


def report_attribution(df, summary) -> str:
    v = summary["verification"]
    lines = ["estimated effects (first order); every recovery below is the estimate's unless it says exact:",
             report_patching(df, summary),
             f"\nverification: {v['patches']} patches of {v['pairs']} pairs re-run exactly"
             + (" (every patch)" if v["every_patch"] else " (each pair's largest |estimate|; --verify all for every patch)"),
             f"  Spearman correlation of estimate and exact effect, per pair: {interval_text(v, 'spearman', 3)}"]
    if v["every_patch"]:
        lines.append(f"  exact top {TOP_EXACT} patches found in the estimate's top {TOP_ESTIMATE}: "
                     f"{interval_text(v, 'top_found', 2)} (share, mean over pairs)")
    if v["cells"]:
        lines.append("  largest mean estimates, against exact recovery (mean over pairs' verified patches):")
        lines += [f"    {c['site']} block {c['block']}" + (f" head {c['head']}" if c["head"] is not None else "")
                  + f" position {c['position']}: {c['estimate']:.3f} vs {c['exact']:.3f}" for c in v["cells"]]
    return "\n".join(lines) + f"\n[{level():.0%} bootstrap intervals over pairs]"


def attribution_passes(n_layers: int, options: dict) -> float:
    """Forward passes per item, for time limits: the pair's forward and backward (as 3), and the exact re-runs."""
    from .patching import patching_passes

    verify = options.get("verify", 32)
    every = patching_passes(n_layers, options) - 2
    return 3 + (every if verify == "all" else min(int(verify), every))
