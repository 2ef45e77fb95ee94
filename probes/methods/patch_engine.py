"""The batched patching forward behind activation-patching (and the read-out's causal check): every patch of one
clean/corrupted pair as rows of a few forwards, each chunk skipping what its patches cannot change (see
`patch_logits`). Equal, patch for patch, to one hooked forward per patch (tests/test_patching.py)."""

from __future__ import annotations

import copy
import itertools

import nnsight
import numpy as np
import torch

from ..models.devices import execution_device
from ..tasks.base import token_ids
from .readout import rank_of

PATCH_ROWS = 64


def patch_logits(loaded, source: str, dest: str, patches: list[tuple[str, int, object]],
                 skip_unchanged: bool = True, reduce=None) -> torch.Tensor:
    """Last-position logits (2 + len(patches), vocab): the source run, the destination run, then the destination
    with each patch (site, block, position index or slice) taken from the source run; or what `reduce` makes of
    each chunk's logits (rows, vocab) -> (rows, ...), so that only one chunk's logits are held at a time.

    A patch at a position before the first token where source and destination differ writes what is already there
    (causal attention: every site there is computed from the same tokens), so with `skip_unchanged` its row is the
    destination run's, not run again. The others run in chunks of at most PATCH_ROWS. The first chunk runs with
    the pair as its first two rows and keeps the pair's activations that later chunks need. A row patched at block
    b and position p equals the destination run before block b, and at every position before p: so each later
    chunk starts at its first block, from the destination's input to it (the blocks before skipped), and at its
    first position, the destination's keys and values before it given as a KV cache. Chunks are tiles of nearby
    blocks and positions, so a sweep over all of them does about a quarter of the work of running every row whole.
    A model whose layers hand state to later ones (the value residual) runs every block; one without a KV cache,
    every position."""
    arch = loaded.arch
    trim = (arch.independent_layers and getattr(arch.hf, "supports_kv_cache", True)
            and not loaded.spec.reads_vectors)
    tokens = _tokens(loaded, dest)
    same = first_difference(loaded, source, dest) if skip_unchanged else -1  # unchanged before it
    run = [k for k, (_, _, p) in enumerate(patches) if not (p < same if isinstance(p, int) else same == len(tokens))]
    chunks = [[run[k] for k in chunk] for chunk in _chunks([patches[k] for k in run], trim)]
    chunks = chunks or [[]]
    later = [patches[k] for chunk in chunks[1:] for k in chunk]
    keep = {(b, s.split(".")[0]) for s, b, _ in later} | {(b, "resid") for _, b, _ in later}
    reduce = reduce or (lambda logits: logits)
    first, saved = _patched_forward(loaded, [source, dest] + [dest] * len(chunks[0]),
                                    [patches[k] for k in chunks[0]], keep=keep)
    first = reduce(first)
    rows = dict(zip(chunks[0], first[2:]))
    prefix = {"ids": _ids(loaded, tokens), "caches": {}} if trim and len(chunks) > 1 else None
    for chunk in chunks[1:]:
        rows.update(zip(chunk, reduce(_patched_forward(loaded, dest, [patches[k] for k in chunk], saved,
                                                       prefix=prefix)[0])))
    return torch.cat([first[:2], *(rows.get(k, first[1])[None] for k in range(len(patches)))])


def _tokens(loaded, prompt: str) -> list:
    """What the model reads at each position: token ids, or a vector model's input vectors."""
    return list(prompt.embeds) if loaded.spec.reads_vectors else token_ids(loaded.tokenizer, prompt)


def first_difference(loaded, source: str, dest: str) -> int:
    """The first position where two prompts' tokens (or input vectors) differ, their length if none does: a patch
    before it writes what is already there."""
    a, b = _tokens(loaded, source), _tokens(loaded, dest)
    return next((i for i, (x, y) in enumerate(zip(a, b)) if not np.array_equal(x, y)), min(len(a), len(b)))


def _ids(loaded, tokens: list) -> torch.Tensor:
    """A text prompt's token ids (1, n), where the model reads them (not for a remote model)."""
    ids = torch.tensor([tokens])
    return ids if loaded.remote else ids.to(execution_device(loaded.arch.hf.get_input_embeddings()))


