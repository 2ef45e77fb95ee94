"""ffn-transplant (Merullo, Eickhoff & Pavlick): take the FFN update o of source prompts at one block and put it
into target prompts, either added to the residual stream after a block (a sweep over every block, batched) at the
last position (the default: the prompt's prefix runs once with a KV cache and only the last token is recomputed, once
per block, in one batch) or at every position (the whole prompt once per block, in one batch), or replacing the FFN
updates of a range of blocks by o (broadcast to all positions, as the paper's code does, or at the last position
only). Controls: o's coordinates shuffled, and a random direction with o's norm.

The sources (`--sources N`: the first items whose answer an FFN switches on, at their switch block) are found by
ffn-readout's stages under the chosen `--lens`; what the transplant itself reads is the model's own final logits.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import torch

from ..errors import ProbeError
from ..models.arch import parse_blocks
from ..models.devices import execution_device
from ..stats import best_of, halves, interval_text, level, mcnemar, mean, proportion
from ..tasks.base import Item, answer_token, first_token, item_columns
from .ffn_readout import last_position_updates, run_readout
from .readout import excluded_ids, rank_of, restrict, special_flags
from .tuned_lens import resolve_lens
from .option_types import parse_scales

COPY_CONTEXT = "table mug free{arg} table mug free{arg} table mug free"  # the paper's neutral copying prompt


def control_vectors(o: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """o, o with its coordinates shuffled, and a random direction with o's norm (both seeded)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(o.numel(), generator=g)
    rand = torch.randn(o.shape, generator=g, dtype=torch.float32)
    return {"o": o, "shuffled": o[perm], "random": (rand / rand.norm() * o.float().norm()).to(o.dtype)}


@dataclasses.dataclass
class Variant:
    vector: str  # "none" for the unchanged prompt, else a key of control_vectors
    blocks: tuple[int, ...] = ()
    scale: float = 1.0

    @property
    def label(self) -> str:
        if not self.blocks:
            return "-"
        return str(self.blocks[0]) if len(self.blocks) == 1 else f"{self.blocks[0]}-{self.blocks[-1]}"


def add_sweep(loaded, prompt: str, variants: list[Variant], vectors: dict, positions: str = "last") -> torch.Tensor:
    """Final logits (len(variants), vocab) of `prompt` with each variant's vector added to the residual stream
    after its block, at the last position or at `positions="all"`. At the last position the prefix runs once with a
    KV cache and the last token once for all variants in one batch, which gives exactly what one full forward pass
    per variant gives. At all positions (or on a model without a KV cache) the whole prompt runs once per variant,
    in one batch."""
    arch, tok, model = loaded.arch, loaded.tokenizer, loaded.model
    ids = tok(prompt, return_tensors="pt").input_ids
    if not loaded.remote:
        ids = ids.to(execution_device(model._module.get_input_embeddings()))
    last = ids[:, -1:].repeat(len(variants), 1)
    mask = torch.ones(len(variants), ids.shape[1], dtype=torch.long, device=ids.device)
    by_block = _rows_by_block(variants, arch.n_layers)
    # the edits are written out in each trace body (not in a helper): a remote trace's body is sent to NDIF,
    # which cannot import this package
    # at all positions, or on a model without a KV cache (this project's trained decoder, never remote): the whole
    # prompt once per variant
    if positions == "all" or not getattr(model._module, "supports_kv_cache", True):
        at = slice(None) if positions == "all" else -1
        with loaded.trace(ids.repeat(len(variants), 1)):
            for i in range(arch.n_layers):
                if by_block[i]:
                    h = arch.block_output(i)
                    for row, v in by_block[i]:
                        h[row, at] += (vectors[v.vector] * v.scale).to(h.device, h.dtype)
            logits = model.output.logits[:, -1].save()
        return logits.float()
    with loaded.session():  # one job with --remote: the prefix's KV cache stays on the server
        with model.trace(ids[:, :-1], use_cache=True):
            cache = model.output.cache  # an inner trace hands all its names to the session
        cache.batch_repeat_interleave(len(variants))
        with model.trace({"input_ids": last, "attention_mask": mask}, cache=cache, use_cache=True):
            for i in range(arch.n_layers):
                if by_block[i]:
                    h = arch.block_output(i)
                    for row, v in by_block[i]:
                        h[row, -1] += (vectors[v.vector] * v.scale).to(h.device, h.dtype)
            logits = model.output.logits[:, -1].save()
    return logits.float()


def replace_ffn(loaded, prompt: str, variants: list[Variant], vectors: dict, positions: str = "all"):
    """Final logits (len(variants), vocab) of `prompt` with the FFN updates of each variant's blocks replaced by
    its vector, at all positions (broadcast) or the last one."""
    arch = loaded.arch
    by_block = _rows_by_block(variants, arch.n_layers)
    with loaded.trace([prompt] * len(variants), logits_to_keep=1):
        for i in range(arch.n_layers):
            if by_block[i]:
                x = arch.block_input(i)
                out = arch.ffn_output(i, like=x)
                for row, v in by_block[i]:
                    value = (vectors[v.vector] * v.scale).to(out.device, out.dtype)
                    if positions == "all":
                        out[row] = value
                    else:
                        out[row, -1] = value
        logits = loaded.model.output.logits[:, -1].save()
    return logits.float()


