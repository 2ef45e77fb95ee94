"""The reference of every file a user writes: task files (each kind), prompts files, sweep files and training
configs; each field with its type, default, meaning and an example. Types and defaults are read from the code that
validates the files (the task dataclasses, the training defaults, the sweep's accepted keys), so the reference
cannot drift from them; `probe tasks --schema` prints it and docs/schema.md is its Markdown (a test keeps the two
equal: regenerate with `python -m probes.schema > docs/schema.md`)."""

from __future__ import annotations

import dataclasses
import typing

PROMPT_COLUMNS = {
    "prompt": ("required: the text the model reads", "The capital of France is"),
    "answer": ("required: the answer; a space goes before it unless the prompt ends in whitespace or it starts "
               "with some", "Paris"),
    "argument": ("optional, in every row or none: what the lens tracks (and ffn-readout needs)", "France"),
    "group": ("optional: a label to stratify --limit and to split accuracy by", "europe"),
}
PROMPT_OPTIONS = {
    "delimiter": ("put between the prompt and the answer (--task-option delimiter='')", "' '"),
    "ambiguous": ("flag (the default: your prompts are kept) or drop", "flag"),
    "seed": ("draws --limit samples and bootstrap resamples", "0"),
}
SWEEP_FIELDS = {
    "name": ("names the sweep's bookkeeping folder (default: the file's name)", "capitals-scale"),
    "models": ("registry names, hf:ORG/NAME@REV, checkpoint folders, config files, or globs of checkpoints",
               "[gpt2, gpt2-medium]"),
    "tasks": ("task names, task files or prompts files", "[capitals, capitals-extractive]"),
    "probes": ("probe names, every one on every task; or {probe: [its tasks]} without tasks",
               "[logit-lens, ffn-ablation]"),
    "seeds": ("task seeds, one unit each", "[0, 1, 2]"),
    "limit": ("as probe run --limit", "40"),
    "batch_size": ("as probe run --batch-size (or auto)", "8"),
    "options": ("probe options, as probe run's (underscores for dashes)", "{topk: 5, positions: all}"),
    "task_options": ("as --task-option; \"{task.n}\" takes the field from a trained model's config",
                     "{shots: 1}"),
    "load": ("dtype, quantize, device_map, max_memory, compute_dtype", "{dtype: bfloat16, quantize: 8bit}"),
    "results": ("where run folders go, relative to the sweep file", "results"),
    "slurm": ("partition, time, gpus, mem, cpus_per_task, gpu_mem, account, qos, extra (sbatch flags)",
              "{partition: gpu, time: '04:00:00'}"),
    "train": ("training units first: configs, set (a grid of --set values), seeds, runs, slurm",
              "{configs: [configs/training/nback-paper.yaml], set: {task.n: [1, 2]}, seeds: [0, 1]}"),
    "checkpoints": ("trained models: final (the default) or all (every checkpoint, for metrics over training)",
                    "all"),
    "lens": ("a tuned lens trained for every model first, into the cache --lens tuned reads (as probe lens train): "
             "tokens (default 2^20), corpus (stdlib-english, dataset:NAME, file:PATH), slurm; probes with "
             "options: {lens: tuned} wait for it; a lens of other tokens or corpus is trained again",
             "{tokens: 65536, corpus: stdlib-english}"),
}
TRAINING_FIELDS = {
    "name": ("the config's name; runs go to runs/<name>/n<N>-seed<S>", "nback-paper"),
    "task.generator": ("the task: nback, tree, icl (in-context classification) or text (language modelling)",
                       "nback"),
    "task.n": ("nback: N", "2"),
    "task.train": ("training sequences (the first ones of the seed); icl: fresh sequences per epoch", "800"),
    "task.test": ("held-out sequences, the next ones (evaluated, and the *-trained tasks' items); icl: per test "
                  "set (in, ic, ic2, iw); text: blocks of the held-out documents evaluated", "200"),
    "task.length": ("nback: letters per sequence", "24"),
    "task.matches": ("nback: targets per sequence", "8"),
    "task.letters": ("nback: the alphabet", "bcdfghjklnpqrstvwxyz"),
    "task.nodes": ("tree: nodes per tree", "16"),
    "task.order": ("tree: edge order (mixed, forward, backward, random)", "mixed"),
    "task.topological": ("tree: the topological order forward and backward follow: bfs (children as attached) or "
                         "networkx (ascending node number, as the authors' networkx.topological_sort)", "networkx"),
    "task.loss": ("nback: the positions scored, all (the authors') or from-n; tree: path (the path and the two "
                  "\",\" that end it) or authors (every token after the root through the padding)", "authors"),
    "task.classes": ("icl: classes K (a multiple of labels; class k has label k mod labels)", "512"),
    "task.labels": ("icl: labels L, the readout's choices", "32"),
    "task.pairs": ("icl: item-label pairs before the query", "8"),
    "task.max_pairs": ("icl: the one-hot position has 2 * max_pairs + 1 dimensions, shifted at random", "32"),
    "task.item_dim": ("icl: content dimensions (the model's width is 2 * max_pairs + 1 + item_dim)", "85"),
    "task.burstiness": ("icl: copies of each class in a bursty context", "2"),
    "task.p_bursty": ("icl: fraction of known-class training sequences that are bursty", "0.5"),
    "task.p_novel": ("icl: fraction of training sequences over novel classes", "0.5"),
    "task.noise": ("icl: within-class noise eps", "0.1"),
    "task.zipf": ("icl: Zipf exponent of the class frequencies (0: uniform)", "0.0"),
    "task.corpus": ("text: stdlib-english (a registry package's English text), dataset:NAME (through datasets, "
                    "e.g. dataset:roneneldan/TinyStories) or file:PATH (.jsonl or .txt)", "stdlib-english"),
    "task.vocab": ("text: tokens of the byte-level BPE trained on the training documents", "8192"),
    "task.context": ("text: tokens per training block (the model's context)", "256"),
    "task.holdout": ("text: every holdout-th document is held out for testing", "50"),
    "task.seed": ("draws the sequences (icl: the class means and label vectors too)", "0"),
    "model.architecture": ("probe_transformer, gpt2_value_residual or any supported family; the other model "
                           "fields are that config's values (n_layer, n_embd, ffn, norm, residual, ...)",
                           "probe_transformer"),
    "train.epochs": ("passes over the training sequences (or steps)", "10"),
    "train.steps": ("optimizer steps, instead of epochs", "1000"),
    "train.batch_size": ("global batch (split over data-parallel processes)", "32"),
    "train.lr": ("learning rate (the peak, after warm-up)", "1.0e-4"),
    "train.min_lr": ("cosine_with_min_lr, cosine_per_epoch: where the cosine ends", "2.0e-6"),
    "train.schedule": ("constant, linear, cosine, cosine_with_min_lr (per step) or cosine_per_epoch (torch's "
                       "CosineAnnealingLR stepped once per epoch: constant within an epoch; needs epochs)",
                       "constant"),
    "train.drop_last": ("drop each epoch's last short batch (false: train on it)", "true"),
    "train.warmup_steps": ("linear warm-up steps", "0"),
    "train.weight_decay": ("weight decay (AdamW's, decoupled; SGD's, scaled by the lr); on biases and "
                           "LayerNorms only with decay_all", "0.0"),
    "train.decay_all": ("weight decay on every parameter, biases and LayerNorms too (torch's AdamW given "
                        "model.parameters(), as Brinkmann et al.'s code); false: weights only", "true"),
    "train.optimizer": ("adamw (the default; fused into one kernel where this torch has it) or sgd (plain, no "
                        "momentum)", "sgd"),
    "train.bf16": ("bfloat16 autocast for the forward and backward (weights and optimizer state in float32)",
                   "true"),
    "train.compile": ("torch.compile the model with this mode: default, reduce-overhead (adds CUDA graphs) or "
                      "max-autotune", "default"),
    "train.max_grad_norm": ("clip gradients to this norm (transformers' default 1.0; 0: never)", "0"),
    "train.adam_beta2": ("AdamW's second beta (default 0.999)", "0.99"),
    "train.eval_steps": ("evaluate on the held-out sequences every this many steps", "25"),
    "train.log_steps": ("read the training loss (its mean since the last read) every this many steps, default "
                        "eval_steps; a --minutes window stops at the first of these past its time", "200"),
    "train.save_steps": ("write checkpoint-<step>/ every this many steps", "50"),
    "train.seed": ("initialisation and data order (--seed)", "0"),
}


