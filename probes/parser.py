"""The `probe` command's arguments (argparse), with errors on one line; cli.py runs what they name."""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the value, what is accepted, where help is) and exit status 2.
    `valued`: flags whose value may start with '-' (`--positions -3:`, `--scales -1,2`): argparse takes such a
    word for a flag, so `--flag -x` is read as `--flag=-x`."""

    valued: frozenset = frozenset()

    def parse_known_args(self, args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        joined = []
        for word in words:
            if joined and joined[-1] in self.valued and word.startswith("-") and not word.startswith("--") \
                    and word != "-h":
                joined[-1] = f"{joined[-1]}={word}"
            else:
                joined.append(word)
        return super().parse_known_args(joined, namespace)

    def error(self, message: str):
        self.exit(2, f"probe: error: {message} (see {self.prog} --help)\n")


def _count(minimum: int):
    """An argparse type: an integer of at least `minimum`, named in the error otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer of at least {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a confidence level between 0 and 1, e.g. 0.9")
    return value


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """The `probe` command's arguments; `commands` maps each subcommand to the function that runs it."""
    from .methods.catalog import PROBES
    from .methods.option_types import OPTIONS

    p = Parser(prog="probe", description="Probe the internals of pretrained language models.")
    p.valued = frozenset(o.cli for o in OPTIONS.values() if o.switch is None)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("models", help="list the model registry").set_defaults(func=commands["models"])
    t = sub.add_parser("tasks", help="list tasks with item counts")
    t.add_argument("--model", help="also count the items ambiguous for this model's tokenizer")
    t.add_argument("--schema", action="store_true", help="print every field of a task file (type, default, meaning, "
                                                         "example) instead; docs/schema.md has all file formats")
    t.set_defaults(func=commands["tasks"])
    pr = sub.add_parser("prompt", help="show the exact text, token ids and target a model will see")
    pr.add_argument("--task", required=True, help="task name (see `probe tasks`) or task file .yaml")
    pr.add_argument("--model", required=True, help="model whose tokenizer shows the tokens (registry name or folder)")
    pr.add_argument("--index", type=_count(0), default=0, help="which item of the task (default 0, the first)")
    pr.add_argument("--task-option", action="append", metavar="FIELD=VALUE",
                    help="override a field of the task file, e.g. shots=1 (repeatable)")
    pr.set_defaults(func=commands["prompt"])
    r = sub.add_parser("run", help="run a probe on a task")
    r.add_argument("--model", required=True, help="registry name, checkpoint folder, or config .json/.yaml")
    r.add_argument("--task", help="task name(s), comma-separated (see `probe tasks`), a task .yaml file, or a prompts "
                                  ".csv/.jsonl file (one of --task, --prompts, --prompt is required)")
    r.add_argument("--prompts", metavar="FILE", help="a CSV or JSONL file of prompts: columns prompt, answer, and "
                                                     "optionally argument, group (README: Prompts)")
    r.add_argument("--prompt", metavar="TEXT", help="one prompt, with --answer (and optionally --argument)")
    r.add_argument("--answer", metavar="TEXT", help="with --prompt: the answer whose first token is scored; a space "
                                                    "goes before it unless one side has whitespace")
    r.add_argument("--argument", metavar="TEXT", help="with --prompt: the argument the lens tracks (e.g. Poland)")
    r.add_argument("--probe", default="logit-lens", help="what to run (default logit-lens): "
                   + ", ".join(PROBES) + " (the README describes each)")
    r.add_argument("--task-option", action="append", metavar="FIELD=VALUE",
                   help="override a task field, e.g. n=2 or shots=3 (repeatable)")
    r.add_argument("--limit", type=_count(1), help="N scored items, drawn stratified by group with the task's seed "
                                                   "(default: every item)")
    r.add_argument("--batch-size", default="8", help="prompts per forward pass, or 'auto': the largest that fits "
                                                     "(halved on out-of-memory)")
    r.add_argument("--ci", type=_level, default=0.95, help="confidence level of every interval (default 0.95)")
    f = r.add_argument_group("probe options (each probe takes its own; `probes.options()` in Python)")
    for o in OPTIONS.values():
        if o.switch is not None:
            f.add_argument(o.cli, dest=o.name, action="store_const", const=o.switch, help=o.help)
        else:
            f.add_argument(o.cli, dest=o.name, help=o.help, **({} if o.least is None else {"type": _count(o.least)}))
    r.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the registry entry's)")
    r.add_argument("--quantize", help="8bit or 4bit (bitsandbytes)")
    r.add_argument("--compute-dtype", help="quantized models: the dtype activations are computed and read in "
                                           "(default: the entry's bnb_4bit_compute_dtype, else bfloat16)")
    r.add_argument("--device-map", help="where the model goes: cpu, cuda, cuda:N, or spread by accelerate: auto, "
                   "balanced, balanced_low_0, sequential (default: the first GPU if it fits, else every GPU and the "
                   "CPU beyond; the CPU without a GPU)")
    r.add_argument("--max-memory", help="per-device limits, e.g. '0=75GiB,cpu=200GiB'")
    r.add_argument("--remote", action="store_true", help="run on NDIF through nnsight (hub models it hosts; "
                                                          "API key from NDIF_API_KEY)")
    r.add_argument("--gpus", type=_count(0), help="spread the model over the first N GPUs (device map auto)")
    r.add_argument("--output", help="run folder (default: results/<model>/<task>/<probe>)")
    r.add_argument("--overwrite", action="store_true", help="discard an existing run in the output folder")
    r.add_argument("--no-self-check", action="store_true",
                   help="go on when the self-check fails (before the first batch, on the run's first prompts: the "
                   "lens of the last layer equals the logits, block output = input + attention + FFN update, a "
                   "left-padded prompt gets the logits it gets alone); the failure is recorded in meta.json")
    r.set_defaults(func=commands["run"])
    tr = sub.add_parser("train", help="train a model on a synthetic task (a training config); the run loads as --model")
    tr.add_argument("config", help="training config .yaml (see configs/training/)")
    tr.add_argument("--output", help="run folder (default: runs/<name>/n<N>-seed<S>)")
    tr.add_argument("--resume", action="store_true", help="continue an unfinished run from its last checkpoint")
    tr.add_argument("--seed", type=_count(0), help="training seed (initialisation, data order); overrides train.seed")
    tr.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                    help="override a config field, e.g. task.n=3 or train.steps=100 (repeatable)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--minutes", type=float, metavar="M", help="a window: checkpoint and stop at the first "
                    "train.log_steps step after M minutes (meta.json: step of total, time left); --resume continues")
    tr.set_defaults(func=commands["train"])
    ln = sub.add_parser("lens", help="tuned lenses (probe run --lens tuned): train one for a model")
    lt = ln.add_subparsers(dest="lens_command", required=True, parser_class=Parser).add_parser(
        "train", help="train a tuned lens on English text, cached per model (README: The tuned lens)")
    lt.add_argument("--model", required=True, help="registry name, checkpoint folder or config file")
    lt.add_argument("--tokens", type=_count(1), help="training tokens (default 2^20; the tuned-lens "
                    "package trains on 250 x 2^18)")
    lt.add_argument("--corpus", help="stdlib-english (default), dataset:NAME or file:PATH "
                    "(.jsonl or .txt), as training configs name corpora")
    lt.add_argument("--output", help="lens folder (default: the model's in the cache, which --lens tuned reads)")
    lt.set_defaults(func=commands["lens"])
    pl = sub.add_parser("plan", help="memory, device map and GPUs needed, from the model's config alone")
    pl.add_argument("--model", required=True, help="registry name, checkpoint folder or config file")
    pl.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the registry entry's)")
    pl.add_argument("--quantize", help="8bit or 4bit (default: none; all three are listed)")
    pl.add_argument("--compute-dtype", help="quantized: dtype of the layers left unquantized (default bfloat16)")
    pl.add_argument("--gpus", type=_count(0), help="refuse unless it fits on this many GPUs")
    pl.add_argument("--gpu-mem", default="80GiB", help="memory of one GPU (default 80GiB)")
    pl.add_argument("--batch-size", type=_count(1), default=8, help="prompts per forward pass (default 8)")
    pl.add_argument("--seq-len", type=_count(1), default=64, help="prompt length in tokens (default 64)")
    pl.set_defaults(func=commands["plan"])
    sw = sub.add_parser("sweep", help="run a sweep file (models x tasks x probes x seeds) locally or on Slurm")
    sw.add_argument("file", help="sweep file .yaml (see sweeps/ and probes/runs/sweep.py)")
    sw.add_argument("--executor", default="local", help="local (in this process) or slurm (job arrays via sbatch)")
    sw.add_argument("--unit", action="append", help="only this unit (model/task/probe[/seed-N]); repeatable")
    sw.add_argument("--dry-run", action="store_true", help="list the units that would run (slurm: write the job "
                    "scripts), run and submit nothing")
    sw.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then print the status")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sw.set_defaults(func=commands["sweep"])
    st = sub.add_parser("status", help="done / running / queued / failed / pending for each unit of a sweep")
    st.add_argument("file", help="sweep file .yaml whose units to show")
    st.set_defaults(func=commands["status"])
    ag = sub.add_parser("aggregate", help="tables across all complete runs (CSV, Parquet, Markdown)")
    ag.add_argument("results", nargs="?", help="results folder (default: results/)")
    ag.add_argument("--by", default="model,task,probe", help="group rows by these columns, averaging the rest "
                                                             "(of model, task, probe, seed, family, kind, params)")
    ag.add_argument("--out", help="folder for the tables (default: RESULTS/aggregate)")
    ag.add_argument("--ci", type=_level, default=0.95, help="confidence level of pooled intervals (default 0.95)")
    ag.add_argument("--trend", metavar="FIELD[:LOW-HIGH]", help="a numeric task option or training config field "
                    "(e.g. n, or n:1-3 for those values only): each metric's slope over it, the runs (models) as "
                    "replicates, in <table>-trend tables")
    ag.set_defaults(func=commands["aggregate"])
    rp = sub.add_parser("report", help="a static HTML page of the tables and plots, viewable offline")
    rp.add_argument("results", nargs="?", help="results folder (default: results/)")
    rp.add_argument("--by", default="model,task,probe", help="group rows by these columns, as probe aggregate "
                    "(default model,task,probe)")
    rp.add_argument("--out", help="HTML file (default: RESULTS/report.html)")
    rp.add_argument("--ci", type=_level, default=0.95, help="confidence level of pooled intervals (default 0.95)")
    rp.add_argument("--trend", metavar="FIELD", help="as probe aggregate --trend")
    rp.set_defaults(func=commands["report"])
    return p
