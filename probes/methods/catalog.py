"""The probes by name: what each runs per batch, how it summarizes and reports a table, what it plots, which
options it takes and what it needs from loading. Execution (runs/execution.py) and the CLI read only this table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import ProbeError, choice_error
from ..reports import plots
from . import attention, contrast, ffn_ablation, icl_score, induction, ffn_readout, ffn_transplant, linear_probe, nback, patching
from .accuracy import report_accuracy, run_accuracy, summarize_accuracy
from .lens import VOCABS, parse_positions, prepare_lens, report_lens, run_lens, summarize_lens
from .names import COUNTS, NAMES, count_value

ALL_KINDS = ("abstractive", "extractive", "nback", "tree", "ioi", "prompts")  # of the probes that read answers
RELATIONAL = ("abstractive", "extractive")


@dataclass(frozen=True)
class Probe:
    run: Callable  # (loaded, items, **options) -> rows
    summarize: Callable  # (DataFrame, seed=...) -> dict; the seed draws its bootstrap resamples and held-out halves
    report: Callable  # (DataFrame, summary) -> printable text
    about: str
    plot: Callable | None  # (DataFrame, meta, path) -> writes a figure
    options: tuple[str, ...] = ()  # names of the command-line options it takes
    prepare: Callable | None = None  # (loaded, task, items, options) -> (items, state, meta), once per run
    run_options: tuple[str, ...] = ()  # the options `run` takes (the rest go to `prepare` only)
    load: dict = field(default_factory=dict)  # what it needs from loading (eager attention)
    passes: Callable = lambda n_layers, options: 1  # forward passes per prompt, for Slurm time limits
    defaults: dict = field(default_factory=dict)  # option values used when none is given (part of a run's identity)
    kinds: tuple[str, ...] = ALL_KINDS  # the task kinds it runs on
    needs_argument: bool = False  # it tracks each item's argument (a prompts file must give one)
    truncates: bool = False  # it reads each prompt's first context-length tokens (documents may be longer)
    nback_unit: str | None = "trial"  # on N-back tasks, the items it takes: trials (scored answers), whole
    # sequences (no answers), or None for either


PROBES: dict[str, Probe] = {
    "logit-lens": Probe(run_lens, summarize_lens, report_lens,
                        "decode the residual stream at every layer (0 = embeddings), at the last or chosen positions",
                        plots.plot_lens, ("topk", "positions", "vocab"), prepare=prepare_lens,
                        run_options=("topk", "positions", "vocab"),
                        defaults={"topk": 5}, kinds=(*ALL_KINDS, "icl")),
    "accuracy": Probe(run_accuracy, summarize_accuracy, report_accuracy,
                      "greedy answer: is the answer's first token the top-1 next token", None, ("vocab",),
                      run_options=("vocab",), kinds=(*ALL_KINDS, "icl")),
    "ffn-readout": Probe(ffn_readout.run_readout, ffn_readout.summarize_readout, ffn_readout.report_readout,
                         "each block's FFN update decoded, its norm and effect on the answer; stage layers", plots.plot_readout,
                         ("topk", "vocab"), prepare=ffn_readout.prepare_readout, run_options=("topk", "vocab"),
                         defaults={"topk": 5}, needs_argument=True),
    "ffn-transplant": Probe(ffn_transplant.run_transplant, ffn_transplant.summarize_transplant, ffn_transplant.report_transplant,
                            "put a source prompt's FFN update o into other prompts (add or replace), with controls",
                            plots.plot_transplant,
                            ("mode", "layers", "scales", "positions", "controls", "sources", "source_items",
                             "source_layer", "context", "vocab"), prepare=ffn_transplant.prepare_transplant,
                            run_options=("mode", "layers", "scales", "positions", "controls", "vocab"),
                            passes=ffn_transplant.transplant_passes, defaults={"controls": True}, kinds=RELATIONAL),
    "ffn-ablation": Probe(ffn_ablation.run_ablation, ffn_ablation.summarize_ablation, ffn_ablation.report_ablation,
                          "zero (or identity-replace) FFN updates of chosen blocks, or the top sixths", plots.plot_ablation,
                          ("layers", "how", "vocab"), run_options=("layers", "how", "vocab"),
                          passes=lambda n_layers, opts: len(ffn_ablation.ablation_variants(n_layers, opts.get("layers")))),
    "nback": Probe(nback.run_nback, nback.summarize_nback, nback.report_nback,
                   "N-back hit rate, false alarms, accuracy and signed d' by N", plots.plot_nback, kinds=("nback",)),
    "attention": Probe(attention.run_attention, attention.summarize_attention, attention.report_attention,
                       "attention entropy and mass to the N-back letter, by N x layer x head", plots.plot_attention,
                       load=attention.EAGER, kinds=("nback", "icl"), nback_unit="sequence"),
    "activation-patching": Probe(patching.run_patching, patching.summarize_patching, patching.report_patching,
                                 "clean activations into a corrupted run (or back) per site, block and position: "
                                 "logit-difference recovery", plots.plot_patching,
                                 ("sites", "layers", "positions", "direction"), prepare=patching.prepare_patching,
                                 run_options=("sites", "layers", "positions", "direction"),
                                 passes=patching.patching_passes,
                                 defaults={"sites": "resid", "positions": "all", "direction": "denoise"},
                                 kinds=(*RELATIONAL, "nback", "tree", "ioi", "icl")),
    "linear-probe": Probe(linear_probe.run_linear_probe, linear_probe.summarize_linear_probe,
                          linear_probe.report_linear_probe,
                          "logistic-regression probes per layer for a label of the items, held out, against "
                          "shuffled labels and random weights", plots.plot_linear_probe, ("label", "site", "position", "erase"),
                          prepare=linear_probe.prepare_linear_probe, run_options=("label", "site", "position"),
                          passes=lambda n_layers, opts: 2, defaults={"label": "group", "site": "resid", "position": "last"},
                          kinds=(*ALL_KINDS, "icl"), nback_unit=None),
    "logit-difference": Probe(contrast.run_contrast, contrast.summarize_contrast, contrast.report_contrast,
                              "the answer against the item's argument as the next token (IOI: indirect object against "
                              "subject): logit difference and probabilities", None, needs_argument=True,
                              kinds=(*RELATIONAL, "ioi", "prompts")),
    "induction": Probe(induction.run_induction, induction.summarize_induction, induction.report_induction,
                       "induction-head score per head and the loss drop on repeated random sequences",
                       induction.plot_induction, load=induction.EAGER, kinds=("repeat",)),
    "icl-score": Probe(icl_score.run_icl_score, icl_score.summarize_icl_score, icl_score.report_icl_score,
                       "in-context learning score: loss at a late token minus at an early one, over documents",
                       icl_score.plot_icl_score, ("early", "late"), run_options=("early", "late"),
                       defaults={"early": 50, "late": 500}, kinds=("text",), truncates=True),
}


assert tuple(PROBES) == NAMES, "probes/methods/names.py must list the probes of PROBES, in order"


def get_probe(name: str) -> Probe:
    if name not in PROBES:
        raise choice_error("probe", name, PROBES)
    return PROBES[name]


def check_task(probe: str, task) -> None:
    """Refuse, before any model loads, a task the probe cannot run on: another kind, or prompts without the
    argument it tracks."""
    spec = get_probe(probe)
    if task.kind not in spec.kinds:
        raise ProbeError(f"probe {probe!r} does not run on {task.kind} task {task.name!r}; accepted: "
                         f"{', '.join(spec.kinds)} tasks")
    if task.kind == "nback" and spec.nback_unit not in (None, task.unit):
        takes = {"trial": "N-back trials, whose answers it scores (e.g. --task nback)",
                 "sequence": "whole N-back sequences (e.g. --task nback-sequence)"}[spec.nback_unit]
        raise ProbeError(f"probe {probe!r} takes {takes}, and task {task.name!r} has one item per {task.unit} "
                         f"(unit: {task.unit}); accepted: a task with unit: {spec.nback_unit}")
    if spec.needs_argument and task.kind == "prompts" and not all(it.argument for it in task.items()):
        raise ProbeError(f"probe {probe!r} tracks each item's argument, and task {task.name!r} gives none; accepted: "
                         "an argument column in the prompts file (or --argument)")


def probe_options(probe: str, options: dict | None, strict: bool = False) -> dict:
    """The options `probe` takes, with its defaults for those not given (what identifies its computation).
    strict: an option it does not take is an error (a user's own call); else it is left out (a sweep's options
    are shared by all its probes)."""
    spec = get_probe(probe)
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if strict and set(given) - set(spec.options):
        bad = sorted(set(given) - set(spec.options))[0]
        raise ProbeError(f"probe {probe!r} takes no option {bad!r}; accepted: "
                         + (", ".join(spec.options) if spec.options else "none"))
    chosen = {**spec.defaults, **{k: v for k, v in given.items() if k in spec.options}}
    chosen.update({k: count_value(k, v) for k, v in chosen.items() if k in COUNTS})
    if chosen.get("vocab", "all") not in VOCABS:  # values that need no model, checked before one loads
        raise ProbeError(f"unknown --vocab {chosen['vocab']!r}; accepted: {', '.join(VOCABS)}")
    if probe == "logit-lens":
        parse_positions(chosen.get("positions"))
    return chosen


def check_bounds(options: dict, loaded) -> None:
    """Option values whose upper bound is the loaded model's: more top-k tokens than its vocabulary has, a source
    block past its last."""
    vocab, blocks = loaded.arch.vocab_size, loaded.arch.n_layers
    if options.get("topk") is not None and options["topk"] > vocab:
        raise ProbeError(f"bad topk {options['topk']} for {loaded.spec.name}; accepted: 1 to {vocab} (its vocabulary)")
    if options.get("source_layer") is not None and options["source_layer"] >= blocks:
        raise ProbeError(f"bad source_layer {options['source_layer']} for {loaded.spec.name}; accepted: blocks 0 to "
                         f"{blocks - 1}")
