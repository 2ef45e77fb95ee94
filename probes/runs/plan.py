"""A run plan: everything a probe run needs that no weights are needed for (the model's spec and load options, the
tasks, the probe's parsed options, the limit, the batch size, the run folders and their identity), resolved once by
`plan_run` and checked there, before any model loads. The command line, the Python API and sweeps build a plan and
hand it to runs/execution.py, which loads the model (unless given one) and runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ProbeError
from ..methods.catalog import Probe, check_task, get_probe, probe_options
from ..models.registry import ModelSpec, resolve_model
from .rundir import check_folder, safe_name


@dataclass(frozen=True)
class RunPlan:
    model: ModelSpec
    load: dict  # load_options' result (a remote model, or one given loaded: its dtype and quantization)
    probe: str
    options: dict  # the probe's options, parsed, with its defaults: part of each run's identity
    tasks: tuple
    outputs: dict  # task name -> run folder, or None (a temporary one, removed after the run)
    limit: int | None = None
    batch_size: int | str = 8
    overwrite: bool = False
    self_check: bool = True
    remote: bool = False
    lens: dict | None = None  # a tuned --lens' identity (tuned_lens.lens_identity): part of each run's identity

    @property
    def spec(self) -> Probe:
        return get_probe(self.probe)

    def config(self, task) -> dict:
        return run_config(self.model, self.load["dtype"], self.load["quantize"], task, self.probe, self.limit,
                          self.options, self.lens)


def plan_run(model: str | ModelSpec | None = None, tasks: list | tuple = (), probe: str = "logit-lens",
             options: dict | None = None, *, limit: int | None = None, batch_size: int | str = 8,
             output: str | Path | None = None, outputs: dict | None = None, overwrite: bool = False,
             self_check: bool = True, load: dict | None = None, remote: bool = False, check_fit: bool = True,
             loaded=None, strict: bool = True, resolved: dict | None = None) -> RunPlan:
    """Resolve and check a run before loading: the probe and its options (strict: one it does not take is an error),
    each task against the probe and the model, the limit and batch size, the load options (a hub model this
    machine cannot hold is refused, unless check_fit=False), each run folder against the run it would hold.
    `model`: a name, folder or spec; or `loaded`: a model loaded already. `output`: the run folder of the one
    task, or `outputs`: {task name: folder}; neither: temporary folders. `resolved`: `load`'s load options,
    resolved already (a sweep resolves them once per model)."""
    get_probe(probe)
    chosen = probe_options(probe, options, strict=strict)
    for t in tasks:
        check_task(probe, t, chosen)
    spec = loaded.spec if loaded is not None else model if isinstance(model, ModelSpec) else resolve_model(model)
    for t in tasks:
        check_inputs(spec, t)
    lens = None
    if chosen.get("lens", "logit") != "logit":  # a tuned lens that is not there is refused before loading
        from ..methods.tuned_lens import lens_identity

        if remote or (loaded is not None and loaded.remote):
            raise ProbeError("--lens tuned applies its translators on this machine; accepted: --lens logit with "
                             "--remote")
        lens = lens_identity(chosen["lens"], spec)
    if output is not None and len(tasks) > 1:
        raise ProbeError("--output names one run folder; with several tasks leave it out (results/<model>/<task>/...)")
    batch_size = parse_batch_size(batch_size)
    check_limit(limit)
    outputs = outputs or {t.name: None if output is None else Path(output) for t in tasks}
    if loaded is not None:
        opts = {"dtype": loaded.dtype, "quantize": loaded.quantize}
    elif remote:
        opts = {"dtype": spec.dtype, "quantize": None}
    elif resolved is not None:
        opts = resolved
    else:
        from ..models.options import load_options

        opts = load_options(spec, **(load or {}))
        if spec.source == "hub" and check_fit:  # a model this machine cannot hold: refused before anything else
            from ..models.planning import check_fits

            check_fits(spec, opts, (load or {}).get("gpus"))
    plan = RunPlan(model=spec, load=opts, probe=probe, options=chosen, tasks=tuple(tasks), outputs=outputs,
                   limit=limit, batch_size=batch_size, overwrite=overwrite, self_check=self_check, remote=remote,
                   lens=lens)
    for t in tasks:
        t.items()  # a data file that cannot be read, or has empty cells, is refused now
        if outputs.get(t.name) is not None:
            check_folder(outputs[t.name], plan.config(t), overwrite)
    return plan


def run_config(spec, dtype: str, quantize: str | None, task, probe: str, limit: int | None, options: dict,
               lens: dict | None = None) -> dict:
    """What identifies a run's results: a rerun with the same config resumes, a different one is refused.
    `options`: the probe's parsed options (probe_options); `lens`: a tuned lens' identity (the logit lens' runs
    have none, as before the option)."""
    from ..models.loading import model_digest

    return {"model": spec.name, "source": spec.where(), "revision": spec.revision, "model_digest": model_digest(spec),
            "dtype": dtype, "quantize": quantize, "task": task.name, "task_version": task.version,
            "task_digest": task.digest(), "seed": task.seed, "task_options": task.overrides, "probe": probe,
            "limit": limit, "options": options, **({"tuned_lens": lens} if lens else {})}


def default_output(results: Path, model: str, task: str, probe: str, lens: str | None = None) -> Path:
    """results/<model>/<task>/<probe>, each a safe folder name (see `safe_name`); a run through a tuned lens in
    <probe>-lens-<its --lens value> beside the logit lens' run (the two are different runs)."""
    folder = probe if lens in (None, "logit") else f"{probe}-lens-{safe_name(lens)}"
    return Path(results) / safe_name(model) / safe_name(task) / folder


def parse_batch_size(value) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    raise ProbeError(f"bad --batch-size {value}; accepted: a positive integer or 'auto'")


def check_limit(limit) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ProbeError(f"bad --limit {limit!r}; accepted: a positive integer (leave it out for every item)")


def check_inputs(spec, task) -> None:
    """A model that reads vectors (an in-context classifier trained on Reddy's task) takes only the vector items of
    a `kind: icl` task, and only it does; checked before loading."""
    vectors = spec.reads_vectors
    if vectors and task.kind != "icl":
        raise ProbeError(f"{spec.name} reads vectors (inputs_embeds), not text, so task {task.name!r} cannot prompt "
                         "it; accepted: a kind: icl task of its training task (e.g. icl-trained)")
    if task.kind == "icl" and not vectors:
        raise ProbeError(f"task {task.name!r} is vectors (in-context classification), which {spec.name} does not "
                         "read; accepted: a model trained by probe train on an icl config")
