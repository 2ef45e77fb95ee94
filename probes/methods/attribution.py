"""attribution-patching: every patch's effect on the logit difference estimated from one forward and one backward
(attribution patching: Nanda 2023; AtP in Kramar et al. 2024), the largest estimates then re-run exactly.

Pairs, sites, blocks, positions, direction and the metric are activation-patching's (patching.py): a patch writes
the source run's value of a site (resid, attn, ffn, head) at one block and position into the destination run, and
LD = logit(clean answer) - logit(corrupted answer) at the last position (in float32, patch_engine's
`logit_difference`). To first order, the patch changes LD by

    (a_source - a_destination) . dLD/da,   the gradient taken in the destination run.

A batch of pairs runs as one forward of their source and destination prompts (left-padded), with a zero leaf added
to every site read, then one backward of the destination rows' LD (GradDrop: one per block): every patch of every
pair at once, where exact patching runs a row per patch. A head's estimate is its slice of the output projection's
input (grouped-query attention needs no ungrouping: the slices are the query heads'); `whole` sums the positions'
(the term is linear; the QK fix of every position at once is its own).
Gradients flow through 8-bit and 4-bit layers and across devices as the forward does.

Verification: each pair's `--verify K` patches of largest |estimate| (`all`: every patch) are re-run exactly by the
batched engine (patch_engine.py), so rows carry both. The summary is activation-patching's on the estimates (heat
maps, the held-out best cell) and, over the verified patches, the Spearman correlation of estimate and exact effect
per pair (mean over pairs, bootstrap interval), with `all` how many of each pair's exact top 10 patches are in the
estimate's top 20, and the cells of largest mean estimate against their exact mean (a cell as in the heat maps:
site, block, head, position from the end, since pairs differ in length).

AtP*'s corrections (Kramar et al. 2024; atp_star.py): `--qk-fix` computes exactly how a resid patch changes its
block's attention probabilities (the linear term misses a saturated softmax), and `--graddrop` scores each patch by
its mean |estimate| over backward passes that each drop one block's gradient (effects that cancel); with both,
AtP*. Where they are not enough, the verification shows it: an estimate far from its exact re-run."""

from __future__ import annotations

import contextlib
import dataclasses

import nnsight
import numpy as np
import torch

from ..errors import ProbeError
from ..models.arch import parse_blocks
from ..models.attention_record import recording
from ..stats import interval_text, level, mean
from ..tasks.base import Item, answer_token, item_columns, token_ids
from .atp_star import check_fixes, gradient_passes, linear_qk, qk_correction
from .patch_engine import answer_columns, first_difference, logit_difference, patch_list, patch_logits, site_value
from .patching import parse_sites, pairs_used, report_patching, summarize_patching
from .positions import named_positions, resolve_positions

ESTIMATORS = {(False, False): "AtP", (True, False): "AtP + QK fix", (False, True): "AtP + GradDrop",
              (True, True): "AtP* (QK fix + GradDrop)"}
UNSIGNED = {ESTIMATORS[qk, True] for qk in (False, True)}  # GradDrop's scores have no sign
TOP_EXACT, TOP_ESTIMATE = 10, 20  # with --verify all: the exact top 10 patches looked for in the estimate's top 20


