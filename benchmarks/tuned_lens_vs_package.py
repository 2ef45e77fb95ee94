"""This project's tuned-lens training against the `tuned-lens` package's own training loop, on the same tokens
(issue 43). Not a test: a benchmark script, run beside a side install of the package (shared/notes/tuned-lens.md):

    pip install --no-deps --target /tmp/tuned-lens-side tuned-lens==0.2.0 simple-parsing flatten-dict \
        docstring-parser wandb "torchdata==0.7.1"
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/tuned-lens-side .venv/bin/python benchmarks/tuned_lens_vs_package.py \
        --model smollm2-135m --tokens 8192 --out benchmarks/tuned-lens-vs-package

What it does:
1. draws the training chunks as `probe lens train` does: it calls `probes.methods.tuned_lens.train_lens` (the
   function behind the command) and records the chunks that function draws (its module's `chunks`, wrapped), so
   both trainings read the very same token batches in the same order;
2. trains (a) our lens through `train_lens`, and (b) the package's `TunedLens` through the package's own
   `tuned_lens.scripts.train_loop.Train.execute` (its loop, loss, bfloat16 autocast, clipping, optimiser and
   schedule from `ingredients.Optimizer`, `Train.get_lens`, `Train.calculate_gradient_accumulation_steps`), with
   `Train.setup` replaced: the package's setup loads the model from the hub by name and its data through
   `datasets` + torchdata's shuffling DataLoader2, neither of which can be pointed at an already loaded model or a
   given list of batches. The replacement hands `execute` the same frozen model object our training used, a lens,
   optimiser and scheduler built by the package's own functions, and the recorded chunks (one per batch, the
   package's per_gpu_batch_size 1) in the same order (no shuffle: the order is ours, for both). Same steps
   (`num_steps`) and tokens per step (`tokens_per_step`) as ours;
3. evaluates the logit lens, ours and the package's lens on held-out sequences (the corpus' token stream right after
   the training tokens, cut into `--eval-seqs` sequences of `--eval-len` tokens, each starting as a prompt does):
   per residual index, KL(model's distribution || lens distribution) averaged over positions per sequence, then the
   mean over sequences with a 95% bootstrap interval over sequences; ours / package's with a paired bootstrap
   interval, and whether ours is within 10% of the package's (point estimate; "interval inside" when the whole
   interval is in [0.9, 1.1]). Both trained lenses are decoded by the same float32 code (`load_lens` reads the
   package's saved folder), so only the training differs.

Writes `layers.csv` (the per-layer table) and `summary.json` (tokens, steps, wall times, training seconds per 1,000
tokens) under `--out`, with both lens folders (`ours/`, `package/`), and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import nnsight
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import probes  # noqa: E402
from probes.methods import tuned_lens as ours  # noqa: E402
from probes.stats import bootstrap  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a registry name, as probe lens train --model takes")
    p.add_argument("--tokens", type=int, default=2**13, help="training tokens, for each of the two trainings")
    p.add_argument("--corpus", default=ours.CORPUS)
    p.add_argument("--seq-len", type=int, default=None,
                   help="training chunk length (default: as probe lens train, min(2048, the model's context))")
    p.add_argument("--eval-seqs", type=int, default=16, help="held-out sequences (the bootstrap's items)")
    p.add_argument("--eval-len", type=int, default=256, help="tokens per held-out sequence")
    p.add_argument("--package-autocast", choices=["bfloat16", "off"], default="bfloat16",
                   help="the package's loop autocasts its lens to bfloat16 (its default); off: float32, as ours")
    p.add_argument("--out", type=Path, required=True, help="folder for layers.csv, summary.json and both lenses")
    return p.parse_args()


class Recorder:
    """Wraps `probes.methods.tuned_lens.chunks`, keeping what `train_lens` drew."""

    def __init__(self):
        self.drawn, self.original = [], ours.chunks

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        self.drawn.append(out.clone())
        return out


def train_ours(loaded, args, folder: Path) -> tuple[torch.Tensor, dict, tuple[float, float]]:
    """(the chunks train_lens drew, its meta.json, (wall, CPU) seconds)."""
    recorder = Recorder()
    ours.chunks = recorder
    try:
        start, cpu = time.perf_counter(), time.process_time()
        ours.train_lens(loaded, args.tokens, args.corpus, folder, progress=True, seq_len=args.seq_len)
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
    finally:
        ours.chunks = recorder.original
    (data,) = recorder.drawn
    return data, json.loads((folder / "meta.json").read_text()), seconds


def train_package(loaded, data: torch.Tensor, steps: int, per_step: int, args, folder: Path) -> tuple[float, float]:
    """The package's Train.execute on `data` (chunks x seq_len), `steps` steps of `per_step` chunks; (wall, CPU)
    seconds."""
    import tuned_lens.scripts.ingredients as ing
    from tuned_lens.scripts import train_loop

    model, seq_len = loaded.arch.hf, data.shape[1]

    class Driven(train_loop.Train):
        def setup(self):  # the package's setup, less its hub loading and datasets/torchdata pipeline
            self.dist.init()
            lens = self.get_lens(model)
            params = [p for p in lens.parameters() if p.requires_grad]
            opt = self.opt.create_optim(params)
            scheduler = self.opt.create_scheduler(opt, self.num_steps)
            state = train_loop.State(dataloader=[{"input_ids": ids[None]} for ids in data],
                                     lens=self.dist.distribute_lens(lens), opt=opt, scheduler=scheduler,
                                     wandb_id=None, nats_to_bpb=1.0, step=0)
            return state, model, self.calculate_gradient_accumulation_steps(seq_len)

    train = Driven(model=ing.Model(name=str(model.config.name_or_path)), data=ing.Data(), opt=ing.Optimizer(),
                   dist=ing.Distributed(), output=folder, seed=ours.SEED, num_steps=steps,
                   tokens_per_step=per_step * seq_len, bias_only=False)
    autocast = torch.autocast
    if args.package_autocast == "off":
        torch.autocast = lambda device_type, dtype=None, **kw: autocast(device_type, dtype=dtype, enabled=False)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        train.execute()
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        torch.autocast = autocast


def held_out(loaded, args, train_chunks: int, seq_len: int) -> torch.Tensor:
    """The corpus' token stream after the training tokens, as `--eval-seqs` chunks of `--eval-len` (chunks() joins
    the documents into one stream and cuts it, each chunk after the tokenizer's prefix)."""
    prefix = len(loaded.tokenizer("").input_ids)
    skip = math.ceil(train_chunks * (seq_len - prefix) / (args.eval_len - prefix))
    return ours.chunks(loaded.tokenizer, args.corpus, skip + args.eval_seqs, args.eval_len)[skip:]