def _type_name(hint) -> str:
    origin = typing.get_origin(hint) or hint
    return {int: "integer", str: "text", dict: "mapping", list: "list", bool: "boolean", float: "number"}.get(
        origin, str(hint))


def _task_classes() -> dict:
    """Each task class with the kinds it makes, in the registry's order (Task first: the fields of all)."""
    from .tasks.base import Task
    from .tasks.kinds import kinds

    out: dict = {Task: ["all"]}
    for kind, k in kinds().items():
        out.setdefault(k.cls, []).append(kind)
    return out


def task_fields() -> dict:
    """field -> (meaning, example) of every task-file field, from the kinds' SCHEMA: a field several kinds describe
    has their meanings joined and the first one's example; `kind` lists the registered kinds."""
    classes = _task_classes()
    out = {"kind": (", ".join(k for ks in list(classes.values())[1:] for k in ks)
                    + " (a prompts file has no task file)", "abstractive")}
    for cls in classes:
        for name, (meaning, example) in vars(cls).get("SCHEMA", {}).items():
            out[name] = (f"{out[name][0]}; {meaning}", out[name][1]) if name in out else (meaning, example)
    return out


def __getattr__(name: str):
    if name == "TASK_FIELDS":  # read when asked: a kind registered later has its rows too
        return task_fields()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def task_rows() -> list[tuple]:
    """(field, kinds, type, default, meaning, example) for every field of a task file."""
    meanings = task_fields()
    rows: dict[str, list] = {}
    for cls, kinds in _task_classes().items():
        kinds = ", ".join(kinds)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in ("path", "overrides"):
                continue
            if f.name in rows:  # inherited, or a field both kinds have (separator): its kinds grow
                if rows[f.name][1] != "all":
                    rows[f.name][1] += ", " + kinds
                continue
            default = ("(required)" if f.name in ("name", "version", "kind") else
                       repr(f.default) if f.default is not dataclasses.MISSING else repr(f.default_factory()))
            if f.name not in meanings:
                raise ValueError(f"task field {f.name!r} of {cls.__name__} has no meaning; accepted: an entry in "
                                 "its class's SCHEMA")
            rows[f.name] = [f.name, kinds, _type_name(hints[f.name]), default, *meanings[f.name]]
    return [tuple(r) for r in rows.values()]


