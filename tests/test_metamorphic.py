"""A metamorphic battery: what a run's per-item table says about an item must not depend on how the run was
arranged. For every probe of the catalog (each on a shipped task it declares it takes), on tiny random models of
five families (llama: rotary, grouped-query; gpt2: learned positions; opt: offset positions; bloom: ALiBi; gemma2:
its own attention and soft-capping), in float32, --limit 6:

- batch size: the table at batch size 1 (nothing padded) is the table at batch size 4 (left-padded batches);
- order: the items run in reverse order (other batches, in another order) give the same table;
- padding side: every causal model is left-padded by design (nnsight's TransformersModel sets the tokenizer's
  padding_side to "left", and the probes read a prompt's last token as the batch's last column); a tokenizer set
  to "right" after loading must not change a table silently, at batch size 4 or 1: the run is refused naming the
  padding (at 4 the self-check's padding check does; at 1 it has nothing padded to check) or its table is the
  left-padded one;
- bfloat16 against float32: the model loaded in bfloat16 gives the float32 table within the tolerance the
  self-check declares for bfloat16 (runs/selfcheck.py `tolerance`), for what a rounding cannot flip (see `compare`);
- a model split by device_map against the whole: tests/test_scale.py::test_split_model_gives_the_same_probe_results
  runs every probe of the catalog on a split tiny-llama, tiny-gpt2 and tiny-opt (not repeated here).

Tables are compared item by item (runs/rundir.py sorts the rows by item, each item's in the order written):
discrete columns exactly; floats, and the number lists some columns hold as JSON text, within the tolerance
relative to the largest magnitude of the reference's column, as the self-check measures (logit differences
relative to the logits' largest magnitude, ratios of them through their numerators: see LOGIT_DIFFERENCES).
The runs leave out summaries, reports and plots (they read the finished table) and, outside the padding test,
the self-check; the battery runs on one intra-op thread. About 25 s of CPU time.
"""

import copy
import dataclasses
import functools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import probes
from probes.errors import ProbeError
from probes.methods.catalog import PROBES, check_task, probe_options
from probes.methods.readout import next_token_logits
from probes.runs import selfcheck
from probes.runs.selfcheck import tolerance
from probes.tasks.files import load_task

from .conftest import ROOT, loaded

FAMILIES = ("tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-bloom", "tiny-gemma2")
LIMIT, BATCH = 6, 4
FLOAT32 = selfcheck.TOLERANCE[torch.float32]  # relative, as the self-check judges float32
FLAG = {"ambiguous": "flag"}  # the tiny tokenizer makes most answers ambiguous: keep them

# the shipped task each kind runs on, made small; kinds in the order they are preferred
KIND_TASKS = {
    "abstractive": ("capitals", FLAG),
    "extractive": ("capitals-extractive", FLAG),
    "ioi": ("ioi", {}),
    "nback": ("nback", {"sequences": 1, "n": [1, 2], "length": 10, "matches": 3}),
    "repeat": ("repeat", {"sequences": 2, "length": 6}),
    "text": ("text-stdlib", {"chunk": 200, "min_chars": 100}),
}
NBACK_UNIT = {"trial": "nback", "sequence": "nback-sequence"}
# kinds no tiny random model runs: their tasks are made for (and read the inputs of) this project's trained models,
# and a prompts task is a user's file (every probe that takes one takes a shipped relational task too)
NOT_TINY = {"tree": "tree tasks are the trained tree model's (tree-trained*.yaml)",
            "icl": "icl tasks feed the trained in-context classifier's vectors (icl-trained.yaml)",
            "prompts": "a user's own prompts file"}
# options that make a probe run on a random model, or run small: transplant's sources and block named (a random
# model switches no answer on by an FFN), icl-score's tokens within the first pieces of every document
RUN_OPTIONS = {"source_items": "Abkhazia,Afghanistan", "source_layer": 1, "early": 3, "late": 20}
# the last three positions (counted from the end: where left padding shifts them), and attribution's top 4 re-run
PROBE_OPTIONS = {"logit-lens": {"positions": "-3:"}, "activation-patching": {"positions": "-3:"},
                 "attribution-patching": {"positions": "-3:", "verify": 4}}
