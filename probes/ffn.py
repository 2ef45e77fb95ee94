"""FFN probes of the vector-arithmetic paper (Merullo, Eickhoff & Pavlick): read out, transplant and ablate FFN
updates. "FFN update" and layer numbers are those of probes/arch.py: block i's FFN moves residual index i (after
block i's attention) to residual index i + 1.

- ffn-readout: per prompt and block, the FFN update at the last position decoded through final norm and
  unembedding, its norm, and how it moves the answer's lens logit; per prompt, the stages: where the argument
  and the answer first become top-1 in the residual lens, and whether an FFN or an attention update made the
  answer top-1 (the paper's function application).
- ffn-transplant: take the FFN update o of source prompts at one block and put it into target prompts, either
  added to the residual stream after a block at the last position (a sweep over every block, batched: the
  prompt's prefix runs once with a KV cache and only the last token is recomputed, once per block, in one
  batch), or replacing the FFN updates of a range of blocks by o (broadcast to all positions, as the paper's
  code does, or at the last position only). Controls: o's coordinates shuffled, and a random direction with o's
  norm.
- ffn-ablation: zero the FFN updates of chosen blocks, or the paper's identity replacement (the update becomes
  the FFN's normalised input, as if the MLP were the identity; not the same as zeroing), or remove FFNs from the
  top down in sixths of the network.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import nnsight
import numpy as np
import torch

from .arch import execution_device
from .errors import ProbeError
from .lens import lens_tensors, rank_of, stats_rows, target_ids
from .tasks import Item, answer_token, first_token, item_columns

COPY_CONTEXT = "table mug free{arg} table mug free{arg} table mug free"  # the paper's neutral copying prompt


# --- reading --------------------------------------------------------------------------------------------------
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


def run_readout(loaded, items: list[Item], topk: int = 5) -> list[dict]:
    """Decoded inside the trace, as the lens: only ranks, logits, top-k ids and norms leave the model."""
    arch, tok = loaded.arch, loaded.tokenizer
    targets = target_ids(loaded, items)
    with loaded.trace([it.prompt for it in items], logits_to_keep=1):
        u = updates_in_trace(arch)
        mid = u["resid"][:, :-1] + u["attn"]  # after block i's attention, before its FFN
        stats = nnsight.save({"lens": lens_tensors(arch, u["resid"], targets, 1, logit=True),
                              "before": lens_tensors(arch, mid, targets, 1, logit=True),
                              "ffn": lens_tensors(arch, u["ffn"], targets, topk),
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


def summarize_readout(df) -> dict:
    per = df.groupby("item").first()
    switched = per.dropna(subset=["switch_block"])
    out = {"items": int(len(per)), "accuracy": float(per.correct.mean()),
           "argument_top1_layer": _median(per.argument_top1_layer), "answer_top1_layer": _median(per.answer_top1_layer),
           "argument_first": float(per.argument_first.mean()),
           "switch_by_ffn": float((switched.switch_by == "ffn").mean()) if len(switched) else None,
           "switch_block_mode": int(switched.switch_block.mode().iloc[0]) if len(switched) else None}
    ffn_switch = switched[switched.switch_by == "ffn"]
    out["ffn_switch_block_mode"] = int(ffn_switch.switch_block.mode().iloc[0]) if len(ffn_switch) else None
    return out


def report_readout(df, summary) -> str:
    per_block = df.groupby("block").agg(ffn_norm=("ffn_norm", "mean"),
                                        ffn_answer_top1=("ffn_answer_rank", lambda r: (r == 0).mean()),
                                        answer_logit_delta=("answer_logit_delta", "mean"),
                                        answer_top1_after=("answer_rank_after_ffn", lambda r: (r == 0).mean()))
    per = df.groupby("item").first()
    counts = per[per.switch_by == "ffn"].switch_block.value_counts().sort_index()
    return (per_block.round(3).to_string()
            + f"\n\nitems {summary['items']}  accuracy {summary['accuracy']:.3f}  argument first top-1 at "
            f"{summary['argument_top1_layer']}, answer at {summary['answer_top1_layer']} (median residual index)"
            f"\nargument before answer in {summary['argument_first']:.0%} of items; the switch to the answer is made"
            f" by an FFN in {_pct(summary['switch_by_ffn'])} of switches; FFN switch blocks: "
            + (", ".join(f"{int(k)}: {v}" for k, v in counts.items()) or "none"))


def _median(s):
    s = s.dropna()
    return float(s.median()) if len(s) else None


def _pct(x):
    return "n/a" if x is None else f"{x:.0%}"


# --- writing --------------------------------------------------------------------------------------------------
def _parse_blocks(value, n_layers: int, what: str) -> list[int]:
    """'all', '3', '3,5', '10-17' or a list -> block indices, checked against the model."""
    if value in (None, "all"):
        return list(range(n_layers))
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        out = []
        for part in value.split(","):
            a, sep, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
        value = out
    bad = [v for v in value if not 0 <= int(v) < n_layers]
    if bad:
        raise ProbeError(f"{what} {bad[0]} out of range; accepted: blocks 0 to {n_layers - 1}")
    return [int(v) for v in value]


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


def add_sweep(loaded, prompt: str, variants: list[Variant], vectors: dict) -> torch.Tensor:
    """Final logits (len(variants), vocab) of `prompt` with each variant's vector added to the residual stream
    after its block, at the last position. The prefix runs once with a KV cache; the last token runs once for
    all variants in one batch, which gives exactly what one full forward pass per variant gives."""
    arch, tok, model = loaded.arch, loaded.tokenizer, loaded.model
    ids = tok(prompt, return_tensors="pt").input_ids
    if not loaded.remote:
        ids = ids.to(execution_device(model._module.get_input_embeddings()))
    last = ids[:, -1:].repeat(len(variants), 1)
    mask = torch.ones(len(variants), ids.shape[1], dtype=torch.long, device=ids.device)
    by_block = _rows_by_block(variants, arch.n_layers)
    with loaded.session():  # one job with --remote: the prefix's KV cache stays on the server
        with model.trace(ids[:, :-1], use_cache=True):
            cache = model.output.past_key_values  # an inner trace hands all its names to the session
        cache.batch_repeat_interleave(len(variants))
        with model.trace({"input_ids": last, "attention_mask": mask}, past_key_values=cache, use_cache=True):
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
    """Choose the source prompts and block, compute o, and build the target prompts (the other items)."""
    n_sources = int(options.get("sources") or 1)
    names = options.get("source_items")
    names = names.split(",") if isinstance(names, str) else names
    if names:
        sources = task.items(inputs=names)
    else:  # the first items (in task order) whose answer is switched on by an FFN, as ffn-readout finds it
        sources = []
        for start in range(0, len(items), 8):
            batch = items[start:start + 8]
            rows = run_readout(loaded, batch, topk=1)
            for it in batch:
                r = next(r for r in rows if r["item"] == it.index)
                if r["switch_by"] == "ffn" and len(sources) < n_sources:
                    sources.append(dataclasses.replace(it, extra={**it.extra, "switch_block": r["switch_block"]}))
            if len(sources) >= n_sources:
                break
        if not sources:
            raise ProbeError(f"no item of task {task.name!r} has its answer switched on by an FFN in "
                             f"{loaded.spec.name}; pass --source-items and --source-layer")
    layer = options.get("source_layer")
    if layer is None:
        found = [s.extra.get("switch_block") for s in sources if s.extra.get("switch_block") is not None]
        if not found:
            raise ProbeError("--source-layer is needed with --source-items (no FFN switch to default to)")
        layer = Counter(found).most_common(1)[0][0]
    layer = _parse_blocks(int(layer), loaded.arch.n_layers, "--source-layer")[0]
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
            "context": context}
    return targets, state, meta


def _target_prompt(task, item: Item, context: str) -> str:
    if context == "copy":
        return COPY_CONTEXT.format(arg=item.argument)
    if not hasattr(task, "template"):
        raise ProbeError(f"task {task.name!r} has no template for zero-shot targets; use --context copy")
    return task.template.format(input=item.input, output=item.output)


def transplant_passes(n_layers: int, options: dict) -> float:
    """Forward passes per target prompt, for time limits: the source search (a read-out pass at most), then in add
    mode the prefix once and each variant's last token (taken as 1/20 of a pass each); in replace mode one full
    pass per variant."""
    scales = options.get("scales") or (1.0,)
    n_scales = len(scales.split(",") if isinstance(scales, str) else scales)
    kinds = 3 if options.get("controls", True) else 1
    if options.get("mode", "add") == "add":
        return 2 + n_scales * kinds * len(_parse_blocks(options.get("layers"), n_layers, "--layers")) / 20
    return 2 + n_scales * kinds


def run_transplant(loaded, items: list[Item], state: dict, mode: str = "add", layers=None, scales=(1.0,),
                   positions: str = "all", controls: bool = True) -> list[dict]:
    arch, tok = loaded.arch, loaded.tokenizer
    if mode not in ("add", "replace"):
        raise ProbeError(f"unknown transplant mode {mode!r}; accepted: add, replace")
    if positions not in ("all", "last"):
        raise ProbeError(f"unknown positions {positions!r}; accepted: all, last")
    vectors = state["vectors"]
    kinds = list(vectors) if controls else ["o"]
    scales = [float(s) for s in (scales.split(",") if isinstance(scales, str) else scales)]
    if mode == "add":
        groups = [(i,) for i in _parse_blocks(layers, arch.n_layers, "--layers")]
    else:  # one range of blocks, by default from the one before the source block to the last (as the paper)
        blocks = _parse_blocks(layers if layers not in (None, "all") else
                               f"{max(state['source_layer'] - 1, 0)}-{arch.n_layers - 1}", arch.n_layers, "--layers")
        groups = [tuple(blocks)]
    variants = [Variant("none")] + [Variant(k, g, s) for g in groups for s in scales for k in kinds]
    rows = []
    for it in items:
        logits = (add_sweep if mode == "add" else replace_ffn)(
            loaded, it.prompt, variants, vectors, **({} if mode == "add" else {"positions": positions}))
        ids = torch.tensor([answer_token(tok, it)] * len(variants), device=logits.device)
        arg = torch.tensor([first_token(tok, it.argument)] * len(variants), device=logits.device)
        rank, arg_rank = rank_of(logits, ids).tolist(), rank_of(logits, arg).tolist()
        top = logits.argmax(-1).tolist()
        cols = item_columns(tok, it)
        for v, r, ar, t in zip(variants, rank, arg_rank, top):
            rows.append({**cols, "mode": mode, "blocks": v.label, "scale": v.scale, "vector": v.vector,
                         "answer_rank": r, "answer_rr": 1.0 / (r + 1), "top1": r == 0, "argument_rank": ar,
                         "predicted": tok.decode(t)})
    return rows


def summarize_transplant(df) -> dict:
    base = df[df.vector == "none"]
    moved = df[df.vector != "none"]
    table = moved.groupby(["blocks", "scale", "vector"], sort=False).agg(top1=("top1", "mean"),
                                                                         rr=("answer_rr", "mean"))
    o = table.xs("o", level="vector") if "o" in set(moved.vector) else table.iloc[:0]
    best = o.top1.idxmax() if len(o) else None
    return {"targets": int(base.item.nunique()), "baseline_top1": float(base.top1.mean()),
            "baseline_rr": float(base.answer_rr.mean()),
            "best": {"blocks": best[0], "scale": best[1], "top1": float(o.top1.max()),
                     "shuffled_top1": float(table.loc[(best[0], best[1], "shuffled")].top1)
                     if (best[0], best[1], "shuffled") in table.index else None,
                     "random_top1": float(table.loc[(best[0], best[1], "random")].top1)
                     if (best[0], best[1], "random") in table.index else None} if best else None}


def report_transplant(df, summary) -> str:
    moved = df[df.vector != "none"]
    table = moved.pivot_table(index=["blocks", "scale"], columns="vector", values="top1", aggfunc="mean",
                              sort=False)
    best = summary["best"]
    return (table.round(3).to_string()
            + f"\n\ntargets {summary['targets']}: answer top-1 without o {summary['baseline_top1']:.3f} "
            f"(mean RR {summary['baseline_rr']:.3f})"
            + (f"; best with o: blocks {best['blocks']} x{best['scale']:g} -> {best['top1']:.3f} "
               f"(shuffled {best['shuffled_top1']}, random {best['random_top1']})" if best else ""))


def ablate(loaded, prompts: list[str], variants: list[tuple[int, ...]], how: str = "zero") -> torch.Tensor:
    """Final logits (len(prompts) * len(variants), vocab): every prompt once per variant (a set of blocks whose
    FFN updates are zeroed, or replaced by the FFN's input for how='identity'), all in one batch."""
    if how not in ("zero", "identity"):
        raise ProbeError(f"unknown ablation {how!r}; accepted: zero, identity")
    arch = loaded.arch
    batch = [p for p in prompts for _ in variants]
    rows = [[r for r in range(len(batch)) if i in variants[r % len(variants)]] for i in range(arch.n_layers)]
    with loaded.trace(batch, logits_to_keep=1):
        for i in range(arch.n_layers):
            if rows[i]:
                x = arch.block_input(i)
                idx = torch.tensor(rows[i])
                if how == "identity":
                    inp = arch.ffn_input(i, like=x)
                out = arch.ffn_output(i, like=x)
                out[idx] = 0.0 if how == "zero" else inp[idx].to(out.dtype)
        logits = loaded.model.output.logits[:, -1].save()
    return logits.float()


def ablation_variants(n_layers: int, layers=None) -> dict[str, tuple[int, ...]]:
    """None: nothing, then the top 1/6 .. 6/6 of the blocks removed; else the given blocks (and nothing)."""
    if layers in (None, "sixths"):
        out = {"none": ()}
        for k in range(1, 7):
            m = round(n_layers * k / 6)
            out[f"top {k}/6"] = tuple(range(n_layers - m, n_layers))
        return out
    blocks = tuple(_parse_blocks(layers, n_layers, "--layers"))
    return {"none": (), f"blocks {','.join(map(str, blocks))}": blocks}


def run_ablation(loaded, items: list[Item], layers=None, how: str = "zero") -> list[dict]:
    tok = loaded.tokenizer
    variants = ablation_variants(loaded.arch.n_layers, layers)
    names, blocks = list(variants), list(variants.values())
    logits = ablate(loaded, [it.prompt for it in items], blocks, how)
    ids = torch.tensor([answer_token(tok, it) for it in items for _ in blocks], device=logits.device)
    rank = rank_of(logits, ids).tolist()
    top = logits.argmax(-1).tolist()
    rows = []
    for r, (it, v) in enumerate((it, v) for it in items for v in range(len(blocks))):
        rows.append({**item_columns(tok, it), "ablation": how, "variant": names[v], "n_ablated": len(blocks[v]),
                     "blocks": json.dumps(list(blocks[v])), "correct": rank[r] == 0, "answer_rank": rank[r],
                     "predicted": tok.decode(top[r])})
    return rows


def summarize_ablation(df) -> dict:
    acc = df.groupby("variant", sort=False).correct.mean()
    base = float(acc.get("none", np.nan))
    return {"items": int(df.item.nunique()), "accuracy": {k: float(v) for k, v in acc.items()},
            "relative_drop": {k: (base - float(v)) / base if base else None for k, v in acc.items()}}


def report_ablation(df, summary) -> str:
    table = df.groupby(["variant", "n_ablated"], sort=False).correct.mean().rename("accuracy").reset_index()
    table["relative_drop"] = [summary["relative_drop"][v] for v in table.variant]
    return table.round(3).to_string(index=False) + f"\n\nitems {summary['items']} ({df.ablation.iloc[0]} ablation)"