def _rows_by_block(variants: list[Variant], n_layers: int) -> list[list]:
    by_block = [[] for _ in range(n_layers)]
    for row, v in enumerate(variants):
        for i in v.blocks:
            by_block[i].append((row, v))
    return by_block


def prepare_transplant(loaded, task, items: list[Item], options: dict):
    """Choose the source prompts and block (found under `--lens`), compute o, and build the target prompts (the other
    items)."""
    n_sources = options.get("sources") or 1
    if not isinstance(n_sources, int) or isinstance(n_sources, bool) or n_sources < 1:
        raise ProbeError(f"bad --sources {n_sources!r}; accepted: a positive number of source prompts")
    names = options.get("source_items")
    names = names.split(",") if isinstance(names, str) else names
    lens, lens_meta = resolve_lens(loaded, options.get("lens"))
    if names:
        sources = task.items(inputs=names)
    else:  # the first items (in task order) whose answer is switched on by an FFN, as ffn-readout finds it
        sources = []
        for start in range(0, len(items), 8):
            batch = items[start:start + 8]
            rows = run_readout(loaded, batch, topk=1, state=lens)
            for it in batch:
                r = next(r for r in rows if r["item"] == it.index)
                if r["switch_by"] == "ffn" and len(sources) < n_sources:
                    sources.append(dataclasses.replace(it, extra={**it.extra, "switch_block": r["switch_block"]}))
            if len(sources) >= n_sources:
                break
        if not sources:
            under = f" under --lens {options['lens']}" if lens is not None else ""
            raise ProbeError(f"no item of task {task.name!r} has its answer switched on by an FFN in "
                             f"{loaded.spec.name}{under}; pass --source-items and --source-layer"
                             + (" (with --lens logit)" if under else ""))
    layer = options.get("source_layer")
    if layer is None:  # the sources' switch blocks (the plan has refused --source-items without --source-layer)
        layer = Counter(s.extra["switch_block"] for s in sources).most_common(1)[0][0]
    layer = parse_blocks(int(layer), loaded.arch.n_layers, "--source-layer")[0]
    u = last_position_updates(loaded, [s.prompt for s in sources])
    o = u["ffn"][:, layer].mean(0)
    context = options.get("context", "copy")
    if context not in ("copy", "zero-shot"):
        raise ProbeError(f"unknown transplant context {context!r}; accepted: copy, zero-shot")
    src = {s.input for s in sources}
    targets = [dataclasses.replace(it, prompt=_target_prompt(task, it, context)) for it in items
               if it.input not in src]
    state = {"vectors": control_vectors(o.float().cpu(), seed=task.seed), "source_layer": layer}
    meta = {"source_items": sorted(src), "source_layer": layer, "o_norm": float(o.float().norm()),
            "context": context, **lens_meta}
    return targets, state, meta


def _target_prompt(task, item: Item, context: str) -> str:
    if context == "copy":
        return COPY_CONTEXT.format(arg=item.argument)
    return task.template.format(input=item.input, output=item.output)


def transplant_passes(n_layers: int, options: dict) -> float:
    """Forward passes per target prompt, for time limits: the source search (a read-out pass at most), then in add
    mode the prefix once and each variant's last token (taken as 1/20 of a pass each), or at all positions one full
    pass per variant; in replace mode one full pass per variant."""
    n_scales = len(parse_scales(options.get("scales") or (1.0,)))
    kinds = 3 if options.get("controls", True) else 1
    if options.get("mode", "add") == "add":
        share = 1 if options.get("positions") == "all" else 1 / 20
        return 2 + n_scales * kinds * len(parse_blocks(options.get("layers"), n_layers, "--layers")) * share
    return 2 + n_scales * kinds