# probes no tiny model of FAMILIES can run: probe -> the reason (asserted: the run must be refused saying so)
CANNOT_RUN: dict[str, str] = {}
# probes that take only kinds no tiny family runs (NOT_TINY): probe -> the test that checks the same relations on a
# model they fit (asserted to exist)
ELSEWHERE = {"tree-scrub": "tests/test_tree_scrub.py::test_the_table_does_not_depend_on_the_batch_or_the_items_order"}


@functools.cache
def task_for(probe: str):
    """A shipped task the probe accepts, chosen from its declared kinds (its items made once: see `made_once`)."""
    spec = PROBES[probe]
    if spec.options.get("label") == "group":  # a label read from the items' groups: a task with two groups
        return made_once(load_task("past-tense", FLAG))
    for kind, (name, fields) in KIND_TASKS.items():
        if kind in spec.kinds:
            if kind == "nback":
                name = NBACK_UNIT[spec.nback_unit or "trial"]
            return made_once(load_task(name, fields))
    raise AssertionError(f"probe {probe!r} takes only {spec.kinds}, none of which a tiny random model runs: "
                         + "; ".join(NOT_TINY.get(k, k) for k in spec.kinds))


def made_once(task):
    """The task with its items made once per argument: a run asks for them several times (the plan, ambiguity,
    scoring, pairs) and a relational task draws every item's shots again each time, the same ones (its seed)."""
    made, items = {}, task.items

    def key(value):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset, list, tuple)) else value

    def once(*args, **kwargs):
        k = (tuple(map(key, args)), tuple((name, key(v)) for name, v in sorted(kwargs.items())))
        if k not in made:
            made[k] = items(*args, **kwargs)
        return list(made[k])

    task.items = once
    return task


RUNNABLE = [p for p in PROBES if p not in CANNOT_RUN and p not in ELSEWHERE]
CASES = [pytest.param(family, probe, id=f"{family}-{probe}") for family in FAMILIES for probe in RUNNABLE]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while the battery runs: tiny models gain nothing from more, and on a shared 2-core
    machine the threads' spinning made it five to ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_probe_of_the_catalog_is_covered_or_says_why_not():
    assert set(RUNNABLE) | set(CANNOT_RUN) | set(ELSEWHERE) == set(PROBES)
    for probe, test in ELSEWHERE.items():
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test
        assert not set(PROBES[probe].kinds) - set(NOT_TINY), probe  # a kind a tiny family runs: run it here
    for probe in RUNNABLE:
        check_task(probe, task_for(probe), probe_options(probe, run_options(probe)))
    for probe, reason in CANNOT_RUN.items():
        with pytest.raises(ProbeError, match=reason):
            table(FAMILIES[0], probe)


def model(family: str, probe: str, dtype: str | None = None):
    extra = {"dtype": dtype} if dtype else {}
    return loaded(family, **PROBES[probe].load, **extra)


def run_options(probe: str) -> dict:
    return {k: v for k, v in RUN_OPTIONS.items() if k in PROBES[probe].options} | PROBE_OPTIONS.get(probe, {})


def reversed_task(task):
    """The task with its scored items (those a run takes, after --limit) in reverse order."""
    out = copy.copy(task)
    scored = task.scored_items

    def scored_items(tokenizer, limit=None, inputs=None):
        items, reasons = scored(tokenizer, limit, inputs)
        return items[::-1], reasons

    out.scored_items = scored_items
    return out


