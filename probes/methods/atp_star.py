"""AtP*'s two corrections to attribution patching (Kramar et al. 2024), for attribution.py.

QK fix (attention saturation). Patching the residual stream entering block i at position p sets that block's query
and key at p to the source run's. Plain AtP sends that change through the attention softmax linearly, and a
saturated softmax has a near-zero gradient, so a patch that moves attention a lot can be estimated near zero. With
the fix the change of block i's attention probabilities is computed exactly, from the recorded queries and keys
(models/attention_record.py): the patched row p (the source's query against the destination's keys) and column p
(the destination's queries against the source's key), softmaxed, and only its effect on LD is taken to first order:

    estimate = AtP - <G, dA_linear(p)> + <G, A'(p) - A>,      G = dLD/dA (block i's probabilities)

where dA_linear is the part of AtP's own term that passes through block i's scores (the queries' and keys' first-
order change, as AtP has it, through the softmax's Jacobian). For `whole` (every position at once) A' is the
source's attention pattern. Only `resid` patches change a block's own queries and keys; attn, ffn and head patches,
like the residual's effect on later blocks' attention, stay linear, as in AtP* (which fixes only the nodes that are
queries and keys).

GradDrop (cancellation). An effect can be the sum of a direct and an indirect path that cancel at the clean input,
so that the gradient says little about the patch. GradDrop recomputes the estimate once per block l with the
gradient through block l's contribution to the residual (its attention and FFN updates) set to zero, and scores a
patch by sum_l |estimate_l| / (L - 1): a patch whose paths cancel scores high when one of them is dropped. The score
has no sign; it ranks patches (compare it with |exact effect|). A patch inside block l (attn, ffn, head) scores zero
in pass l, hence L - 1 (so a resid patch, which no pass zeroes, has up to L/(L-1) the weight of an attn, ffn or
head patch of the same size: compare within a site when that matters). Blocks before every patched one leave every
estimate as AtP's, so they are not re-run, and pass l starts part-way (`gradient_passes`)."""

from __future__ import annotations

import torch

from ..errors import ProbeError
from ..models.attention_record import Recorded, recordable
from .patching import parse_sites

CHUNK = 2 ** 24  # most (patch, head, query, key) scores held at once


def check_fixes(loaded, options: dict) -> None:
    """Refuse, in one line, the corrections this model or these sites cannot have."""
    arch = loaded.arch
    if options.get("qk_fix"):
        why = recordable(arch)
        if why:
            raise ProbeError(f"--qk-fix needs each attention layer's queries and keys, and {loaded.spec.name} cannot "
                             f"give them: {why}; accepted: a model of another family, or attribution-patching "
                             "without --qk-fix")
        if "resid" not in parse_sites(options.get("sites", "resid"), arch.has_ffn):
            raise ProbeError(f"--qk-fix changes resid patches only (they set their block's queries and keys), and "
                             f"--sites is {options.get('sites')!r}; accepted: --sites with resid")
    if options.get("graddrop") and (arch.n_layers < 2 or not arch.residual):
        raise ProbeError(f"--graddrop drops one block's gradient at a time while the residual stream carries the "
                         f"rest, and {loaded.spec.name} has {arch.n_layers} block(s)"
                         + ("" if arch.residual else " and no residual stream")
                         + "; accepted: a residual model of 2 blocks or more, or attribution-patching without it")


def linear_qk(rec: Recorded, leaf: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first-order change of the layer's queries and keys when the block input moves by `delta` (leaf's shape,
    where `leaf` is the zero leaf added to the block input): a Jacobian-vector product, as two reverse passes over
    the block's query and key computation only."""
    uq = torch.zeros_like(rec.query, requires_grad=True)
    uk = torch.zeros_like(rec.key, requires_grad=True)
    try:
        (back,) = torch.autograd.grad((rec.query, rec.key), leaf, (uq, uk), create_graph=True)
        dq, dk = torch.autograd.grad(back, (uq, uk), delta.to(back.dtype), retain_graph=True, allow_unused=True,
                                     materialize_grads=True)
    except RuntimeError as e:  # an operation on the query/key path without a second derivative
        raise ProbeError(f"--qk-fix needs second derivatives through the model's query and key computation: "
                         f"{str(e).splitlines()[0]}; accepted: attribution-patching without --qk-fix") from None
    return dq.detach(), dk.detach()


