"""No option silently ignored, by construction: for every probe of the catalog and every option it declares,
changing the option from its default to another valid value (the option's examples, option_types.Option.examples)
changes the results table on a tiny random model, or is refused in one line before any model loads. Derived from
the catalog and the shipped tasks: a new probe or option is covered without editing this file."""

import pytest
import torch

import probes
from probes.errors import ProbeError
from probes.methods.catalog import PROBES
from probes.methods.option_types import OPTIONS
from probes.runs.plan import plan_run
from probes.tasks.files import available_tasks, load_task

from .conftest import TINY, loaded

MODEL, LIMIT = "tiny-gpt2", 4


def examples(name: str, task) -> tuple:
    given = OPTIONS[name].examples
    return given(task.items()) if callable(given) else given


def tasks_for(probe: str):
    """The shipped tasks the probe's plan accepts on the tiny model (by name), ambiguous answers kept (the tiny
    tokenizer makes most of them so)."""
    for name in sorted(available_tasks()):
        try:
            task = load_task(name, {"ambiguous": "flag"})
        except ProbeError:
            task = load_task(name)
        try:
            plan_run(MODEL, [task], probe)
        except ProbeError:
            continue
        yield task


def table(lm, task, probe: str, options: dict):
    return probes.run(lm, task, probe, limit=LIMIT, self_check=False, **options).table


def base_run(lm, probe: str):
    """The first task (by name) on which the probe runs on the tiny model with its defaults, or else, with the options
    its refusal asks for (ffn-transplant on a random model, where no FFN switches an answer on: --source-items and
    --source-layer), each at its first example; and the table."""
    spec, refusals = PROBES[probe], {}
    tasks = list(tasks_for(probe))
    for task in tasks:
        try:
            return task, {}, table(lm, task, probe, {})
        except ProbeError as e:
            refusals[task.name] = e
    for task in tasks:
        asked = {o: examples(o, task)[0] for o in spec.options if OPTIONS[o].cli in str(refusals[task.name])}
        if asked:
            return task, asked, table(lm, task, probe, asked)
    pytest.fail(f"{probe} runs on no shipped task with {MODEL}: {refusals}")


def modes(spec, task, base: dict) -> list[dict]:
    """The settings each option is changed in: the base, and the base with each option that is a mode (ffn-transplant's
    add and replace) at each of its examples, so that an option used in one mode and ignored in another is found."""
    return [base] + [{**base, name: v} for name in spec.options if OPTIONS[name].mode and name not in base
                     for v in examples(name, task)]


@pytest.mark.parametrize("probe", [p for p, spec in PROBES.items() if spec.options])
def test_every_option_changes_the_table_or_is_refused_before_loading(probe):
    spec = PROBES[probe]
    lm = loaded(MODEL, **spec.load)
    task, base, first = base_run(lm, probe)
    untried = [name for name in spec.options if not examples(name, task)]
    assert not untried, f"{probe}: options with no example value to change them to (Option.examples): {untried}"
    assert table(lm, task, probe, base).equals(first), f"{probe}: two runs of the same options differ"
    ignored = []
    for setting in modes(spec, task, base):
        try:
            plan_run(MODEL, [task], probe, setting)
        except ProbeError:
            continue  # a mode refused with this task and model: nothing to change in it
        before = first if setting is base else table(lm, task, probe, setting)
        for name in spec.options if setting is base else [o for o in spec.options if not OPTIONS[o].mode]:
            current = setting.get(name, spec.options[name])
            unchanged = []  # the values the plan accepts that change nothing
            for value in examples(name, task):
                if current is not None and OPTIONS[name].parse(value) == OPTIONS[name].parse(current):
                    continue
                options = {**setting, name: value}
                try:
                    plan_run(MODEL, [task], probe, options)
                except ProbeError as e:
                    assert "\n" not in str(e), f"{probe} {options}: a refusal of several lines: {e}"
                    continue
                if not table(lm, task, probe, options).equals(before):
                    break
                unchanged.append(value)
            else:
                if unchanged:
                    ignored.append(f"{name} (to {', '.join(map(repr, unchanged))}, with {setting})")
    assert not ignored, f"{probe} on {task.name}: options that change nothing and are not refused: " + "; ".join(ignored)


@pytest.mark.parametrize("name", TINY)
def test_transplant_added_at_every_position_equals_one_forward_per_block(name):
    """ffn-transplant's add mode honours --positions all (it ignored the option): o added after a block at every
    position, batched over blocks, gives what one hooked forward per block gives."""
    from probes.methods.ffn_readout import last_position_updates
    from probes.methods.ffn_transplant import Variant, add_sweep, control_vectors

    lm = loaded(name)
    prompt = load_task("capitals").items()[0].prompt
    o = last_position_updates(lm, [prompt])["ffn"][0, 0].float().cpu()
    vectors = control_vectors(o / o.norm() * 10)
    variants = [Variant("none")] + [Variant("o", (b,), 2.0) for b in range(lm.arch.n_layers)]
    swept = add_sweep(lm, prompt, variants, vectors, positions="all")
    assert (swept[1] - add_sweep(lm, prompt, variants, vectors)[1]).abs().max() > 1e-3  # not the last position's
    for row, v in enumerate(variants):
        with lm.model.trace(prompt):
            if v.blocks:
                h = lm.arch.block_output(v.blocks[0])
                h[:] += vectors["o"] * v.scale
            one = lm.model.output.logits[:, -1].save()
        torch.testing.assert_close(swept[row], one[0].float(), atol=1e-4, rtol=1e-4)