def run(lm, probe: str, task=None, batch_size: int = BATCH, self_check: bool = True,
        batches: list | None = None) -> pd.DataFrame:
    """The run's table (its rows by item, each item's in the order written). Without its summary, report and
    plot: they read the finished table and write nothing into it, and were half of the battery's time.
    `self_check`: made (and a failure raised) as in any run, or left out. `batches`: gets the items (indices)
    of each batch the probe ran, in order."""
    spec, options = PROBES[probe], run_options(probe)

    def recorded(loaded, items, **kwargs):
        if batches is not None:
            batches.append([it.index for it in items])
        return spec.run(loaded, items, **kwargs)

    PROBES[probe] = dataclasses.replace(spec, run=recorded, summarize=no_summary, report=no_report, plot=None)
    measure = selfcheck.self_check
    if not self_check:  # not measured at all (--no-self-check measures and goes on): a quarter of the time
        selfcheck.self_check = lambda *args, **kwargs: {"skipped": "a metamorphic variant"}
    try:
        got = probes.run(lm, task or task_for(probe), probe, limit=LIMIT, batch_size=batch_size, **options).table
    finally:
        PROBES[probe], selfcheck.self_check = spec, measure
    assert len(got), f"{probe}: an empty table compares nothing"
    assert got["item"].is_monotonic_increasing  # runs/rundir.py: the batches' rows, stably sorted by item
    return got


def no_summary(table, seed=0):
    return {}


def no_report(table, summary):
    return ""


REFERENCE_BATCHES: dict = {}


@functools.cache
def table(family: str, probe: str) -> pd.DataFrame:
    """The reference: float32, batch size BATCH, the task's order, left padding (the self-check passes in
    float32 on every family: tests/test_selfcheck.py)."""
    REFERENCE_BATCHES[family, probe] = []
    return run(model(family, probe), probe, self_check=False, batches=REFERENCE_BATCHES[family, probe])


def _numbers(value):
    """A JSON list of numbers (at any depth) as a float array, else None."""
    if not isinstance(value, str) or not value.startswith("["):
        return None
    try:
        return np.asarray(json.loads(value), dtype=float)
    except (ValueError, TypeError):
        return None


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# columns that name the row (the item's own and the probe's loop variables): equal in every comparison
IDENTITY = {"item", "input", "output", "group", "answer_token", "argument_token", "corrupted", "corrupted_input",
            "corrupted_answer", "layer", "block", "position", "token", "last_position", "site", "head", "from_end",
            "direction", "estimator", "mode", "blocks", "scale", "vector", "ablation", "variant", "n_ablated", "n",
            "sequence", "letters", "match", "matches", "letter_pattern", "label", "token_index", "document", "early",
            "late", "tokens", "reaches_late", "ambiguous"}
# differences of two logits: judged relative to the logits' largest magnitude, as the self-check judges the logits
# (relative to their own largest value, a difference of two close logits would be held to a far tighter bound); the
# lens' KL to the model's distribution is an expectation of differences of log-probabilities, judged the same way
LOGIT_DIFFERENCES = {"ld_source", "ld_dest", "ld_patched", "estimate", "effect_exact", "ffn_patch_gap",
                     "answer_logit_delta", "logit_diff", "kl_to_final"}
# ratios of two logit differences (the share of a gap a patch recovers): judged through their numerators, ratio x
# gap (a logit difference), each table's gap from its own columns; the gap itself is compared on its own (a ratio
# of float32 noise over a gap of a hundredth of the logits moves by a hundred times the noise)
RATIOS = {"recovery": lambda t: t["ld_source"] - t["ld_dest"],
          "recovery_exact": lambda t: t["ld_source"] - t["ld_dest"],
          "ffn_patch_recovery": lambda t: t["ffn_patch_gap"]}


def rank_derived(col: str) -> bool:
    """Floats that a rank or a top-1 makes (reciprocal ranks, the layer where something first becomes top-1): a
    rounding that changes a rank changes them as much, so bfloat16 compares them as it compares ranks (not at all)."""
    return col.endswith(("_rr", "_layer")) or col in ("switch_block", "switch_by")