@torch.no_grad()
def evaluate(loaded, lenses: dict, seqs: torch.Tensor) -> dict:
    """{name: (sequences, L) mean KL(model || lens) over each sequence's positions} for every lens."""
    arch = loaded.arch
    out = {name: np.zeros((len(seqs), arch.n_layers)) for name in lenses}
    for s, ids in enumerate(seqs):
        with loaded.trace(ids[None]):
            resid = nnsight.save([arch.resid(i)[0].to(arch.unembed_device) for i in range(arch.n_layers)])
            logits = loaded.model.output.logits[0].save()
        if s == 0:  # the package's hidden states (HF output_hidden_states[:-1]) are our residuals
            hf = arch.hf(ids[None], output_hidden_states=True).hidden_states[:-1]
            gap = max(float((a[0] - b).abs().max()) for a, b in zip(hf, resid))
            assert gap < 1e-4, f"HF hidden states differ from our residuals by {gap}"
        p = logits.float().log_softmax(-1)
        for i, h in enumerate(resid):
            for name, lens in lenses.items():
                q = arch.logits(lens.transform(h, i) if lens is not None else h.float()).log_softmax(-1)
                out[name][s, i] = float((p.exp() * (p - q)).sum(-1).mean())
    return out


def interval(values: np.ndarray) -> tuple[float, float, float]:
    return bootstrap(lambda x: x.mean(-1), values, vectorized=True)