def qk_correction(rec: Recorded, grad: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, rows: tuple[int, int],
                  shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For one pair (source row, destination row) of a block: what the QK fix adds to AtP's estimate of patching the
    block input at each of the pair's positions (n,), and at all of them at once (a scalar). `grad`: dLD/d(probs)
    (batch, heads, seq, seq); `dq`, `dk`: linear_qk's."""
    src, dst = rows
    cut = lambda t, r: t[r, :, shift:].detach().float()  # noqa: E731  the pair's positions, not the padding
    qs, qd, ks, kd = cut(rec.query, src), cut(rec.query, dst), cut(rec.key, src), cut(rec.key, dst)
    g = grad[dst, :, shift:, shift:].float()
    n = g.shape[-1]
    mask = (torch.zeros(n, n, device=g.device).masked_fill(~torch.ones(n, n, dtype=torch.bool, device=g.device)
                                                           .tril(), float("-inf"))
            if rec.mask is None else rec.mask[min(dst, rec.mask.shape[0] - 1), 0, shift:, shift:].float())
    raw = qd @ kd.transpose(-1, -2) * rec.scaling
    slope = 1.0 if rec.softcap is None else 1 - torch.tanh(raw / rec.softcap) ** 2  # d softcap(raw) / d raw
    dd = rec.capped(raw)
    sd, ds, ss = (rec.scores(x, y) for x, y in ((qs, kd), (qd, ks), (qs, ks)))
    # the destination's probabilities, recomputed as the patched ones are (in float32): the layer's own, rounded
    # to a half-precision model's dtype, would not cancel in rows a patch leaves as they were
    a = torch.softmax(dd + mask, -1)
    lin_q = dq[dst, :, shift:].float() @ kd.transpose(-1, -2) * rec.scaling * slope  # row t: query t moved
    lin_k = qd @ dk[dst, :, shift:].float().transpose(-1, -2) * rec.scaling * slope  # column s: key s moved

    def change(scores, lin):
        """<G, softmax(scores + mask) - A> - <G, the softmax's Jacobian applied to lin>, over the last 3 dims."""
        exact = ((torch.softmax(scores + mask, -1) - a) * g).sum((-3, -2, -1))
        linear = (a * (lin - (a * lin).sum(-1, keepdim=True)) * g).sum((-3, -2, -1))
        return exact - linear

    whole = change(ss, lin_q + lin_k)
    diag = ss.diagonal(dim1=-2, dim2=-1)  # (heads, n): the patched query against the patched key
    out, step = [], max(1, CHUNK // max(1, a.numel()))
    at = torch.arange(n, device=a.device)
    for start in range(0, n, step):
        p = at[start:start + step]
        row = (at[None, :] == p[:, None])[:, None, :, None]  # (P, 1, n, 1): query row p
        col = (at[None, :] == p[:, None])[:, None, None, :]  # (P, 1, 1, n): key column p
        scores = torch.where(row, sd, torch.where(col, ds, dd))
        scores = torch.where(row & col, diag.T[p][:, :, None, None], scores)
        out.append(change(scores, torch.where(row, lin_q, 0.0) + torch.where(col, lin_k, 0.0)))
    return torch.cat(out), whole


def gradient_passes(target: torch.Tensor, named: dict, starts: dict, drop: dict, first: int, n_layers: int,
                    graddrop: bool, shortcut: bool):
    """Yield (weight, gradients of `target` by the names of `named`): the one plain pass; or GradDrop's, with the
    block dropped set in `drop` (the hooks read it), and the plain pass weighted by the blocks before `first`.
    Names are ('leaf', (block, site)) or ('probs', block). With `shortcut` (a block reads nothing from below but
    the previous block's output), pass l starts at block l + 1's input `starts[l + 1]` from the plain pass's
    gradient there, which dropping block l leaves as it is, and asks only for what lies at or below block l: the
    passes together run about half the blocks' backward that one full backward each would."""
    grad = lambda out, inputs, given=None: dict(zip(inputs, torch.autograd.grad(  # noqa: E731
        out, list(inputs.values()), given, retain_graph=True, allow_unused=True, materialize_grads=True)))
    drop["block"] = None
    if not graddrop:
        yield 1, grad(target, named)
        return
    block_of = lambda name: name[1][0] if name[0] == "leaf" else name[1]  # noqa: E731
    at = {("start", b): starts[b + 1] for b in range(first, n_layers - 1)} if shortcut else {}
    plain = grad(target, {**named, **at})
    if first:
        yield first, plain
    for b in range(first, n_layers):
        drop["block"] = b
        if ("start", b) in at:
            yield 1, {**plain, **grad(at["start", b], {n: t for n, t in named.items() if block_of(n) <= b},
                                     plain["start", b])}
        else:
            yield 1, grad(target, named)
    drop["block"] = None