def compare(got: pd.DataFrame, ref: pd.DataFrame, tol: float, logits: float, discrete: bool = True) -> list[str]:
    """What differs, column by column: the same rows per item; floats (and lists of numbers held as JSON text)
    within `tol` relative to the largest magnitude in the reference's column (logit differences: or the logits'
    largest magnitude, `logits`, where larger; ratios through their numerators); the other columns equal, or,
    not `discrete` (bfloat16: a rounding may change a rank, a top-1 token, a yes/no), only those naming the row."""
    if list(got.columns) != list(ref.columns):
        return [f"columns {list(got.columns)} != {list(ref.columns)}"]
    if got["item"].tolist() != ref["item"].tolist():
        return [f"rows per item {got['item'].value_counts().to_dict()} != {ref['item'].value_counts().to_dict()}"]
    bad = []
    for col in ref.columns:
        a, b = got[col], ref[col]
        if not discrete and rank_derived(col):
            continue
        if col in RATIOS:
            gap, ref_gap = RATIOS[col](got), RATIOS[col](ref)
            a, b = a * gap, b * ref_gap
            # a gap that rounds to exactly zero leaves the ratio undefined (NaN, the probe's rule): where the
            # reference's gap is within the tolerance of zero, only the gap (its columns) is compared
            vanishing = (a.isna() != b.isna()) & (ref_gap.abs() <= tol * max(logits, ref_gap.abs().max()))
            a, b = a.mask(vanishing), b.mask(vanishing)
        if pd.api.types.is_float_dtype(b) or pd.api.types.is_float_dtype(a):
            x, y = a.to_numpy(float), b.to_numpy(float)
        elif len(b) and b.map(_numbers).notna().all():
            xs, ys = a.map(_numbers), b.map(_numbers)
            if any(u is None or u.shape != v.shape for u, v in zip(xs, ys)):
                bad.append(f"{col}: number lists of other shapes")
                continue
            x, y = np.concatenate([u.ravel() for u in xs]), np.concatenate([v.ravel() for v in ys])
        else:
            if discrete or col in IDENTITY:
                differs = [i for i, (u, v) in enumerate(zip(a, b)) if not (u == v or (_missing(u) and _missing(v)))]
                if differs:
                    i = differs[0]
                    bad.append(f"{col}: {len(differs)} of {len(b)} rows differ, e.g. item {ref['item'][i]} row {i}: "
                               f"{a[i]!r} != {b[i]!r}")
            continue
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            bad.append(f"{col}: NaN in other rows")
            continue
        keep = ~np.isnan(y)
        scale = np.abs(y[keep]).max(initial=0.0)
        if col in LOGIT_DIFFERENCES or col in RATIOS:
            scale = max(scale, logits)
        err = np.abs(x - y)
        if err[keep].max(initial=0.0) > tol * max(scale, 1e-30):
            i = int(np.nanargmax(err))
            where = (f"item {ref['item'][i]} row {i}: {x[i]:.6g} != {y[i]:.6g}" if len(x) == len(a)
                     else f"value {i} of the lists: {x[i]:.6g} != {y[i]:.6g}")
            bad.append(f"{col}: relative difference {err[i] / max(scale, 1e-30):.2g} > {tol:g}, e.g. {where}")
    return bad


@functools.cache
def logit_scale(family: str, probe: str) -> float:
    """The largest magnitude of the float32 model's next-token logits on the run's prompts."""
    lm, task = model(family, probe), task_for(probe)
    items, _ = task.scored_items(lm.tokenizer, LIMIT)
    if lm.spec.reads_vectors or PROBES[probe].truncates:
        return 0.0
    return float(next_token_logits(lm, [it.prompt for it in items]).abs().max())


def check(got, family, probe, tol, what, discrete=True):
    bad = compare(got, table(family, probe), tol, logit_scale(family, probe), discrete)
    assert not bad, f"{probe} on {family}: {what}:\n  " + "\n  ".join(bad)


