"""The probes by name: what each runs per batch, how it summarizes and reports a table, what it plots, which
options it takes (declared in option_types.py) with which defaults, and what it needs from loading. Execution,
the run plan, the command line and sweeps read only this table.

Torch-free: a probe's functions are named "module:function" (a module of this package, or a dotted path) and
imported when first called, so the command line lists and checks probes before anything heavy is imported.
A new probe is one module of functions plus one `register(Probe(...))` here (or in a test)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ProbeError, choice_error
from .option_types import OPTIONS, blocks
from .positions import FORMS, check_grammar, check_positions

ALL_KINDS = ("abstractive", "extractive", "nback", "tree", "ioi", "prompts")  # of the probes that read answers
RELATIONAL = ("abstractive", "extractive")
EAGER = {"attn_implementation": "eager"}  # attention weights are only returned by the eager implementation


class Lazy:
    """A function named "module:function", imported on its first call."""

    def __init__(self, ref: str):
        self.ref, self._fn = ref, None

    def __call__(self, *args, **kwargs):
        if self._fn is None:
            module, _, name = self.ref.partition(":")
            path = module if "." in module else f"{__package__}.{module}"
            self._fn = getattr(importlib.import_module(path), name)
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Lazy({self.ref!r})"


def _fn(ref):
    return Lazy(ref) if isinstance(ref, str) else ref


@dataclass(frozen=True)
class Probe:
    name: str
    about: str
    run: Callable  # (loaded, items, **run options) -> rows
    summarize: Callable  # (DataFrame, seed=...) -> dict; the seed draws its bootstrap resamples and held-out halves
    report: Callable  # (DataFrame, summary) -> printable text
    plot: Callable | None = None  # (DataFrame, meta, path) -> writes a figure
    options: dict = field(default_factory=dict)  # the options it takes (names of OPTIONS) -> default (None: none)
    prepare: Callable | None = None  # (loaded, task, items, options) -> (items, state, meta), once per run
    run_options: tuple[str, ...] = ()  # the options `run` takes (the rest go to `prepare` only)
    load: dict = field(default_factory=dict)  # what it needs from loading (eager attention)
    passes: Callable = lambda n_layers, options: 1  # (n_layers, options) -> forward passes per prompt (Slurm limits)
    kinds: tuple[str, ...] = ALL_KINDS  # the task kinds it runs on
    needs_argument: bool = False  # it tracks each item's argument (a prompts file must give one)
    truncates: bool = False  # it reads each prompt's first context-length tokens (documents may be longer)
    nback_unit: str | None = "trial"  # on N-back tasks, the items it takes: trials (scored answers), whole
    # sequences (no answers), or None for either
    position_forms: tuple[str, ...] = FORMS  # the forms of the positions grammar its positions option takes
    layers_also: tuple[str, ...] = ()  # the names its --layers takes beside blocks (ffn-ablation: sixths)
    word: str = ""  # how its errors name it ("unknown lens position ...")
    needs_ffn: bool = False  # it reads FFN updates (a model without FFN blocks is refused)
    compare: Callable | None = None  # (tables, kinds, folder) -> text: several tasks' runs side by side
    check: Callable | None = None  # (task, options) -> None: what else the plan refuses (options that exclude or
    # need each other, values only the task can judge); torch-free, it runs before any model loads

    def __post_init__(self):
        for role in ("run", "summarize", "report", "plot", "prepare", "passes", "compare", "check"):
            object.__setattr__(self, role, _fn(getattr(self, role)))
        unknown = set(self.options) - set(OPTIONS)
        assert not unknown, f"probe {self.name!r} declares options no one parses: {unknown}"

    @property
    def defaults(self) -> dict:
        return {k: v for k, v in self.options.items() if v is not None}


PROBES: dict[str, Probe] = {}


def register(probe: Probe) -> Probe:
    """Add a probe to the catalog (its name must be new)."""
    if probe.name in PROBES:
        raise ValueError(f"probe {probe.name!r} is registered already")
    PROBES[probe.name] = probe
    return probe


def check_transplant(task, options: dict) -> None:
    """ffn-transplant's sources: --sources picks the first N items an FFN switches on, at their switch block, so
    --source-items (the sources themselves) excludes it and needs --source-layer; each must be an input of the
    task. A tuned --lens decodes only that search, so it is refused with --source-items."""
    given = options.get("source_items")
    if given is not None:
        inputs = {it.input for it in task.items()}
        unknown = [n for n in (given.split(",") if isinstance(given, str) else given) if n not in inputs]
        if unknown:
            raise ProbeError(f"unknown source item {unknown[0]!r} of task {task.name!r}; accepted: inputs of the task, "
                             f"e.g. {', '.join(sorted(inputs)[:3])}")
        if options.get("sources") is not None:
            raise ProbeError("--sources counts the source items the probe picks itself (the first an FFN switches "
                             "on); with --source-items the sources are those; accepted: one of the two")
        if options.get("source_layer") is None:
            raise ProbeError("--source-items needs --source-layer (the FFN switch block is found only for the sources "
                             "the probe picks itself); accepted: --source-layer BLOCK")
        if options.get("lens", "logit") != "logit":
            raise ProbeError(f"--lens {options['lens']} decodes the stages that pick the sources, and --source-items "
                             "names them; accepted: --lens logit with --source-items, or --sources N")


def check_icl_score(task, options: dict) -> None:
    early, late = options.get("early"), options.get("late")
    if early is not None and late is not None and early >= late:
        raise ProbeError(f"--early {early} is not before --late {late}; accepted: early < late")


def check_tree_scrub(task, options: dict) -> None:
    """tree-scrub resamples at the root, the last position of a tree's first-step prompt."""
    if task.steps != "first":
        raise ProbeError(f"probe 'tree-scrub' scrubs at the root, the last position of a tree's first step, and task "
                         f"{task.name!r} has steps: {task.steps}; accepted: a task with steps: first (e.g. "
                         "tree-trained-first, or --task-option steps=first)")


