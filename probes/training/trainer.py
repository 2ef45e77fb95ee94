"""Train a model on a synthetic task with transformers' Trainer, into a run folder that loads as a model.

    <runs>/<name>/n<N>-seed<S>/
        config.json, model.safetensors, tokenizer files   the final weights (save_pretrained), a checkpoint
        checkpoint-<step>/                                Trainer's checkpoints (weights, optimizer, RNG states)
        training.yaml                                     the training config as run
        log.csv, plot.png                                 step, loss, eval loss and accuracy; their curves
        meta.json                                         config, versions, git commit, seed, times, status

A run killed part-way resumes from its last checkpoint with `--resume` (Trainer restores weights, optimizer,
schedule, RNG states and the data order), and ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from transformers import TrainerCallback

from ..errors import ProbeError
from ..models import custom  # noqa: F401  (registers this project's architectures)
from ..models.arch import arch_spec
from ..models.planning import build_config
from ..paths import runs_root
from ..runs.rundir import RunBusy, RunComplete, RunLock, _now, atomic_write, environment, safe_name, write_csv, write_json
from .batches import DeviceBatches
from .data import GENERATORS, tokenizer_for
from .generator import IGNORE, TensorRows, collate_ids
from .schedules import scheduler_for


def generator(cfg: dict):
    return GENERATORS[cfg["task"]["generator"]]


def default_run_dir(cfg: dict) -> Path:
    return runs_root() / safe_name(cfg["name"]) / generator(cfg).run_name(cfg["task"], cfg["train"]["seed"])


def build_model(cfg: dict, tokenizer):
    """The config's model, initialised from the training seed."""
    from transformers import AutoModelForCausalLM, set_seed

    values = dict(cfg["model"])
    family = values.pop("architecture")
    arch_spec(family)  # an unknown architecture: one line naming the supported ones
    length = generator(cfg).positions(cfg["task"])
    ids = {k: tokenizer.pad_token_id for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    set_seed(cfg["train"]["seed"])
    config = build_config({"model_type": family, "vocab_size": len(tokenizer), "n_positions": max(length, 64),
                           "max_position_embeddings": max(length, 64), **ids, **values}, cfg["name"])
    try:
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError) as e:
        raise ProbeError(f"model of {cfg['name']!r} cannot be built as {family}: {str(e).splitlines()[0]}") from None