def attribution_forward(loaded, prompts: list, good: torch.Tensor, bad: torch.Tensor, sites: list[str],
                        blocks: list[int], shifts: list[int], qk_fix: bool = False, graddrop: bool = False):
    """For left-padded `prompts` (source, destination, source, destination, ...; pair b's padding `shifts[b]`):
    each row's LD (rows,) and the gradient passes' estimates as [(weight, effects)]: one pass (AtP, with
    `qk_fix` AtP*'s QK fix), or with `graddrop` one per dropped block (atp_star.py). `effects` holds, per (block,
    site), the first-order effect of patching each destination row's value at each column from its source row:
    (pairs, columns) per site, (pairs, columns, heads) for `head`; and per (block, 'resid', 'qk') what the QK fix
    adds to each (pairs, columns), per (block, 'resid', 'whole') to the patch of every position at once (pairs,)."""
    arch = loaded.arch
    acts, leaves, drop, starts = {}, {}, {"block": None}, {}
    first = min(blocks)
    walk = range(first, arch.n_layers) if graddrop else sorted(blocks)
    with (recording(arch) if qk_fix else contextlib.nullcontext({})) as rec, torch.enable_grad(), \
            loaded.trace(prompts, logits_to_keep=1):  # gradients, whatever the caller's mode
        for i in walk:
            x = starts[i] = arch.block_input(i)  # its resid leaf is added in place: where GradDrop's pass i-1 starts
            for site in ("resid", "head", "attn", "ffn"):  # forward order within the block
                patched = i in blocks and site in sites
                dropped = graddrop and (site == "attn" or site == "ffn" and arch.has_ffn)
                if not (patched or dropped):
                    continue
                # a dropped-only update is hooked on its module's own output (OPT's flat FFN output, not a view)
                value = site_value(arch, i, site, x) if patched else arch.update_output(i, site)
                if patched:
                    acts[i, site] = value.detach().clone()
                    leaves[i, site] = torch.zeros_like(value).requires_grad_(True)
                    if site == "resid":  # the same run, with a leaf whose gradient is dLD/d(value)
                        value += leaves[i, site]
                    else:  # out of place: the attention kernel's backward needs its output unchanged, and a
                        value = value + leaves[i, site]  # quantized layer's output may be a view autograd guards
                        arch.set_heads_input(i, value) if site == "head" else arch.set_update(i, site, value)
                if dropped and value.requires_grad:  # block i's contribution to the residual, dropped in pass i
                    value.register_hook(lambda g, i=i: torch.zeros_like(g) if drop["block"] == i else g)
        ld = nnsight.save(logit_difference(loaded.model.output.logits[:, -1], good.repeat_interleave(2),
                                           bad.repeat_interleave(2)))
        acts = nnsight.save(acts)
    delta = {key: value[0::2] - value[1::2] for key, value in acts.items()}
    fixed = [i for i in blocks if qk_fix and (i, "resid") in leaves]
    if set(fixed) - set(rec):
        raise ProbeError(f"--qk-fix: block {min(set(fixed) - set(rec))}'s attention was not recorded (it bypasses "
                         "transformers' attention interface); accepted: attribution-patching without --qk-fix")
    with torch.enable_grad():
        moved = {}
        for i in fixed:  # the queries' and keys' first-order move, with the block input moved in destination rows
            tangent = torch.zeros_like(acts[i, "resid"])
            tangent[1::2] = delta[i, "resid"]
            moved[i] = linear_qk(rec[i], leaves[i, "resid"], tangent)
        named = {**{("leaf", key): value for key, value in leaves.items()},
                 **{("probs", i): rec[i].probs for i in fixed}}
        passes = []
        for weight, grads in gradient_passes(ld[1::2].sum(), named, starts, drop, first, arch.n_layers, graddrop,
                                             arch.independent_layers):
            effects = {}
            for key in leaves:
                term = delta[key].float() * grads["leaf", key][1::2].float()
                if key[1] == "head":
                    term = term.view(*term.shape[:-1], arch.n_heads, -1)
                effects[key] = term.sum(-1)
            for i in fixed:
                one = effects[i, "resid", "qk"] = torch.zeros_like(effects[i, "resid"])
                whole = effects[i, "resid", "whole"] = torch.zeros(len(shifts), device=one.device)
                for b, shift in enumerate(shifts):
                    per, whole[b] = qk_correction(rec[i], grads["probs", i], *moved[i], (2 * b, 2 * b + 1), shift)
                    one[b, shift:] = per.to(one.device)
            passes.append((weight, {k: v.detach().cpu() for k, v in effects.items()}))  # one transfer per pass
    return ld.detach(), passes


def prepare_attribution(loaded, task, items: list[Item], options: dict):
    """activation-patching's pairs, once the model is known to give gradients at every site."""
    from .patching import prepare_patching

    if loaded.remote:
        raise ProbeError("attribution-patching takes gradients after the trace, which a remote (NDIF) trace does not "
                         "return; accepted: a local model, or activation-patching with --remote")
    cpu_4bit = [name for name, m in loaded.arch.hf.named_modules()
                if type(m).__name__ == "Linear4bit" and m.weight.device.type == "cpu"]
    if cpu_4bit:
        raise ProbeError(f"attribution-patching needs gradients through {loaded.spec.name}'s 4-bit layers, which "
                         f"bitsandbytes computes on the CPU with an inference-only kernel ({cpu_4bit[0]}); accepted: "
                         "8-bit or unquantized on the CPU, 4-bit on a GPU, or activation-patching")
    check_fixes(loaded, options)
    return prepare_patching(loaded, task, items, options)