def _chunks(patches: list, tiles: bool) -> list[list[int]]:
    """Patch indices in chunks of at most PATCH_ROWS, in block order, so that each chunk after the first starts at
    as late a block as it can; with `tiles` (a chunk can start at a position too), cut from tiles of about equal
    numbers of blocks and positions (scaled to how many there are), so that its first position is late too."""
    if not patches:
        return []
    blocks = sorted({b for _, b, _ in patches})
    starts = sorted({-1 if isinstance(p, slice) else p for _, _, p in patches})  # a slice starts at 0
    tall, wide = len(blocks), len(starts)  # one tile
    if tiles:
        cells = max(1, PATCH_ROWS * len(blocks) * len(starts) // len(patches))  # (block, position)s per chunk
        tall = min(len(blocks), max(1, round((cells * len(blocks) / len(starts)) ** 0.5)))
        wide = max(1, cells // tall)
    b_rank, p_rank = {b: k for k, b in enumerate(blocks)}, {p: k for k, p in enumerate(starts)}

    def tile(k):
        _, b, p = patches[k]
        return b_rank[b] // tall, p_rank[-1 if isinstance(p, slice) else p] // wide

    order = sorted(range(len(patches)), key=lambda k: (tile(k), patches[k][1]))
    out = []
    for _, group in itertools.groupby(order, key=tile):
        group = list(group)
        out += [group[c:c + PATCH_ROWS] for c in range(0, len(group), PATCH_ROWS)]
    return out


def _prefix_cache(loaded, ids: torch.Tensor, rows: int, caches: dict):
    """The KV cache of a run of `ids` (1, p), repeated for `rows` rows; one run per length p (kept in `caches`)."""
    if ids.shape[1] not in caches:
        with loaded.trace(ids, use_cache=True):
            caches[ids.shape[1]] = nnsight.save(loaded.model.output.cache)
    cache = copy.deepcopy(caches[ids.shape[1]])  # the forward it is given appends to it
    cache.batch_repeat_interleave(rows)
    return cache


def _patched_forward(loaded, prompts, chunk: list, saved: dict | None = None, keep: set = frozenset(),
                     prefix: dict | None = None):
    """(last-position logits, kept activations) of one forward. Without `saved`, `prompts` are the source, the
    destination and the destination once per patch; the patches (rows 2 on) take the source's values live, and
    the pair's activations at the (block, site)s in `keep` are kept. With `saved` (what that forward kept),
    `prompts` is the destination, once per patch, started at the chunk's first block from the saved destination
    input and (given `prefix`: the destination's token ids and the KV caches made so far) at its first position
    after a KV cache of the destination before it."""
    arch, live = loaded.arch, saved is None
    k = len(chunk)
    start = min(b for _, b, _ in chunk) if not live and arch.independent_layers else 0
    first = (0 if live or prefix is None or any(isinstance(p, slice) for _, _, p in chunk)
             else min(p for _, _, p in chunk))
    inputs, kwargs = (prompts if live else [prompts] * k), {}
    if first:
        ids = prefix["ids"]
        kwargs = {"cache": _prefix_cache(loaded, ids[:, :first], k, prefix["caches"]), "use_cache": True}
        inputs = {"input_ids": ids[:, first:].repeat(k, 1),
                  "attention_mask": torch.ones(k, ids.shape[1], dtype=torch.long, device=ids.device)}
    groups: dict = {}
    for row, (site, block, pos) in enumerate(chunk, start=2 if live else 0):
        at = pos if isinstance(pos, slice) else pos - first  # in this forward's positions
        if site.startswith("head."):  # one head: its slice of the output projection's input
            groups.setdefault((block, "head"), []).append((row, (pos, at, int(site[5:]))))
        else:
            groups.setdefault((block, site), []).append((row, (pos, at)))
    with loaded.trace(inputs, logits_to_keep=1, **kwargs):
        if start:
            h = saved[start, "resid"][1:2, first:].expand(k, -1, -1).clone()
            for j in range(start):  # what the block returns: its hidden states, or a tuple led by them
                arch.block(j).skip((h,) + (None,) * (saved["tuple"] - 1) if saved["tuple"] else h)
        got = {}
        for i in sorted({b for b, _ in groups} | {b for b, _ in keep}):
            x = arch.block_input(i)
            for site in ("resid", "head", "attn", "ffn"):  # forward order within the block
                if (i, site) not in groups and (i, site) not in keep:
                    continue
                value = site_value(arch, i, site, x)
                if (i, site) in keep:
                    got[i, site] = value[:2].clone()
                src = value if live else saved[i, site]  # row 0: the source run's, at the prompt's positions
                size = value.shape[-1] // arch.n_heads
                for row, where in groups.get((i, site), []):
                    if site == "head":
                        pos, at, h = where
                        value[row, at, h * size:(h + 1) * size] = src[0, pos, h * size:(h + 1) * size]
                    else:
                        value[row, where[1]] = src[0, where[0]]
            if keep and i == max(b for b, _ in keep):
                out = arch.block(i).output
                got["tuple"] = len(out) if isinstance(out, tuple) else 0
        logits = nnsight.save(loaded.model.output.logits[:, -1])
        got = nnsight.save(got)
    return logits.float(), got


def site_value(arch, i: int, site: str, x):
    """Inside a trace: the live tensor of block i's `site` (resid: its input `x`; head: every head's output side by
    side; attn, ffn: the updates), (batch, seq, width); writing into it changes the run."""
    return (x if site == "resid" else arch.heads_input(i) if site == "head"
            else arch.attn_update(i) if site == "attn" else arch.ffn_output(i, like=x))


def logit_difference(logits: torch.Tensor, good, bad) -> torch.Tensor:
    """(rows,): LD = logit(good) - logit(bad) of each row of `logits` (rows, vocab), in float32 whatever the model's
    dtype (each logit upcast before subtracting); `good`, `bad`: one token for every row, or one per row."""
    rows = torch.arange(len(logits), device=logits.device)
    return (logits[rows, torch.as_tensor(good, device=logits.device)].float()
            - logits[rows, torch.as_tensor(bad, device=logits.device)].float())


def answer_columns(logits: torch.Tensor, good: int, bad: int) -> torch.Tensor:
    """(rows, 2), float32: the logit difference of the clean (`good`) and the corrupted (`bad`) answer, and the
    clean answer's rank (exact in float32 below 2**24 tokens)."""
    rank = rank_of(logits, torch.full((len(logits),), good, device=logits.device))
    return torch.stack([logit_difference(logits, good, bad), rank.float()], 1)


def patch_list(sites: list[str], blocks: list[int], positions: list, heads: int = 0) -> list[tuple[str, int, object]]:
    """(site, block, position) of every patch; site `head` becomes `head.<h>` for each of `heads` heads."""
    expanded = [x for s in sites for x in ([f"head.{h}" for h in range(heads)] if s == "head" else [s])]
    return [(s, b, p) for s in expanded for b in blocks for p in positions]