def _trainer_class():
    from transformers import Trainer

    class LabelTrainer(Trainer):
        """Cross-entropy at each scored position, over the generator's readout tokens (N-back: a 2-way choice
        between the two labels) or the whole vocabulary (the next token)."""

        label_ids: list[int] | None = None
        task: dict | None = None  # the config's task (for the generator's metrics)
        extra_metrics = None  # the generator's (model, test splits, task) -> {name: value}
        epoch_metrics = None  # the generator's (model, first batch of an epoch, task) -> {name: value}
        epoch_start = False  # set by EpochStart: the next batch is an epoch's first
        schedule = None  # (optimizer, steps) -> the config's scheduler where Trainer has none (schedules.py)
        decay_all = False  # train.decay_all: weight decay on every parameter (torch's AdamW on model.parameters())

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None and self.schedule is not None:
                self.lr_scheduler = self.schedule(optimizer or self.optimizer, num_training_steps)
                self._created_lr_scheduler = True
            return super().create_scheduler(num_training_steps, optimizer)

        def get_train_dataloader(self):
            """A TensorRows split with the plain collate: resident on the device, batches indexed there, in the
            order of Trainer's own loader (batches.py); any other split: Trainer's loader."""
            if not isinstance(self.train_dataset, TensorRows) or self.data_collator is not collate_ids:
                return super().get_train_dataloader()
            a = self.args
            return DeviceBatches(self.train_dataset, self._train_batch_size, a.dataloader_drop_last, a.data_seed,
                                 a.device, a.world_size, a.process_index)

        def get_eval_dataloader(self, eval_dataset=None):
            """Every test sequence, also where training drops each epoch's last short batch (train.drop_last)."""
            drop, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.args.dataloader_drop_last = drop

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            if self.extra_metrics is not None and eval_dataset is None and metric_key_prefix == "eval":
                model = self.model.eval()
                extra = {f"eval_{k}": v for k, v in self.extra_metrics(model, self.eval_dataset, self.task).items()}
                self.log(extra)
                metrics.update(extra)
            return metrics

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            target = inputs["target"]
            # token ids or vectors (inputs_embeds), never padded: whole sequences of one length
            given = {k: v for k, v in inputs.items() if k != "target"}
            if self.epoch_start and self.epoch_metrics is not None and model.training:
                self.epoch_start = False  # measured on this batch before its step, as Gong & Zhang record it
                batch = {k: self.accelerator.gather(v) for k, v in given.items()}  # the global batch (processes)
                self.log({f"train_{k}": v for k, v in self.epoch_metrics(
                    self.accelerator.unwrap_model(model), batch, self.task).items()})
            out = model(**given, attention_mask=self.causal_mask(model, target))
            logits = out.logits[..., self.label_ids] if self.label_ids else out.logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     target.reshape(-1), ignore_index=IGNORE)
            return (loss, {"logits": logits}) if return_outputs else loss

        def causal_mask(self, model, target: torch.Tensor) -> torch.Tensor | None:
            """What the model's attention needs, read by nothing on the host: transformers' families take a 4D
            causal mask as it is (a 2D mask of ones, or none, makes them look for padding at every step, and each
            look stops the host until the device has caught up); this project's decoder needs none."""
            config = self.accelerator.unwrap_model(model).config
            if config.model_type == "probe_transformer":
                return None
            b, t = target.shape
            return causal_mask(t, next(model.parameters()).dtype, target.device).expand(b, 1, t, t)

        def get_decay_parameter_names(self, model) -> list[str]:
            """Every weight but LayerNorms' and biases' (Trainer's own rule also spares any module named "norm",
            which in probe_transformer holds the ReLU layers before the readout); every parameter with decay_all."""
            from transformers.trainer_pt_utils import get_parameter_names

            if self.decay_all:
                return [name for name, _ in model.named_parameters()]
            return get_parameter_names(model, [torch.nn.LayerNorm], [r"bias"])

    return LabelTrainer


def _argmax(logits, labels):
    """Only the predicted class leaves each evaluation batch (not the logits: a vocabulary per position)."""
    return logits.argmax(-1)


def _accuracy(pred, whole_sequences: bool = True) -> dict:
    """Accuracy over scored positions, and over sequences (every scored position right)."""
    import numpy as np

    predicted, target = pred.predictions, pred.label_ids
    scored = target != IGNORE
    right = (predicted == target) | ~scored
    out = {"accuracy": float((predicted == target)[scored].mean())}
    if whole_sequences and scored.sum(-1).max() > 1:  # several answers per sequence: also whole sequences
        out["sequence_accuracy"] = float(np.all(right, axis=-1).mean())
    return out


def _same_run(run: Path, cfg: dict, resume: bool) -> bool:
    """Whether `run` may be written: empty, or the same config (resumed with --resume, or finished already)."""
    meta_path = run / "meta.json"
    if not run.exists() or not any(p for p in run.iterdir() if p.name != ".lock"):
        return False
    if not meta_path.exists():
        raise ProbeError(f"{run} holds files but no training run; accepted: another --output")
    meta = json.loads(meta_path.read_text())
    if meta.get("config") != cfg:
        diff = sorted(k for k in set(meta.get("config", {})) | set(cfg) if meta.get("config", {}).get(k) != cfg.get(k))
        raise ProbeError(f"{run} holds a different training run (differs in {', '.join(diff)}); accepted: "
                         "another --output")
    if meta.get("status") != "complete" and not resume:
        raise ProbeError(f"{run} holds an unfinished run of this config; accepted: --resume to continue it")
    return meta.get("status") == "complete"