def run_attribution(loaded, items: list[Item], state: dict | None = None, sites="resid", layers=None,
                    positions="all", direction: str = "denoise", verify=32, qk_fix: bool = False,
                    graddrop: bool = False) -> list[dict]:
    arch, tok = loaded.arch, loaded.tokenizer
    sites = parse_sites(sites, arch.has_ffn)
    blocks = parse_blocks(layers if layers is not None else "all", arch.n_layers, "--layers")
    prompts, good, bad = [], [], []
    for it in items:
        clean, corrupted = it.prompt, it.extra["corrupted"]
        prompts += [clean, corrupted] if direction == "denoise" else [corrupted, clean]
        good.append(answer_token(tok, it))
        bad.append(answer_token(tok, dataclasses.replace(it, answer=it.extra["corrupted_answer"])))
    width = max(len(token_ids(tok, p)) for p in prompts)
    shifts = [width - len(token_ids(tok, it.prompt)) for it in items]  # left padding: token p is column shift + p
    ld, passes = attribution_forward(loaded, prompts, torch.tensor(good), torch.tensor(bad), sites, blocks, shifts,
                                     qk_fix, graddrop)
    ld = ld.cpu().tolist()
    dropped = max(arch.n_layers - 1, 1)  # GradDrop's mean: a patch inside a block scores zero in that block's pass
    estimator = ESTIMATORS[qk_fix, graddrop]
    rows = []
    for b, it in enumerate(items):
        n = len(token_ids(tok, it.prompt))
        pos = resolve_positions(positions, n, named_positions(tok, it))
        patches = patch_list(sites, blocks, pos, arch.n_heads)
        shift = shifts[b]
        estimate = [_estimate(passes[0][1], patch, b, shift) if not graddrop
                    else sum(w * abs(_estimate(e, patch, b, shift)) for w, e in passes) / dropped for patch in patches]
        chosen = _verified(estimate, verify)
        exact = {}
        if chosen:
            source, dest = prompts[2 * b], prompts[2 * b + 1]
            out = patch_logits(loaded, source, dest, [patches[k] for k in chosen],
                               reduce=lambda logits: answer_columns(logits, good[b], bad[b]))
            got = out[:, 0].tolist()
            exact = {k: (got[j + 2], got[0], got[1]) for j, k in enumerate(chosen)}
        gap = ld[2 * b] - ld[2 * b + 1]
        start = first_difference(loaded, prompts[2 * b], prompts[2 * b + 1])
        cols = {**item_columns(tok, it), "corrupted_input": it.extra["corrupted_input"], "direction": direction,
                "tokens": n, "ld_source": ld[2 * b], "ld_dest": ld[2 * b + 1], "estimator": estimator}
        scale = abs(gap) if graddrop else gap  # a GradDrop score has no sign
        for k, (site, block, p) in enumerate(patches):
            head = int(site[5:]) if site.startswith("head.") else None
            ld_exact, source_exact, dest_exact = exact.get(k, (None, None, None))
            rows.append({**cols, "site": "head" if head is not None else site, "head": head, "block": block,
                         "position": "whole" if isinstance(p, slice) else str(p),
                         "from_end": None if isinstance(p, slice) else p - n, "estimate": estimate[k],
                         "changes": isinstance(p, slice) or p >= start,
                         "recovery": estimate[k] / scale if gap else None, "verified": k in exact,
                         "effect_exact": None if ld_exact is None else ld_exact - dest_exact,
                         "recovery_exact": (None if ld_exact is None else (ld_exact - dest_exact) / (source_exact - dest_exact)
                                            if source_exact != dest_exact else None)})
    return rows