for _probe in (
    Probe("logit-lens", "decode the residual stream at every layer (0 = embeddings), at the last or chosen positions",
          "lens:run_lens", "lens:summarize_lens", "lens:report_lens", "probes.reports.plots:plot_lens",
          {"topk": 5, "positions": None, "vocab": None, "lens": None}, prepare="lens:prepare_lens",
          run_options=("topk", "positions", "vocab"), kinds=(*ALL_KINDS, "icl"),
          position_forms=("last", "all", "index", "slice", "name"), word="lens"),
    Probe("accuracy", "greedy answer: is the answer's first token the top-1 next token", "accuracy:run_accuracy",
          "accuracy:summarize_accuracy", "accuracy:report_accuracy", options={"vocab": None}, run_options=("vocab",),
          kinds=(*ALL_KINDS, "icl")),
    Probe("ffn-readout", "each block's FFN update decoded, its norm and effect on the answer; stage layers",
          "ffn_readout:run_readout", "ffn_readout:summarize_readout", "ffn_readout:report_readout",
          "probes.reports.plots:plot_readout", {"topk": 5, "vocab": None, "lens": None},
          prepare="ffn_readout:prepare_readout",
          run_options=("topk", "vocab"), needs_argument=True, needs_ffn=True),
    Probe("ffn-transplant", "put a source prompt's FFN update o into other prompts (add or replace), with controls",
          "ffn_transplant:run_transplant", "ffn_transplant:summarize_transplant", "ffn_transplant:report_transplant",
          "probes.reports.plots:plot_transplant",
          {"mode": None, "layers": None, "scales": None, "positions": None, "controls": True, "sources": None,
           "source_items": None, "source_layer": None, "context": None, "vocab": None, "lens": None},
          prepare="ffn_transplant:prepare_transplant",
          run_options=("mode", "layers", "scales", "positions", "controls", "vocab"),
          passes="ffn_transplant:transplant_passes", kinds=RELATIONAL, position_forms=("all", "last"),
          word="transplant", needs_ffn=True, check=check_transplant),
    Probe("ffn-ablation", "zero (or identity-replace) FFN updates of chosen blocks, or the top sixths",
          "ffn_ablation:run_ablation", "ffn_ablation:summarize_ablation", "ffn_ablation:report_ablation",
          "probes.reports.plots:plot_ablation", {"layers": None, "how": None, "vocab": None},
          run_options=("layers", "how", "vocab"), passes="ffn_ablation:ablation_passes", needs_ffn=True,
          compare="ffn_ablation:compare_tasks", layers_also=("sixths",)),
    Probe("nback", "N-back hit rate, false alarms, accuracy and signed d' by N", "nback:run_nback",
          "nback:summarize_nback", "nback:report_nback", "probes.reports.plots:plot_nback", kinds=("nback",)),
    Probe("attention", "attention entropy and mass to the N-back letter, by N x layer x head; on trees, where "
          "each path step's last position reads, by layer x head", "attention:run_attention",
          "attention:summarize_attention", "attention:report_attention", "probes.reports.plots:plot_attention",
          load=EAGER, kinds=("nback", "icl", "tree"), nback_unit="sequence"),
    Probe("activation-patching", "clean activations into a corrupted run (or back) per site, block and position: "
          "logit-difference recovery", "patching:run_patching", "patching:summarize_patching",
          "patching:report_patching", "probes.reports.plots:plot_patching",
          {"sites": "resid", "layers": None, "positions": "all", "direction": "denoise"},
          prepare="patching:prepare_patching", run_options=("sites", "layers", "positions", "direction"),
          passes="patching:patching_passes", kinds=(*RELATIONAL, "nback", "tree", "ioi", "icl"), word="patching"),
    Probe("attribution-patching", "activation-patching's effects estimated from one forward and one backward per pair "
          "(attribution patching), the largest re-run exactly", "attribution:run_attribution",
          "attribution:summarize_attribution", "attribution:report_attribution", "probes.reports.plots:plot_patching",
          {"sites": "resid", "layers": None, "positions": "all", "direction": "denoise", "verify": 32,
           "qk_fix": False, "graddrop": False},
          prepare="attribution:prepare_attribution",
          run_options=("sites", "layers", "positions", "direction", "verify", "qk_fix", "graddrop"),
          passes="attribution:attribution_passes", kinds=(*RELATIONAL, "nback", "tree", "ioi", "icl"), word="patching"),
    Probe("linear-probe", "logistic-regression probes per layer for a label of the items, held out, against "
          "shuffled labels and random weights", "linear_probe:run_linear_probe",
          "linear_probe:summarize_linear_probe", "linear_probe:report_linear_probe",
          "probes.reports.plots:plot_linear_probe",
          {"label": "group", "site": "resid", "position": "last", "erase": None},
          prepare="linear_probe:prepare_linear_probe", run_options=("label", "site", "position"),
          passes=lambda n_layers, opts: 2, kinds=(*ALL_KINDS, "icl"), nback_unit=None,
          position_forms=("last", "index", "name"), word="probe"),
    Probe("logit-difference", "the answer against the item's argument as the next token (IOI: indirect object "
          "against subject): logit difference and probabilities", "contrast:run_contrast",
          "contrast:summarize_contrast", "contrast:report_contrast", needs_argument=True,
          kinds=(*RELATIONAL, "ioi", "prompts")),
    Probe("induction", "induction-head score per head and the loss drop on repeated random sequences",
          "induction:run_induction", "induction:summarize_induction", "induction:report_induction",
          "induction:plot_induction", load=EAGER, kinds=("repeat",)),
    Probe("icl-score", "in-context learning score: loss at a late token minus at an early one, over documents",
          "icl_score:run_icl_score", "icl_score:summarize_icl_score", "icl_score:report_icl_score",
          "icl_score:plot_icl_score", {"early": 50, "late": 500}, run_options=("early", "late"), kinds=("text",),
          truncates=True, check=check_icl_score),
    Probe("tree-scrub", "Brinkmann et al.'s causal scrubbing at the root: each block's attention update there "
          "resampled from trees with the same node as many steps up from the goal, against any tree: loss recovered",
          "tree_scrub:run_scrub", "tree_scrub:summarize_scrub", "tree_scrub:report_scrub", options={"layers": None},
          prepare="tree_scrub:prepare_scrub", passes="tree_scrub:scrub_passes", kinds=("tree",),
          check=check_tree_scrub),
):
    register(_probe)