def run_transplant(loaded, items: list[Item], state: dict, mode: str = "add", layers=None, scales=(1.0,),
                   positions: str | None = None, controls: bool = True, vocab: str | None = None) -> list[dict]:
    """positions: where o goes, last or all (default: last when added, all when it replaces FFN updates)."""
    arch, tok = loaded.arch, loaded.tokenizer
    excluded = excluded_ids(tok, vocab)
    if mode not in ("add", "replace"):
        raise ProbeError(f"unknown transplant mode {mode!r}; accepted: add, replace")
    positions = positions or ("last" if mode == "add" else "all")
    if positions not in ("all", "last"):
        raise ProbeError(f"unknown positions {positions!r}; accepted: all, last")
    vectors = state["vectors"]
    kinds = list(vectors) if controls else ["o"]
    scales = parse_scales(scales)
    if mode == "add":
        groups = [(i,) for i in parse_blocks(layers, arch.n_layers, "--layers")]
    else:  # one range of blocks, by default from the one before the source block to the last (as the paper)
        blocks = parse_blocks(layers if layers not in (None, "all") else
                               f"{max(state['source_layer'] - 1, 0)}-{arch.n_layers - 1}", arch.n_layers, "--layers")
        groups = [tuple(blocks)]
    variants = [Variant("none")] + [Variant(k, g, s) for g in groups for s in scales for k in kinds]
    rows = []
    for it in items:
        logits = restrict((add_sweep if mode == "add" else replace_ffn)(loaded, it.prompt, variants, vectors,
                                                                         positions), excluded)
        ids = torch.tensor([answer_token(tok, it)] * len(variants), device=logits.device)
        arg = torch.tensor([first_token(tok, it.argument)] * len(variants), device=logits.device)
        rank, arg_rank = rank_of(logits, ids).tolist(), rank_of(logits, arg).tolist()
        top = logits.argmax(-1).tolist()
        cols = item_columns(tok, it)
        for v, r, ar, t, sp in zip(variants, rank, arg_rank, top, special_flags(tok, top)):
            rows.append({**cols, "mode": mode, "blocks": v.label, "scale": v.scale, "vector": v.vector,
                         "answer_rank": r, "answer_rr": 1.0 / (r + 1), "top1": r == 0, "argument_rank": ar,
                         "predicted": tok.decode(t), "special_top1": sp})
    return rows


def _top1_by_variant(df):
    """Fraction of targets whose answer is top-1, per (blocks, scale) for each vector."""
    moved = df[df.vector != "none"]
    return moved.groupby(["blocks", "scale", "vector"], sort=False).top1.mean()


def summarize_transplant(df, seed: int = 0) -> dict:
    """Without o, and with o at the best (blocks, scale). The best is chosen on a seeded half of the targets and
    reported on the other half, with its controls and a paired test against no o on those same targets; the
    maximum over all targets is also given, as the maximum of K variants with its Bonferroni-adjusted interval."""
    base = df[df.vector == "none"]
    items = np.array(sorted(base.item.unique()))
    out = {"targets": int(len(items)), **proportion(int(base.top1.sum()), len(base), "baseline_top1"),
           **mean(base.answer_rr, "baseline_rr"), "best": None, "best_of_all": None}
    top = _top1_by_variant(df)
    if "o" not in set(df.vector) or len(items) < 2:
        return out
    select, report = halves(items, seed)
    chosen = _top1_by_variant(df[df.item.isin(select)]).xs("o", level="vector").idxmax()
    held = df[df.item.isin(report)].set_index(["blocks", "scale", "vector"]).sort_index()
    # a list key: a DataFrame even when one target is held out (a scalar key would give a Series)
    at = lambda vector: held.loc[[(chosen[0], chosen[1], vector)]] if (chosen[0], chosen[1], vector) in held.index else None  # noqa: E731
    with_o, none = at("o"), df[(df.vector == "none") & df.item.isin(report)].sort_values("item")
    best = {"blocks": chosen[0], "scale": float(chosen[1]), "selected_on": len(select), "reported_on": len(report),
            **proportion(int(with_o.top1.sum()), len(with_o), "top1"),
            "p_vs_none": mcnemar(with_o.sort_values("item").top1.to_numpy(), none.top1.to_numpy())}
    for control in ("shuffled", "random"):
        rows = at(control)
        best[f"{control}_top1"] = float(rows.top1.mean()) if rows is not None else None
    out["best"] = best
    o = top.xs("o", level="vector")
    k = len(o)
    peak = o.idxmax()
    peak_rows = df[(df.vector == "o") & (df.blocks == peak[0]) & (df.scale == peak[1])]
    out["best_of_all"] = {"blocks": peak[0], "scale": float(peak[1]), "of": int(k),
                          **proportion(int(peak_rows.top1.sum()), len(peak_rows), "top1", conf=best_of(k))}
    return out


def report_transplant(df, summary) -> str:
    moved = df[df.vector != "none"]
    table = moved.pivot_table(index=["blocks", "scale"], columns="vector", values="top1", aggfunc="mean",
                              sort=False)
    text = (f"answer top-1 fraction over {summary['targets']} targets, per block(s) and scale:\n"
            + table.round(3).to_string()
            + f"\n\ntargets {summary['targets']}: answer top-1 without o {interval_text(summary, 'baseline_top1')} "
            f"(mean RR {interval_text(summary, 'baseline_rr')})")
    best, peak = summary["best"], summary["best_of_all"]
    if best:
        text += (f"\nbest with o, chosen on {best['selected_on']} targets and reported on the other "
                 f"{best['reported_on']}: blocks {best['blocks']} x{best['scale']:g} -> {interval_text(best, 'top1')}"
                 f" (shuffled {best['shuffled_top1']}, random {best['random_top1']}; against no o, McNemar p = "
                 f"{best['p_vs_none']:.3g})"
                 f"\nmaximum over all {peak['of']} variants on all targets: blocks {peak['blocks']} x{peak['scale']:g}"
                 f" -> {interval_text(peak, 'top1')} (interval at the best-of-{peak['of']} level, "
                 f"{best_of(peak['of']):.4f})")
    return text + f"\n[{level():.0%} Wilson intervals; RR: bootstrap over targets]"