def train(cfg: dict, output: str | Path | None = None, resume: bool = False, progress: bool = True,
          skip_complete: bool = False, minutes: float | None = None, callbacks: tuple = ()) -> Path:
    """Train `cfg` (see training/config.py) into its run folder; returns the folder. A finished run of the same
    config is left as it is (with `skip_complete`, found under the folder's lock, it raises RunComplete); an
    unfinished one continues from its last checkpoint with `resume`.

    `minutes`: a window: when the time is spent, the run checkpoints at its next logging step and stops (meta.json:
    status "paused", the step of the total, the measured rate and the time left at it); `resume` continues, and
    windows add up to the uninterrupted run (weights, optimizer state and log; bit for bit on the CPU).
    `callbacks`: TrainerCallbacks added to the run's Trainer.

    Launched as several processes (`accelerate launch --num_processes K -m probes train ...`, or torchrun), it trains
    data-parallel: `train.batch_size` is the global batch (each process takes batch_size / K of it), so a config
    means the same training on any number of processes; the main process alone writes the run's files."""
    from accelerate import PartialState
    from transformers.trainer_utils import get_last_checkpoint
    from transformers.utils import logging as hf_logging

    import datasets

    hf_logging.disable_progress_bar()  # "Writing model shards" at every checkpoint: noise next to the training bar
    datasets.disable_progress_bars()  # and text generators' tokenizing

    run = Path(output) if output else default_run_dir(cfg)
    if run.exists() and not run.is_dir():
        raise ProbeError(f"--output {str(run)!r} is a file; accepted: a folder")
    t = cfg["train"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    if t["batch_size"] % world:
        raise ProbeError(f"train.batch_size {t['batch_size']} is not divisible by {world} processes; accepted: a "
                         "global batch that is a multiple of the number of processes")
    args = _arguments(run, t, world, progress, generator(cfg))  # with several processes, this joins their process group
    state = PartialState()
    lock = RunLock(run) if state.is_main_process else None
    try:
        with state.main_process_first():  # the main process checks the folder and starts the run; then the others
            if lock is not None and not lock.acquire():
                raise RunBusy(f"{run} is being trained by another process; accepted: wait for it, or another --output")
            if _same_run(run, cfg, resume or not state.is_main_process):
                if skip_complete:
                    raise RunComplete(str(run))
                return run
            tok = tokenizer_for(cfg["task"])
            data = generator(cfg).splits(cfg["task"], tok)
            model = build_model(cfg, tok)
            meta = {"kind": "training", "config": cfg, "status": "running", "started": _now(), "processes": world,
                    "optimizer": _optimizer(t),
                    "params": int(sum(p.numel() for p in model.parameters())), **environment()}
            if state.is_main_process:
                atomic_write(run / "training.yaml", lambda f: yaml.safe_dump(cfg, f, sort_keys=False))
                write_json(run / "meta.json", meta)
        trainer = _trainer_class()(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                                   processing_class=tok,
                                   compute_metrics=functools.partial(_accuracy, whole_sequences=generator(cfg).whole_sequences),
                                   preprocess_logits_for_metrics=_argmax,
                                   data_collator=generator(cfg).collate(data))
        readout = generator(cfg).readout(cfg["task"])
        trainer.label_ids = tok.convert_tokens_to_ids(list(readout)) if readout else None
        trainer.task, trainer.extra_metrics = cfg["task"], generator(cfg).extra_metrics
        trainer.epoch_metrics = generator(cfg).epoch_metrics
        trainer.schedule, trainer.decay_all = scheduler_for(t), t.get("decay_all", False)

        class EpochStart(TrainerCallback):  # an epoch's first batch (not a resumed run's first batch mid-epoch)
            def on_epoch_begin(self, a, st, control, train_dataloader=None, **kw):
                trainer.epoch_start = train_dataloader is not None and st.global_step % len(train_dataloader) == 0

        class Log(TrainerCallback):  # the log as CSV after every logging step: a killed run keeps its curve
            def on_log(self, a, st, control, logs=None, **kw):
                if st.is_world_process_zero:
                    write_log(run, st.log_history)
                try:
                    check_finite_loss(logs or {}, st.global_step, cfg)
                except ProbeError as e:  # the run's folder says so: not "running" forever
                    if st.is_world_process_zero:
                        write_json(run / "meta.json", {**meta, "status": "failed", "error": str(e)})
                    raise

        trainer.add_callback(Log())
        trainer.add_callback(EpochStart())
        if minutes is not None:
            trainer.add_callback(Window(minutes))
        for callback in callbacks:  # the caller's TrainerCallbacks (benchmarks and tests count and time steps)
            trainer.add_callback(callback)
        if not progress:  # without a bar, Trainer prints every log dict instead: quiet means quiet
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        last = get_last_checkpoint(str(run)) if resume else None
        started, first = time.monotonic(), _step_of(last)
        trainer.train(resume_from_checkpoint=last)
        if trainer.state.global_step < trainer.state.max_steps:  # the window ran out: checkpointed, not finished
            if state.is_main_process:
                write_log(run, trainer.state.log_history)
                write_json(run / "meta.json", {**meta, "status": "paused", **progress_of(
                    trainer.state.global_step, trainer.state.max_steps, trainer.state.global_step - first,
                    time.monotonic() - started)})
            state.wait_for_everyone()
            return run
        final = _evaluation_at(trainer.state.log_history, trainer.state.global_step) or trainer.evaluate()
        trainer.save_model(str(run))  # final weights, config and tokenizer (main process): the folder loads as a model
        if state.is_main_process:
            write_log(run, trainer.state.log_history)
            plot_log(run, cfg)
            write_json(run / "meta.json", {**meta, "status": "complete", "finished": _now(),
                                           "steps": int(trainer.state.global_step),
                                           "final": {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}})
        state.wait_for_everyone()
        return run
    finally:
        if lock is not None:
            lock.release()
            if run.is_dir() and not any(run.iterdir()):  # refused before anything was written: nothing left behind
                run.rmdir()


@functools.lru_cache(maxsize=8)
def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, length, length) additive causal mask: 0 where a query may look, the dtype's lowest elsewhere (eager
    attention adds it to the scores; SDPA takes it as it is; a boolean one would add 0 or 1 in eager attention)."""
    keep = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)[None, None]


class Window(TrainerCallback):
    """Checkpoint and stop at the first logging step (`train.log_steps`) past `minutes` (the run's window). A logging
    step: Trainer logs the mean loss since the last one, and a run resumed between two would log the mean of its own
    steps only."""

    def __init__(self, minutes: float):
        self.deadline = time.monotonic() + 60 * minutes

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % args.logging_steps == 0 and state.global_step < state.max_steps and self._spent():
            control.should_save = control.should_training_stop = True
        return control

    def _spent(self) -> bool:
        """The main process's clock decides for every process (each stopping on its own clock could leave one
        waiting for the others' gradients)."""
        spent = time.monotonic() >= self.deadline
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from accelerate import PartialState

            flag = torch.tensor([int(spent)], device=PartialState().device)
            torch.distributed.broadcast(flag, src=0)
            spent = bool(flag.item())  # once per logging step
        return spent


def check_finite_loss(logs: dict, step: int, cfg: dict) -> None:
    """The loss is read at logging steps only (no per-step NaN check, which would stop the host at every step):
    a non-finite one stops the run there, with its checkpoints and log kept."""
    loss = logs.get("loss")
    if loss is not None and not math.isfinite(loss):
        raise ProbeError(f"training loss {loss} at step {step} of {cfg['name']}: the run diverged (its last "
                         f"checkpoints are kept); accepted: a lower train.lr, train.max_grad_norm > 0, or no "
                         "train.bf16")


def _step_of(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


def progress_of(step: int, total: int, steps_done: int, seconds: float) -> dict:
    """How far a paused run is: step of total, and the time left at this window's rate."""
    rate = steps_done / seconds if seconds > 0 and steps_done else None
    return {"steps": step, "total_steps": total, "steps_per_second": round(rate, 3) if rate else None,
            "eta_seconds": round((total - step) / rate, 1) if rate else None}


def _evaluation_at(history: list[dict], step: int) -> dict:
    """The metrics of the evaluation logged at `step` (the last one, when eval_steps divides the steps: no need to
    evaluate the same weights twice), or {} if none was."""
    at = {k: v for h in history if h.get("step") == step for k, v in h.items() if k.startswith("eval_")}
    return at if any(k.endswith("loss") for k in at) else {}


def _arguments(run: Path, t: dict, world: int, progress: bool, gen):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run), per_device_train_batch_size=t["batch_size"] // world, per_device_eval_batch_size=gen.eval_batch,
        learning_rate=t["lr"], warmup_steps=t["warmup_steps"],
        lr_scheduler_type="constant" if t["schedule"] == "cosine_per_epoch" else t["schedule"],  # ours replaces it
        lr_scheduler_kwargs={"min_lr": t["min_lr"]} if t["schedule"] == "cosine_with_min_lr" else {},
        weight_decay=t["weight_decay"], adam_beta2=t.get("adam_beta2", 0.999), optim=_optimizer(t),
        seed=t["seed"], data_seed=t["seed"], logging_nan_inf_filter=False, bf16=t.get("bf16", False),
        torch_compile="compile" in t, **({"torch_compile_mode": t["compile"]} if t.get("compile", "default") != "default"
                                         else {}),
        max_steps=t.get("steps", -1), num_train_epochs=t.get("epochs", 1), eval_strategy="steps",
        eval_steps=t["eval_steps"], save_strategy="steps", save_steps=t["save_steps"], logging_steps=t.get("log_steps", t["eval_steps"]),
        label_names=["target"], remove_unused_columns=False, report_to=[], disable_tqdm=not progress,
        dataloader_drop_last=t.get("drop_last", False), use_cpu=not torch.cuda.is_available(), save_only_model=False,
        ddp_find_unused_parameters=False, eval_on_start=gen.eval_on_start, max_grad_norm=t.get("max_grad_norm", 1.0))