def test_the_comparison_sees_a_float_moved_past_its_tolerance_a_rank_changed_and_a_row_lost():
    ref = table("tiny-gpt2", "logit-lens")
    lens = logit_scale("tiny-gpt2", "logit-lens")
    assert not compare(ref.copy(), ref, FLOAT32, lens)
    moved = ref.assign(answer_prob=ref.answer_prob + 2 * FLOAT32 * ref.answer_prob.abs().max())
    assert [m.split(":")[0] for m in compare(moved, ref, FLOAT32, lens)] == ["answer_prob"]
    assert not compare(ref.assign(answer_prob=ref.answer_prob * (1 + FLOAT32 / 2)), ref, FLOAT32, lens)
    ranked = ref.assign(answer_rank=ref.answer_rank + (ref.index == 3))
    assert [m.split(":")[0] for m in compare(ranked, ref, FLOAT32, lens)] == ["answer_rank"]
    assert not compare(ranked, ref, 5e-2, lens, discrete=False)  # bfloat16: a rank may change
    assert compare(ref.drop(index=0).reset_index(drop=True), ref, FLOAT32, lens)
    vectors = table("tiny-gpt2", "linear-probe")  # number lists held as JSON text
    nudged = vectors.assign(vector=[json.dumps((np.asarray(json.loads(v)) * 1.01).tolist()) for v in vectors.vector])
    assert [m.split(":")[0] for m in compare(nudged, vectors, FLOAT32, 0.0)] == ["vector"]


@pytest.mark.parametrize("family, probe", CASES)
def test_batch_size_changes_nothing(family, probe):
    batches = []
    got = run(model(family, probe), probe, batch_size=1, self_check=False, batches=batches)
    check(got, family, probe, FLOAT32, f"batch size 1 against {BATCH}")
    reference = REFERENCE_BATCHES[family, probe]
    assert max(map(len, reference)) > 1 and batches == [[i] for b in reference for i in b]


@pytest.mark.parametrize("family, probe", CASES)
def test_item_order_changes_nothing(family, probe):
    batches = []
    got = run(model(family, probe), probe, reversed_task(task_for(probe)), self_check=False, batches=batches)
    check(got, family, probe, FLOAT32, "items reversed")
    order = [i for b in REFERENCE_BATCHES[family, probe] for i in b]
    assert [i for b in batches for i in b] == order[::-1] and batches != REFERENCE_BATCHES[family, probe]


@pytest.mark.parametrize("family, probe", CASES)
@pytest.mark.parametrize("batch_size", [BATCH, 1])
def test_right_padding_is_refused_or_changes_nothing(family, probe, batch_size):
    """A tokenizer set to pad on the right after loading (a common Hugging Face idiom) must not change a table
    silently: the run is refused naming the padding, or its table is the left-padded one. At batch size 4 the
    self-check's padding check refuses it; at batch size 1 the self-check has nothing padded to check."""
    lm = model(family, probe)
    table(family, probe)  # the reference first, left-padded
    assert lm.tokenizer.padding_side == "left"  # nnsight's TransformersModel sets it for every causal model
    lm.tokenizer.padding_side = "right"
    try:
        got = run(lm, probe, batch_size=batch_size)  # with the self-check, as any run
    except ProbeError as e:
        assert "padd" in str(e), str(e)
        return
    finally:
        lm.tokenizer.padding_side = "left"
    check(got, family, probe, FLOAT32, f"right padding at batch size {batch_size}, not refused (the self-check "
                                       "passed), against left padding")


@pytest.mark.parametrize("family, probe", CASES)
def test_bfloat16_gives_the_float32_table_within_its_tolerance(family, probe):
    lm = model(family, probe, "bfloat16")
    assert lm.arch.hf.dtype == torch.bfloat16
    got = run(lm, probe, self_check=False)
    check(got, family, probe, tolerance(lm), "bfloat16 against float32", discrete=False)