def _estimate(effects: dict, patch: tuple, b: int, shift: int) -> float:
    """Pair b's estimated effect of one patch: its column's term, or the sum over the prompt's columns (whole)."""
    site, block, p = patch
    per = effects[block, "head"][:, :, int(site[5:])] if site.startswith("head.") else effects[block, site]
    if isinstance(p, slice):  # the terms add up, but the QK fix of every position at once is its own
        whole = effects.get((block, site, "whole"))
        return float(per[b, shift:].sum() + (whole[b] if whole is not None else 0))
    fix = effects.get((block, site, "qk"))
    return float(per[b, shift + p] + (fix[b, shift + p] if fix is not None else 0))


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
    if "changes" in v:  # patches before the first token where the pair differs change nothing, exactly or estimated
        v = v[v.changes.astype(bool)]
    estimator = str(df.estimator.iloc[0]) if "estimator" in df and len(df) else ESTIMATORS[False, False]
    unsigned = estimator in UNSIGNED

    def spearman(magnitudes: bool) -> list[float]:
        """Per pair: the estimate's ranking against the exact effect's (a GradDrop score has no sign: |exact|)."""
        rho = [_spearman((g.estimate.abs() if magnitudes else g.estimate).to_numpy(float),
                         (g.effect_exact.abs() if magnitudes or unsigned else g.effect_exact).to_numpy(float))
               for _, g in v.groupby("item")]
        return [r for r in rho if np.isfinite(r)]

    rho = spearman(False)
    rho_abs = rho if unsigned else spearman(True)  # the magnitudes' ranking, comparable across estimators
    check = {"estimator": estimator, "unsigned": unsigned, "patches": int(len(v)), "pairs": int(v.item.nunique()),
             "every_patch": bool(df.verified.all()),
             **mean(rho, "spearman", seed=seed), **mean(rho_abs, "spearman_abs", seed=seed)}
    if check["every_patch"]:
        found = []
        for _, g in v.groupby("item"):
            top = set(g.effect_exact.abs().nlargest(TOP_EXACT).index)
            found.append(len(top & set(g.estimate.abs().nlargest(TOP_ESTIMATE).index)) / min(TOP_EXACT, len(g)))
        check.update(mean(found, "top_found", seed=seed))
    v = v.assign(recovery_exact=v.recovery_exact.abs()) if unsigned else v
    # a cell is the heat map's: its position counted from the end (pairs differ in length; NaN: every position)
    cells = v.groupby(["site", "block", "from_end", "head"], dropna=False)[["recovery", "recovery_exact"]].mean()
    cells = cells.reindex(cells.recovery.abs().sort_values(ascending=False).index).head(10)
    check["cells"] = [{"site": s, "block": int(b), "from_end": None if p != p else int(p),
                       "head": None if h != h else int(h), "estimate": float(r), "exact": float(e)}
                      for (s, b, p, h), (r, e) in cells.iterrows()]
    out["verification"] = check
    return out


def report_attribution(df, summary) -> str:
    v = summary["verification"]
    lines = [f"estimated effects ({v['estimator']}"
             + ("; unsigned scores, against |exact|" if v["unsigned"] else "; first order")
             + "); every recovery below is the estimate's unless it says exact:",
             report_patching(df, summary),
             f"\nverification: {v['patches']} patches of {v['pairs']} pairs re-run exactly"
             + (" (every patch)" if v["every_patch"]
                else " (each pair's largest |estimate|; --verify all for every patch)")
             + "; compared where a patch can change anything (from the first token where the pair differs)",
             f"  Spearman correlation of estimate and {'|exact| ' if v['unsigned'] else 'exact '}effect, per pair: "
             f"{interval_text(v, 'spearman', 3)}"]
    if not v["unsigned"]:
        lines.append(f"  of |estimate| and |exact effect|: {interval_text(v, 'spearman_abs', 3)}")
    if v["every_patch"]:
        lines.append(f"  exact top {TOP_EXACT} patches found in the estimate's top {TOP_ESTIMATE}: "
                     f"{interval_text(v, 'top_found', 2)} (share, mean over pairs)")
    if v["cells"]:
        lines.append("  largest mean estimates, against exact recovery (by site, block and position from the end, as "
                     "the heat maps; mean over pairs' verified patches):")
        lines += [f"    {c['site']} block {c['block']}" + (f" head {c['head']}" if c["head"] is not None else "")
                  + (" every position" if c["from_end"] is None else f" position {c['from_end']} from the end")
                  + f": {c['estimate']:.3f} vs {c['exact']:.3f}" for c in v["cells"]]
    return "\n".join(lines) + f"\n[{level():.0%} bootstrap intervals over pairs]"


def attribution_passes(n_layers: int, options: dict) -> float:
    """Forward passes per item, for time limits: the pair's forward and backward(s), and the exact re-runs."""
    from .patching import patching_passes

    verify = options.get("verify", 32)
    every = patching_passes(n_layers, options) - 2
    # a backward costs about two forwards; GradDrop's passes together about one per block (started part-way); the
    # QK fix about one more backward for its queries' and keys' first-order move
    backward = (n_layers if options.get("graddrop") else 2) + (2 if options.get("qk_fix") else 0)
    return 1 + backward + (every if verify == "all" else min(int(verify), every))
