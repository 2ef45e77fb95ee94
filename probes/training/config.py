"""Training configs: one YAML file, validated field by field before anything trains.

    name: nback-paper
    task: {generator: nback, n: 2, train: 800, test: 200, length: 24, matches: 8,
           letters: bcdfghjklnpqrstvwxyz, seed: 0}   # or {generator: tree, nodes: 16, train, test, order, seed}
    model: {architecture: probe_transformer, n_layer: 1, n_head: 1, n_embd: 512, ffn: false, norm: false,
            residual: false}            # or architecture: gpt2 (any supported family's config values)
    train: {epochs: 10, batch_size: 32, lr: 1.0e-4, schedule: constant, warmup_steps: 0, weight_decay: 0.0,
            eval_steps: 25, save_steps: 50, seed: 0}   # or steps: N instead of epochs
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..errors import ProbeError, read_yaml

from ..tasks import icl_sequences
from .data import GENERATORS

SCHEDULES = ("constant", "linear", "cosine", "cosine_with_min_lr", "cosine_per_epoch")
MIN_LR = ("cosine_with_min_lr", "cosine_per_epoch")  # the schedules that end at train.min_lr
TRAIN = {"epochs": int, "steps": int, "batch_size": int, "lr": float, "min_lr": float, "schedule": str,
         "warmup_steps": int, "weight_decay": float, "adam_beta2": float, "optimizer": str, "max_grad_norm": float, "eval_steps": int,
         "log_steps": int, "save_steps": int, "seed": int, "drop_last": bool, "decay_all": bool, "bf16": bool, "compile": str}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes (train.compile)
OPTIMIZERS = ("adamw", "sgd")
# min_lr (cosine_with_min_lr, cosine_per_epoch), adam_beta2 (default 0.999), optimizer (adamw; or sgd, without
# momentum), max_grad_norm (transformers' 1.0; 0: no clipping) and drop_last (false: the last short batch of an epoch
# is trained on) have no entry: a config without them is unchanged; log_steps (the training loss's mean is read, and
# a --minutes window may stop, every this many steps) defaults to eval_steps; decay_all (true: weight decay on every
# parameter, biases and LayerNorms too, as torch's AdamW given model.parameters()) defaults to false
DEFAULTS = {"train": {"epochs": 10, "batch_size": 32, "lr": 1e-4, "schedule": "constant", "warmup_steps": 0,
                      "weight_decay": 0.0, "eval_steps": 25, "save_steps": 50, "seed": 0}}
POSITIVE = {"n", "nodes", "train", "test", "length", "epochs", "steps", "batch_size", "eval_steps", "save_steps",
            "log_steps"}


def _set(cfg: dict, dotted: str, value, where: str) -> None:
    section, _, key = dotted.partition(".")
    if section not in ("task", "model", "train") or not key:
        raise ProbeError(f"{where}: bad --set {dotted!r}; accepted: task.FIELD, model.FIELD or train.FIELD")
    cfg.setdefault(section, {})[key] = value


def load_training_config(path: str | Path, overrides: dict | None = None, seed: int | None = None) -> dict:
    """The config of `path` with defaults filled, `overrides` ({'task.n': 3}) and `seed` (train.seed) applied."""
    where = str(path)
    data = read_yaml(path, "training config")
    if not isinstance(data, dict):
        raise ProbeError(f"training config {where!r} must be a mapping with task, model and train")
    unknown = set(data) - {"name", "task", "model", "train"}
    if unknown:
        raise ProbeError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; accepted: name, task, model, train")
    cfg = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        _set(cfg, dotted, value, where)
    if seed is not None:
        _set(cfg, "train.seed", seed, where)
    for section in ("task", "model", "train"):
        if not isinstance(cfg.get(section, {}), dict):
            raise ProbeError(f"{where}: {section} must be a mapping")
    cfg["name"] = str(cfg.get("name") or Path(path).stem)
    generator = cfg.get("task", {}).get("generator", "nback")
    if generator not in GENERATORS:
        raise ProbeError(f"{where}: unknown task generator {generator!r}; accepted: {', '.join(GENERATORS)}")
    fields = GENERATORS[generator].fields
    cfg["task"] = {**{k: default for k, (_, default) in fields.items()}, **cfg.get("task", {})}
    cfg["train"] = {**DEFAULTS["train"], **cfg.get("train", {})}
    if "steps" in cfg["train"]:
        cfg["train"].pop("epochs", None)
    for section, schema in (("task", {k: want for k, (want, _) in fields.items()}), ("train", TRAIN)):
        for key, value in cfg[section].items():
            if key not in schema:
                raise ProbeError(f"{where}: unknown {section} field {key!r}; accepted: {', '.join(schema)}")
            want = schema[key]
            ok = isinstance(value, bool) if want is bool else (
                isinstance(value, (int, float) if want is float else want) and not isinstance(value, bool))
            if not ok:
                name = {float: "a number", bool: "true or false"}.get(want, want.__name__)
                raise ProbeError(f"{where}: {section}.{key} {value!r} is not {name}")
            if key in POSITIVE and value < 1:
                raise ProbeError(f"{where}: {section}.{key} {value!r}; accepted: a positive integer")
    GENERATORS[generator].check(cfg["task"], where)
    if "train" not in fields and "steps" not in cfg["train"]:
        raise ProbeError(f"{where}: task generator {generator!r} has no fixed number of training sequences; "
                         "accepted: train.steps instead of train.epochs")
    if (cfg["train"]["schedule"] in MIN_LR) != ("min_lr" in cfg["train"]):
        raise ProbeError(f"{where}: train.min_lr goes with schedule cosine_with_min_lr or cosine_per_epoch (both or "
                         "neither)")
    if cfg["train"]["schedule"] == "cosine_per_epoch" and ("steps" in cfg["train"] or cfg["train"]["warmup_steps"]):
        raise ProbeError(f"{where}: schedule cosine_per_epoch steps its cosine once per epoch, with no warm-up; "
                         "accepted: train.epochs (not train.steps) and train.warmup_steps 0")
    if cfg["train"].get("decay_all") and not cfg["train"]["weight_decay"]:
        raise ProbeError(f"{where}: train.decay_all true with weight_decay 0 decays nothing; accepted: a "
                         "weight_decay > 0, or no decay_all")
    if cfg["train"].get("max_grad_norm", 1.0) < 0:
        raise ProbeError(f"{where}: train.max_grad_norm {cfg['train']['max_grad_norm']}; accepted: a norm >= 0 "
                         "(0: no clipping)")
    if cfg["train"].get("compile", "default") not in COMPILE_MODES:
        raise ProbeError(f"{where}: train.compile {cfg['train']['compile']!r}; accepted: {', '.join(COMPILE_MODES)} "
                         "(torch.compile's mode; reduce-overhead adds CUDA graphs)")
    if cfg["train"].get("optimizer", "adamw") not in OPTIMIZERS:
        raise ProbeError(f"{where}: unknown train.optimizer {cfg['train']['optimizer']!r}; accepted: "
                         f"{', '.join(OPTIMIZERS)}")
    if cfg["train"]["schedule"] not in SCHEDULES:
        raise ProbeError(f"{where}: unknown schedule {cfg['train']['schedule']!r}; accepted: {', '.join(SCHEDULES)}")
    model = cfg.get("model", {})
    if "architecture" not in model:
        raise ProbeError(f"{where}: model needs an architecture; accepted: probe_transformer or a supported family")
    width, heads = model.get("n_embd", model.get("hidden_size")), model.get("n_head", model.get("num_attention_heads"))
    if generator == "icl" and width != icl_sequences.width(cfg["task"]):
        need = icl_sequences.width(cfg["task"])
        raise ProbeError(f"{where}: model width {width} differs from the task's vectors ({need}: 2 * max_pairs + 1 "
                         f"position dimensions + item_dim); accepted: n_embd {need}")
    if isinstance(width, int) and isinstance(heads, int) and (heads < 1 or width % heads):
        raise ProbeError(f"{where}: width {width} is not divisible by {heads} heads; accepted: a width that is a "
                         "multiple of the number of heads")
    return cfg


def total_steps(cfg: dict, processes: int = 1) -> int:
    """Optimizer steps of a run: `train.steps`, or epochs x batches per epoch (the last batch may be short, or
    dropped with `train.drop_last`)."""
    t = cfg["train"]
    if "steps" in t:
        return int(t["steps"])
    return int(t["epochs"]) * steps_per_epoch(cfg, processes)


def steps_per_epoch(cfg: dict, processes: int = 1) -> int | None:
    """Optimizer steps per pass over the training sequences (the last batch short, or dropped with
    `train.drop_last`); None where the generator has no fixed training set."""
    sequences, batch = cfg["task"].get("train"), int(cfg["train"]["batch_size"]) * processes
    if not sequences:
        return None
    return int(sequences) // batch if cfg["train"].get("drop_last") else -(-int(sequences) // batch)


def checkpoint_steps(cfg: dict) -> list[int]:
    """The steps whose checkpoint-<step> folders a run writes: every save_steps, and the last step."""
    last, every = total_steps(cfg), int(cfg["train"]["save_steps"])
    return sorted({*range(every, last + 1, every), last})