def training_fields() -> dict:
    """{task.FIELD: (type, default by generator)} and {train.FIELD: (type, default)}, as the validator takes them."""
    from .training.config import DEFAULTS, TRAIN
    from .training.data import GENERATORS

    task: dict = {}
    for name, gen in GENERATORS.items():
        for key, (want, default) in gen.fields.items():
            task.setdefault(f"task.{key}", (want, {}))[1][name] = default
    return {**task, **{f"train.{k}": (want, DEFAULTS["train"].get(k)) for k, want in TRAIN.items()}}


def training_rows() -> list[tuple]:
    rows = [("name", "text", "the file's name", *TRAINING_FIELDS["name"])]
    for key, (want, default) in training_fields().items():
        if key == "task.generator":
            default = "'nback'"
        elif isinstance(default, dict):  # a task field: its default per generator
            default = ", ".join(f"{g}: {v!r}" for g, v in default.items()) if len(default) > 1 else repr(
                next(iter(default.values())))
        rows.append((key, _type_name(want), "-" if default is None else str(default), *TRAINING_FIELDS[key]))
    task_rows_end = 1 + sum(k.startswith("task.") for k in training_fields())
    rows.insert(task_rows_end, ("model.architecture", "text", "(required)", *TRAINING_FIELDS["model.architecture"]))
    return rows


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def option_rows() -> list[tuple]:
    from .methods.catalog import taking
    from .methods.option_types import OPTIONS

    return [(o.name, f"`{o.cli}`", taking(o.name), o.help) for o in OPTIONS.values()]


def markdown() -> str:
    """The whole reference, as docs/schema.md holds it."""
    from .runs.sweep import KEYS

    sweep = [(k, *SWEEP_FIELDS[k]) for k in sorted(KEYS, key=list(SWEEP_FIELDS).index)]
    return "\n\n".join([
        "# File reference\n\nEvery field of the files a user writes, with its type, default, meaning and an example. "
        "Generated from the code that validates them (`python -m probes.schema`; `probe tasks --schema` prints "
        "the task part). Unknown fields are refused with the list of accepted ones.",
        "## Task files (`tasks/*.yaml`, or any `.yaml` given to `--task`)\n\n"
        + _table(("field", "kinds", "type", "default", "meaning", "example"), task_rows()),
        "## Prompts files (`--prompts FILE`, or a `.csv`/`.jsonl` given to `--task` or a sweep)\n\n"
        "Columns:\n\n" + _table(("column", "meaning", "example"), [(k, *v) for k, v in PROMPT_COLUMNS.items()])
        + "\n\nTask options (`--task-option FIELD=VALUE`):\n\n"
        + _table(("option", "meaning", "example"), [(k, *v) for k, v in PROMPT_OPTIONS.items()]),
        "## Sweep files (`probe sweep FILE`; see `sweeps/`)\n\n" + _table(("field", "meaning", "example"), sweep),
        "## Probe options (`probe run --FLAG`, `probes.run(..., option=...)`, a sweep file's `options`)\n\n"
        "Declared once in `probes/methods/option_types.py`; each probe takes its own (default in parentheses).\n\n"
        + _table(("option", "flag", "probes", "meaning"), option_rows()),
        "## Training configs (`probe train CONFIG`; see `configs/training/`)\n\n"
        + _table(("field", "type", "default", "meaning", "example"), training_rows()),
    ]) + "\n"


def task_text() -> str:
    """The task-file part for the terminal (`probe tasks --schema`)."""
    out = ["task file fields (docs/schema.md has prompts files, sweep files and training configs too):"]
    for name, kinds, kind_type, default, meaning, example in task_rows():
        out.append(f"  {name} ({kind_type}; {kinds}; default {default}): {meaning}; e.g. {example}")
    out.append("prompts files (.csv/.jsonl): " + "; ".join(f"{k}: {v[0]}" for k, v in PROMPT_COLUMNS.items()))
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