def _optimizer(t: dict) -> str:
    """SGD, or AdamW fused into one kernel per step where this torch has it (no per-parameter host reads of the
    step count; the same update as the loop implementation, other rounding)."""
    if t.get("optimizer") == "sgd":
        return "sgd"
    fused_cpu = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)
    return "adamw_torch_fused" if fused_cpu or torch.cuda.is_available() else "adamw_torch"


NOT_LOGGED = ("_runtime", "_samples_per_second", "_steps_per_second")  # timings, not results
NOT_LOGGED_TRAIN = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")


def write_log(run: Path, history: list[dict]) -> None:
    rows = {}
    for h in history:
        step = h.get("step")
        if step is None:
            continue
        row = rows.setdefault(step, {"step": step})
        for k, v in h.items():
            if k in ("loss", "learning_rate", "epoch") or k.startswith("train_") and k not in NOT_LOGGED_TRAIN or (
                    k.startswith("eval_") and not k.endswith(NOT_LOGGED)):
                row[k] = v
    if rows:
        log = pd.DataFrame(sorted(rows.values(), key=lambda r: r["step"]))
        write_csv(run / "log.csv", log[["step", *sorted(c for c in log if c != "step")]])  # same order on resume


def plot_log(run: Path, cfg: dict) -> None:
    from ..reports.plots import plt, _save

    log = pd.read_csv(run / "log.csv")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    losses = ["loss", *(c for c in log if c.startswith("eval_") and c.endswith("loss"))]
    for col in (c for c in losses if c in log):  # eval_loss, or one per test set (eval_ic_loss, ...)
        d = log.dropna(subset=[col])
        a.plot(d.step, d[col], "o-", label="train" if col == "loss" else _test_name(col, "loss"), ms=3)
    readout = generator(cfg).readout(cfg["task"])
    a.set(xlabel="step", ylabel=f"loss ({len(readout)}-way cross-entropy)" if readout else "loss (next token)",
          title=run.name)
    a.legend(fontsize=8)
    for col in (c for c in log if c.startswith("eval_") and c.endswith("accuracy")):
        d = log.dropna(subset=[col])
        b.plot(d.step, d[col], "o-", ms=3, label=_test_name(col, "accuracy"))
    chance = generator(cfg).chance(cfg["task"])
    if chance is not None:
        b.axhline(chance, color="gray", ls=":", lw=1, label="commonest answer (positions)")
    b.legend(fontsize=8)
    b.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1.02))
    _save(fig, run / "plot.png")


def _test_name(column: str, metric: str) -> str:
    """eval_accuracy -> 'scored positions', eval_sequence_accuracy -> 'whole sequences', eval_ic_accuracy -> 'ic',
    eval_loss -> 'test'."""
    middle = column[len("eval_"):-len(metric)].strip("_")
    return {"": "test" if metric == "loss" else "scored positions", "sequence": "whole sequences"}.get(middle, middle)