def main() -> None:
    args = parse()
    import tuned_lens  # noqa: F401  (fail early without the side install)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loaded = probes.load(args.model)
    arch = loaded.arch
    args.seq_len = args.seq_len or min(ours.SEQ_LEN, arch.context_length or ours.SEQ_LEN)
    threads = torch.get_num_threads()

    data, meta, ours_s = train_ours(loaded, args, args.out / "ours")
    steps, per_step = meta["steps"], meta["chunks_per_step"]
    assert data.shape == (steps * per_step, args.seq_len)
    package_s = train_package(loaded, data, steps, per_step, args, args.out / "package")

    seqs = held_out(loaded, args, len(data), args.seq_len)
    lenses = {"logit": None, "package": ours.load_lens(args.out / "package", loaded),
              "ours": ours.load_lens(args.out / "ours", loaded)}
    start, cpu = time.perf_counter(), time.process_time()
    kl = evaluate(loaded, lenses, seqs)
    eval_s = (time.perf_counter() - start, time.process_time() - cpu)

    rows = []
    for i in range(arch.n_layers):
        row = {"layer": i}
        for name in lenses:
            m, lo, hi = interval(kl[name][:, i])
            row.update({f"kl_{name}": m, f"kl_{name}_lo": lo, f"kl_{name}_hi": hi})
        r, lo, hi = bootstrap(lambda a, b: a.mean(-1) / b.mean(-1), kl["ours"][:, i], kl["package"][:, i],
                              vectorized=True)
        a, b = (lenses[n].layer_translators[i] for n in ("ours", "package"))
        diff = torch.cat([(a.weight - b.weight).flatten(), a.bias - b.bias]).norm()
        size = torch.cat([b.weight.flatten(), b.bias]).norm()
        row.update({"ours_over_package": r, "ratio_lo": lo, "ratio_hi": hi, "within_10pct": abs(r - 1) <= 0.10,
                    "interval_inside_10pct": 0.9 <= lo and hi <= 1.1,
                    "translator_rel_diff": float(diff / size) if size > 0 else float("nan")})
        rows.append(row)
    with open(args.out / "layers.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tokens = steps * per_step * args.seq_len
    summary = {
        "model": args.model, "corpus": args.corpus, "train_tokens": tokens, "steps": steps, "chunks_per_step": per_step,
        "seq_len": args.seq_len, "eval_sequences": len(seqs), "eval_len": args.eval_len,
        "package_autocast": args.package_autocast, "torch_threads": threads,
        # wall seconds, and CPU seconds of this process (with one thread: its compute, whatever else shares the CPU)
        "ours_seconds": round(ours_s[0], 1), "package_seconds": round(package_s[0], 1),
        "eval_seconds": round(eval_s[0], 1), "ours_cpu_seconds": round(ours_s[1], 1),
        "package_cpu_seconds": round(package_s[1], 1), "eval_cpu_seconds": round(eval_s[1], 1),
        "ours_cpu_seconds_per_1000_tokens": round(1000 * ours_s[1] / tokens, 1),
        "package_cpu_seconds_per_1000_tokens": round(1000 * package_s[1] / tokens, 1),
        "layers_within_10pct": sum(r["within_10pct"] for r in rows), "layers": len(rows),
        "ours_kl_first_step": meta["kl_first_step"], "ours_kl_final_step": meta["kl_final"],
        "torch": torch.__version__, "package": "tuned-lens 0.2.0",
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))

    def ci(row, name):
        k = f"kl_{name}"
        return f"{row[k]:.4g} [{row[k + '_lo']:.4g}, {row[k + '_hi']:.4g}]"

    print(f"\n{args.model}: {tokens:,} training tokens ({steps} steps x {per_step} chunk(s) of {args.seq_len}), "
          f"the same chunks for both; held out: {len(seqs)} sequences x {args.eval_len} tokens; "
          f"package autocast {args.package_autocast}; {threads} thread(s)")
    print(f"training, wall / CPU seconds: ours {ours_s[0]:.0f} / {ours_s[1]:.0f} s ({1000 * ours_s[1] / tokens:.1f} CPU "
          f"s per 1,000 tokens), package {package_s[0]:.0f} / {package_s[1]:.0f} s ({1000 * package_s[1] / tokens:.1f} "
          f"CPU s per 1,000 tokens); evaluation {eval_s[0]:.0f} / {eval_s[1]:.0f} s\n")
    print("| residual index | logit lens KL | package's tuned lens KL | ours KL | ours / package | within 10% "
          "| translator rel. diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        verdict = ("yes (interval inside)" if r["interval_inside_10pct"] else "yes") if r["within_10pct"] else "**no**"
        print(f"| {r['layer']} | {ci(r, 'logit')} | {ci(r, 'package')} | {ci(r, 'ours')} | "
              f"{r['ours_over_package']:.3f} [{r['ratio_lo']:.3f}, {r['ratio_hi']:.3f}] | {verdict} | "
              f"{r['translator_rel_diff']:.3g} |")
    print(f"\nwithin 10%: {summary['layers_within_10pct']} of {len(rows)} residual indices; written to {args.out}")


if __name__ == "__main__":
    main()