def taking(option: str) -> str:
    """The probes that take `option`, each with its default: 'logit-lens (5), ffn-readout (5)'."""
    return ", ".join(p.name + (f" ({p.options[option]})" if p.options[option] is not None else "")
                     for p in PROBES.values() if option in p.options)


def get_probe(name: str) -> Probe:
    if name not in PROBES:
        raise choice_error("probe", name, PROBES)
    return PROBES[name]


def check_task(probe: str, task, options: dict | None = None) -> None:
    """Refuse, before any model loads, a task the probe cannot run on: another kind, prompts without the
    argument it tracks, positions not every item names; and what the probe's own check refuses."""
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
    for name in ("positions", "position"):
        if (options or {}).get(name) is not None and name in spec.options:
            also = ("all", "whole") if "whole" in spec.position_forms else ()
            check_positions(options[name], spec.position_forms, spec.word, task.items(), also)
    if spec.check is not None:
        spec.check(task, options or {})


def probe_options(probe: str, options: dict | None, strict: bool = False) -> dict:
    """The options `probe` takes, each parsed by its declaration (option_types.OPTIONS), with the probe's defaults
    for those not given: what identifies its computation. strict: an option it does not take is an error (a user's
    own call); else it is left out (a sweep's options are shared by all its probes)."""
    spec = get_probe(probe)
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if strict and set(given) - set(spec.options):
        bad = sorted(set(given) - set(spec.options))[0]
        raise ProbeError(f"probe {probe!r} takes no option {bad!r}; accepted: "
                         + (", ".join(spec.options) if spec.options else "none"))
    chosen = {**spec.defaults, **{k: v for k, v in given.items() if k in spec.options}}
    chosen = {k: OPTIONS[k].parse(v) for k, v in chosen.items()}
    for name in ("positions", "position"):
        if name in chosen:
            check_grammar(chosen[name], spec.position_forms, f"{spec.word} --{name}")
    if "layers" in chosen:
        blocks(chosen["layers"], spec.layers_also)
    if chosen.get("lens") == "logit":  # the default spelled out: the same computation, so the same run
        chosen.pop("lens")
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
