"""Training: `probe train` (transformers' Trainer) against a bare torch loop doing the same work, per training config:
sequences and steps per second of each, the data path's share of a step, and the host synchronisations of a step
between logging steps (bench.py --training); the value residual's cost in training steps (--value-residual). The bare
loop and the host-sync count are also what the GPU check's training section (gpu.py) runs."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from probes.training import trainer as trainer_module
from probes.training.config import load_training_config, steps_per_epoch
from probes.training.data import GENERATORS, IGNORE, tokenizer_for
from probes.training.generator import TensorRows, collate_ids
from timing import measure
from training_hooks import Clock, StepHooks, SyncCounter


def bare_loop(cfg: dict, steps: int, hooks=(), compile: str | None = None) -> None:
    """`steps` steps of `cfg` by hand, the work of `probe train`: the generator's data and batches, the model built
    from the same seed, the trainer's causal mask, the loss over its readout, the trainer's optimizer (AdamW fused
    where it fuses it), the generator's metrics at each epoch's first batch and at every evaluation, an evaluation
    of every test set (before the first step too where the trainer does one), the weights saved; on the device the
    trainer takes. `hooks`: step hooks (hook(steps done, 0) at each step's start, hook(None, 0) after the last);
    `compile`: torch.compile's mode for the model."""
    import torch.nn.functional as F

    from probes.training.trainer import _optimizer, build_model

    t, gen, task = cfg["train"], GENERATORS[cfg["task"]["generator"]], cfg["task"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = tokenizer_for(task)
    data = gen.splits(task, tok)
    collate = gen.collate(data)
    model = build_model(cfg, tok).to(device)
    net = torch.compile(model, mode=compile) if compile else model
    readout = gen.readout(task)
    ids = tok.convert_tokens_to_ids(list(readout)) if readout else None
    if t.get("optimizer") == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"],
                                betas=(0.9, t.get("adam_beta2", 0.999)), fused=_optimizer(t) == "adamw_torch_fused")
    tests = data["test"] if isinstance(data["test"], dict) else {"test": data["test"]}

    def batch_of(dataset, indices):  # as torch's DataLoader (and so the trainer) fetches: __getitems__ if there is one
        rows = dataset.__getitems__(indices) if hasattr(dataset, "__getitems__") else [dataset[i] for i in indices]
        return {k: v.to(device, non_blocking=True) for k, v in collate(rows).items()}

    masks = {}  # length -> the trainer's 4D causal mask (without one, transformers' families look for padding at
    # every step, a host sync each); this project's decoder takes none

    def loss_of(batch):
        target = batch.pop("target")
        if model.config.model_type != "probe_transformer":
            b, n = target.shape
            if n not in masks:
                masks[n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
            batch["attention_mask"] = masks[n].expand(b, 1, n, n)
        logits = net(**batch).logits
        logits = logits[..., ids] if ids else logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE)

    def evaluate():
        model.eval()
        with torch.no_grad():
            for test in tests.values():
                for start in range(0, len(test), gen.eval_batch):
                    loss_of(batch_of(test, list(range(start, min(start + gen.eval_batch, len(test))))))
            if gen.extra_metrics is not None:
                gen.extra_metrics(model, data["test"], task)  # as the trainer passes its eval_dataset
        model.train()

    order = torch.Generator().manual_seed(t["seed"])
    if gen.eval_on_start:
        evaluate()
    model.train()
    done, train_set = 0, data["train"]
    resident = isinstance(train_set, TensorRows) and collate is collate_ids
    if resident:  # as probe train (probes/training/batches.py): the split on the device once, indexed there
        train_set = TensorRows(columns={k: v.to(device) for k, v in train_set.columns.items()})
    while done < steps:
        order_here = torch.randperm(len(train_set), generator=order)
        for i, idx in enumerate((order_here.to(device) if resident else order_here).split(t["batch_size"])):
            for hook in hooks:
                hook(done, 0)
            batch = train_set.__getitems__(idx) if resident else batch_of(train_set, idx.tolist())
            if i == 0 and gen.epoch_metrics is not None:
                gen.epoch_metrics(model, {k: v for k, v in batch.items() if k != "target"}, task)
            loss = loss_of(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    for hook in hooks:
        hook(None, 0)
    evaluate()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)


def data_path(cfg: dict, steps: int) -> float:
    """Seconds of `steps` batches from the trainer's own train loader (sampler, fetch, collate; or, for a split kept
    on the device, its indexing there), nothing else."""
    from transformers import TrainingArguments

    t, gen = cfg["train"], GENERATORS[cfg["task"]["generator"]]
    data = gen.splits(cfg["task"], tokenizer_for(cfg["task"]))
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(d, per_device_train_batch_size=t["batch_size"], report_to=[],
                                 remove_unused_columns=False, use_cpu=not torch.cuda.is_available())
        trainer = trainer_module._trainer_class()(model=torch.nn.Linear(1, 1), args=args, train_dataset=data["train"],
                                                  data_collator=gen.collate(data))
        loader, done = trainer.get_train_dataloader(), 0
        timer = time.perf_counter()
        while done < steps:
            for _ in loader:
                done += 1
                if done == steps:
                    break
        if torch.cuda.is_available():  # batches indexed on the device (training/batches.py): their kernels done
            torch.cuda.synchronize()
        return time.perf_counter() - timer


def host_syncs(config: str, steps: int, overrides: dict | None = None) -> dict:
    """Host synchronisations per step between logging steps, over `steps` steps of `config` (logging and evaluating
    at the last step only): of `probe train`, and of the bare loop (`bare_` keys)."""
    cfg = load_training_config(config, {**(overrides or {}), "train.steps": steps, "train.eval_steps": steps,
                                        "train.save_steps": steps})
    ours, bare = (SyncCounter(steps, steps_per_epoch(cfg)) for _ in range(2))
    with torch.enable_grad(), tempfile.TemporaryDirectory() as d:
        trainer_module.train(cfg, Path(d) / "run", progress=False, callbacks=[StepHooks(ours)])
        bare_loop(cfg, steps, hooks=[bare])
    return {**ours.summary(), **{f"bare_{k}": v for k, v in bare.summary().items()}}


def bench_training(config: str, steps: int, reps: int, sync_steps: int = 20, overrides: dict | None = None) -> dict:
    """Seconds and sequences per second of `probe train` and of a bare loop doing the same work; the data path's
    share of a `probe train` step: the seconds its batches take to make (index, collate), in the loader the trainer
    builds, over the seconds of a step; and host synchronisations per step between logging steps (over `sync_steps`
    steps, untimed: the counter sees every operation). `overrides`: config fields ({'task.train': 4000})."""
    cfg = load_training_config(config, {**(overrides or {}), "train.steps": steps, "train.eval_steps": steps,
                                        "train.save_steps": steps})
    t = cfg["train"]
    ours_clock, bare_clock = (Clock(1, steps - 1, torch.cuda.is_available()) for _ in range(2))

    def ours():
        with tempfile.TemporaryDirectory() as d:
            trainer_module.train(cfg, Path(d) / "run", progress=False, callbacks=[StepHooks(ours_clock)])

    with torch.enable_grad():
        (ours_s, _), (bare_s, _) = measure(ours, reps), measure(lambda: bare_loop(cfg, steps, [bare_clock]), reps)
    data_s = statistics.median(data_path(cfg, steps) for _ in range(reps))
    seqs, rate = steps * t["batch_size"], ours_clock.steps_per_second
    return {"config": cfg["name"], "steps": steps, "batch": t["batch_size"], "sequences": seqs,
            "bare_seconds": bare_s, "ours_seconds": ours_s, "bare_seq_per_s": seqs / bare_s,
            "ours_seq_per_s": seqs / ours_s, "ratio": ours_s / bare_s, "data_seconds": data_s,
            "data_share": data_s / ours_s, "ours_steps_per_s": rate, "bare_steps_per_s": bare_clock.steps_per_second,
            "step_ratio": bare_clock.steps_per_second / rate, "data_share_of_step": data_s / steps * rate,
            "sync_steps": sync_steps, **host_syncs(config, sync_steps, overrides)}


def print_training(r: dict) -> None:
    syncs = lambda p: "n/a" if r[f"{p}syncs_per_step"] is None else f"{r[f'{p}syncs_per_step']:.2f}"  # noqa: E731
    print(f"training {r['config']}: {r['steps']} steps x batch {r['batch']}: bare loop {r['bare_seconds']:.2f} s "
          f"({r['bare_seq_per_s']:.0f} seq/s), probe train {r['ours_seconds']:.2f} s ({r['ours_seq_per_s']:.0f} "
          f"seq/s) = {r['ratio']:.2f}x; steps 2 to {r['steps'] - 1}: bare {r['bare_steps_per_s']:.1f} steps/s, "
          f"probe train {r['ours_steps_per_s']:.1f} = {r['step_ratio']:.2f}x; its data path {r['data_seconds']:.3f} s "
          f"= {r['data_share_of_step']:.2%} of its steps (target < 1%), {r['data_share']:.2%} of the run; host syncs "
          f"per step between logging steps (over {r['quiet_steps']} steps): probe train {syncs('')} (target 0; "
          f"{r['syncs_where'] or 'none'}), bare loop {syncs('bare_')} ({r['bare_syncs_where'] or 'none'})")


def bench_value_residual(reps: int) -> list[dict]:
    """Training-step time (forward, backward, SGD) of a model with the value residual against the same model
    without it (same weights, same batches, timed alternately in one run): the 2-layer in-context classifier
    (icl-cpu, batch 128) and the 8M GPT-2 language model (8 layers, width 256, 16 heads, 4 x 256 tokens)."""
    import math

    import torch.nn.functional as F

    from probes.models.custom import (ProbeTransformerConfig, ProbeTransformerForCausalLM, ValueResidualGPT2Config,
                                      ValueResidualGPT2LMHeadModel)

    def icl(mode):
        return ProbeTransformerForCausalLM(ProbeTransformerConfig(
            vocab_size=34, n_positions=17, n_layer=2, n_head=1, n_embd=64, residual=True, positions=False,
            attn_bias=False, attn_out=False, attn_scale=False, value_residual=mode, head_layers=3,
            init_attn_std=1 / math.sqrt(39)))

    def lm(mode):
        return ValueResidualGPT2LMHeadModel(ValueResidualGPT2Config(
            value_residual=mode, n_layer=8, n_embd=256, n_head=16, n_positions=256, vocab_size=4096,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True))

    g = torch.Generator().manual_seed(0)
    cases = {"icl-cpu (2 layers, width 64, batch 128 x 17)":
             (icl, {"inputs_embeds": torch.randn(128, 17, 64, generator=g)}, 20),
             "8M GPT-2 LM (8 layers, width 256, batch 4 x 256)":
             (lm, {"input_ids": torch.randint(0, 4096, (4, 256), generator=g)}, 3)}
    out = []
    for name, (build, batch, steps) in cases.items():
        models = {mode: build(mode) for mode in ("none", "previous")}
        models["previous"].load_state_dict(models["none"].state_dict())
        params = sum(p.numel() for p in models["none"].parameters())

        def step(model):
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            def run():
                for _ in range(steps):
                    logits = model(**batch).logits
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), logits[:, 1:].argmax(-1).reshape(-1))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            return run

        with torch.enable_grad():
            times = {mode: [] for mode in models}
            for _ in range(reps):  # alternately, so drift in the machine's speed hits both alike
                for mode, model in models.items():
                    times[mode].append(measure(step(model), 1)[0])
        best = {mode: min(v) for mode, v in times.items()}
        out.append({"model": name, "params": params, "steps": steps, "none_seconds": best["none"],
                    "previous_seconds": best["previous"], "cost": best["previous"] / best["none"] - 1})
    return out


def print_value_residual(results: list[dict]) -> None:
    for r in results:
        print(f"value residual, {r['model']}, {r['params']:,} parameters: {r['steps']} training steps without "
              f"{r['none_seconds']:.2f} s, with {r['previous_seconds']:.2f} s: cost {100 * r['cost']:+.1f}%")
