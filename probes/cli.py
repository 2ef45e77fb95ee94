"""The `probe` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .errors import ProbeError
from .stats import confidence

RESULTS = Path(os.environ.get("PROBE_RESULTS", "results"))


def _fmt_params(n: int | None) -> str:
    if not n:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)


def cmd_models(args) -> None:
    from .models.registry import load_registry

    rows = [(s.name, s.family, _fmt_params(s.params), s.where() + ("" if s.pinned or s.source != "hub" else " (unpinned)"),
             "yes" if s.available() else "no") for s in load_registry().values()]
    from .models.registry import trained_runs
    from .paths import runs_root

    rows += [(r["path"], r["architecture"], _fmt_params(r["params"]), f"trained run ({r['steps']} steps)", "yes")
             for r in trained_runs()]
    _print_table(("name", "family", "params", "loads from", "available here"), rows)
    print(f"\n(trained runs: finished `probe train` runs under {runs_root()}; pass the path as --model)")


def _tokenizer(model: str):
    """Only the tokenizer of a model (cheap: no weights), for task listings and prompts."""
    from .models.loading import load_tokenizer
    from .models.registry import resolve_model

    return load_tokenizer(resolve_model(model))


def cmd_tasks(args) -> None:
    from .tasks.files import available_tasks, load_task_file

    if args.schema:
        from .schema import task_text

        print(task_text())
        return

    tok = _tokenizer(args.model) if args.model else None
    header = ("task", "kind", "items") + (("ambiguous", "rule") if tok else ()) + ("source",)
    rows = []
    for name, path in available_tasks().items():
        t = load_task_file(path)
        n = len(t.items())
        extra = ()
        if tok is not None:
            extra = (str(len(t.scored_items(tok)[1])), t.ambiguous if t.kind != "nback" else "-")
        rows.append((name, t.kind, str(n), *extra, t.source))
    _print_table(header, rows)


def cmd_prompt(args) -> None:
    from .tasks.base import answer_token, first_token
    from .tasks.files import load_task, parse_overrides

    task = load_task(args.task, parse_overrides(args.task_option))
    tok = _tokenizer(args.model)
    items = task.items()
    if not 0 <= args.index < len(items):
        raise ProbeError(f"bad --index {args.index}; accepted: 0 to {len(items) - 1} for task {task.name!r}")
    item = items[args.index]
    kept, reasons = task.scored_items(tok, inputs=[item.input]) if task.kind != "nback" else ([item], {})
    item = kept[0] if kept else item  # its prompt as a run builds it (worked examples chosen for this tokenizer)
    ids = tok(item.prompt).input_ids
    print(f"--- prompt ({len(ids)} tokens) ---\n{item.prompt}\n--- tokens ---")
    print(" ".join(f"{i}:{tok.decode(i)!r}" for i in ids))
    target = answer_token(tok, item)
    print(f"--- target ---\nanswer {item.answer!r} -> first token {target} {tok.decode(target)!r}")
    if item.argument:
        arg = first_token(tok, item.argument)
        print(f"argument {item.argument!r} -> first token {arg} {tok.decode(arg)!r}")
    if item.index in reasons:
        print(f"ambiguous: {reasons[item.index]} (task rule: {task.ambiguous})")


def cmd_run(args) -> None:
    from .methods.catalog import get_probe
    from .methods.option_types import OPTIONS
    from .models.devices import describe
    from .runs.execution import counts_text, execute, load_for
    from .runs.plan import default_output, plan_run
    from .runs.rundir import safe_name
    from .models.registry import resolve_model
    from .tasks.files import parse_overrides

    # every check that needs no weights is the plan's, before loading: names, options, tasks, the output folders
    get_probe(args.probe)
    options = {name: getattr(args, name) for name in OPTIONS}
    tasks = _run_tasks(args, parse_overrides(args.task_option))
    spec = resolve_model(args.model)
    outputs = {t.name: Path(args.output) if args.output else default_output(RESULTS, spec.name, t.name, args.probe,
                                                                              options.get("lens"))
               for t in tasks}
    load = {"dtype": args.dtype, "device_map": args.device_map, "quantize": args.quantize,
            "max_memory": args.max_memory, "gpus": args.gpus, "compute_dtype": args.compute_dtype}
    plan = plan_run(spec, tasks, args.probe, options, limit=args.limit, batch_size=args.batch_size,
                    outputs=outputs, output=args.output,
                    overwrite=args.overwrite, self_check=not args.no_self_check, load=load, remote=args.remote)
    loaded = load_for(plan)
    dtype = (f"{loaded.quantize} ({str(loaded.arch.hf.dtype).removeprefix('torch.')} compute)" if loaded.quantize
             else loaded.dtype)
    where = f" {describe(loaded.placement, dtype)}" if loaded.placement else ""
    print(f"loaded in {loaded.load_seconds:.1f}s{' (cached)' if loaded.cache_hit else ''}{where}", file=sys.stderr)
    tables = {}
    for task in tasks:  # one at a time, each printed when it ends
        result = execute(dataclasses.replace(plan, tasks=(task,)), loaded, progress=True)[task.name]
        out = plan.outputs[task.name]
        tables[task.name] = result.table
        print(f"\n== {spec.name} · {task.name} ({task.kind}) · {args.probe}")
        print(result.report)
        print(counts_text(result.summary))
        print(f"results: {out}/table.csv  metadata: {out}/meta.json" + ("  plot: plot.png" if plan.spec.plot else ""))
    if len(tasks) > 1 and plan.spec.compare is not None:  # several tasks side by side, as the probe compares them
        print(plan.spec.compare(tables, {t.name: t.kind for t in tasks}, RESULTS / safe_name(spec.name)))


def _run_tasks(args, overrides: dict) -> list:
    """The tasks of `probe run`: --task names (comma-separated), a --prompts file, or one --prompt with --answer."""
    from .tasks.files import load_task
    from .tasks.prompts import prompts_task

    given = [k for k in ("task", "prompts", "prompt") if getattr(args, k) is not None]
    if len(given) != 1:
        raise ProbeError("give one of --task, --prompts or --prompt" + (f" (given: --{', --'.join(given)})"
                                                                        if given else ""))
    if (args.answer is not None or args.argument is not None) and not args.prompt:
        raise ProbeError("--answer and --argument go with --prompt; a --prompts file has them as columns")
    if args.prompt is not None:
        if args.answer is None:
            raise ProbeError("--prompt needs --answer TEXT (the answer whose first token is scored)")
        row = {"prompt": args.prompt, "answer": args.answer, "argument": args.argument or ""}
        return [prompts_task(rows=[row], overrides=overrides)]
    if args.prompts is not None:
        return [prompts_task(args.prompts, overrides=overrides)]
    return [load_task(name, overrides) for name in args.task.split(",")]


def cmd_train(args) -> None:
    from .tasks.files import parse_overrides
    from .training.config import load_training_config
    from .training.trainer import train

    cfg = load_training_config(args.config, parse_overrides(args.set), args.seed)
    if args.minutes is not None and not args.minutes > 0:
        raise ProbeError(f"--minutes {args.minutes:g}; accepted: a positive number of minutes")
    run = train(cfg, args.output, resume=args.resume, progress=not args.quiet, minutes=args.minutes)
    if int(os.environ.get("RANK", 0)):  # data-parallel: the main process reports
        return
    meta = json.loads((run / "meta.json").read_text())
    if meta.get("status") == "paused":
        eta = f"; about {meta['eta_seconds'] / 60:.1f} min left at this window's rate" if meta.get("eta_seconds") else ""
        print(f"paused {cfg['name']} at step {meta['steps']} of {meta['total_steps']} (--minutes {args.minutes:g})"
              f"{eta}; continue with --resume")
        print(f"run: {run}")
        return
    final = meta.get("final", {})
    from .training.data import GENERATORS

    what = GENERATORS[cfg["task"]["generator"]].summary(cfg["task"])
    print(f"trained {cfg['name']} ({what}, seed {cfg['train']['seed']}): {meta.get('steps')} steps; "
          + final_accuracy_text(final, cfg["task"]["test"]))
    print(f"run: {run}  (use it as --model {run}; log.csv, plot.png, checkpoint-*/)")


def final_accuracy_text(final: dict, sequences: int) -> str:
    """'test accuracy 0.981 of scored positions; whole sequences 0.912 [0.893, 0.928] (912/1000)', or per test set
    ('ic 0.953 [0.948, 0.957] (9530/10000); ...') where each sequence has one answer: intervals (Wilson) over
    sequences, the unit that is drawn independently."""
    from .stats import proportion, interval_text

    def whole(name: str, value: float) -> str:
        return f"{name} {interval_text(proportion(round(value * sequences), sequences, 'a'), 'a')}"

    sets = [k for k in final if k.startswith("eval_") and k.endswith("_accuracy") and k != "eval_sequence_accuracy"]
    if "eval_accuracy" in final:
        text = f"test accuracy {final['eval_accuracy']:.3f} of scored positions on {sequences} sequences"
        if "eval_sequence_accuracy" in final:
            text += "; " + whole("whole sequences", final["eval_sequence_accuracy"])
        return text
    return "test accuracy " + "; ".join(whole(k[len("eval_"):-len("_accuracy")], final[k]) for k in sets)


def cmd_lens(args) -> None:
    from .api import train_lens

    given = {k: getattr(args, k) for k in ("tokens", "corpus") if getattr(args, k) is not None}
    folder = train_lens(args.model, output=args.output, progress=True, **given)
    meta = json.loads((folder / "meta.json").read_text())
    print(f"tuned lens for {args.model}: {meta['tokens']:,} tokens of {meta['corpus']}, {meta['steps']} steps, "
          f"{meta['seconds']:.0f}s; KL(model || lens) in nats per residual index, logit lens -> tuned:")
    print("  " + ", ".join(f"{i}: {a:.3g} -> {b:.3g}" for i, (a, b) in
                           enumerate(zip(meta["kl_first_step"], meta["kl_final"]))))
    print(f"lens: {folder}  (probe run --lens tuned" + (f":{folder}" if args.output else "") + ")")


def cmd_plan(args) -> None:
    from .models.arch import arch_spec
    from .models.planning import describe_map, gib, plan
    from .models.registry import resolve_model

    spec = resolve_model(args.model)
    kw = dict(dtype=args.dtype, compute_dtype=args.compute_dtype, gpu_mem=args.gpu_mem, batch=args.batch_size,
              seq=args.seq_len)
    chosen = plan(spec, quantize=args.quantize, **kw)
    others = [plan(spec, quantize=q, **kw) for q in (None, "8bit", "4bit") if q != chosen.quantize]
    counted = f"{chosen.params:,} parameters counted from the config"
    if spec.params:
        counted += f" (registry: {spec.params:,}, {100 * (chosen.params - spec.params) / spec.params:+.2f}%)"
    print(f"{spec.name} ({spec.family}): {counted}")
    act = chosen.activation
    print(f"activations, batch {args.batch_size} x {args.seq_len} tokens: {gib(act['total'])} per GPU "
          f"(kept {gib(act['kept'])}, one block's working set {gib(act['transient'])})")
    rows = [(p.label, gib(p.weight_bytes), str(p.gpus_needed) if p.gpus_needed else f"> {64}")
            for p in sorted([chosen, *others], key=lambda p: -p.weight_bytes)]
    _print_table(("precision", "weights", f"GPUs of {args.gpu_mem}"), rows)
    need = chosen.gpus_needed
    if need is None:
        raise ProbeError(f"{spec.name} in {chosen.label} does not fit on GPUs of {args.gpu_mem} (weights "
                         f"{gib(chosen.weight_bytes)}, activations {gib(act['total'])} per GPU); accepted: a larger "
                         "--gpu-mem, --quantize 8bit or 4bit, or a smaller --batch-size / --seq-len")
    print(f"\ndevice map for {chosen.label} on {need} GPU(s) (device_map=auto):")
    for dev, text in describe_map(chosen.device_map, arch_spec(spec.family).layers).items():
        print(f"  GPU {dev}: {gib(chosen.per_device[dev])}  {text}")
    if args.gpus is not None and args.gpus < need:
        fits = ", ".join(f"{p.label}: {p.gpus_needed}" for p in others if p.gpus_needed and p.gpus_needed <= args.gpus)
        raise ProbeError(f"{spec.name} in {chosen.label} needs {need} GPUs of {args.gpu_mem}; --gpus {args.gpus} "
                         f"is not enough; accepted: --gpus {need} or more" + (f", or {fits}" if fits else ""))


def cmd_sweep(args) -> None:
    from .runs.slurm import submit_slurm, wait
    from .runs.sweep import load_sweep, run_local

    sweep = load_sweep(args.file)
    if args.executor not in ("local", "slurm"):
        raise ProbeError(f"unknown executor {args.executor!r}; accepted: local, slurm")
    if args.executor == "local" and args.dry_run:  # what would run, nothing run
        units = [u.id for u in sweep.all_units()]  # training, lens and probe units, in the order they run
        print(f"sweep {sweep.name} would run {len(units)} unit(s) (finished ones are skipped when it runs):")
        print("\n".join(f"  {u}" for u in units))
        return
    if args.executor == "local":
        outcome = run_local(sweep, only=args.unit, progress=not args.quiet)
        failed = {u: o for u, o in outcome.items() if o.startswith("failed")}
        counts = {k: sum(o.split(":")[0] == k for o in outcome.values()) for k in ("done", "skipped", "failed")}
        print(f"sweep {sweep.name}: {counts['done']} unit(s) run, {counts['skipped']} skipped (finished or running "
              f"elsewhere), {counts['failed']} failed; results under {sweep.results}")
        if failed:
            raise ProbeError(f"{len(failed)} unit(s) failed (rerun to retry): "
                             + "; ".join(f"{u}: {o[8:]}" for u, o in failed.items())[:1500])
        return
    records = submit_slurm(sweep, dry_run=args.dry_run)
    for r in records:
        res = ", ".join(f"{k}={v}" for k, v in r["resources"].items())
        print(f"{'would submit' if args.dry_run else 'submitted job ' + r['job']}: {len(r['units'])} unit(s) "
              f"({res}) {r['script']}")
    if not records:
        print(f"sweep {sweep.name}: nothing to submit (every unit done, queued or running)")
    if args.wait and records and not args.dry_run:
        wait(sweep)
        cmd_status(args)


def cmd_status(args) -> None:
    from .runs.sweep import load_sweep, unit_states

    rows = unit_states(load_sweep(args.file))
    _print_table(("unit", "state", "detail"), [(u.id, state, detail[:100]) for u, state, detail in rows])
    counts = {}
    for _, state, _ in rows:
        counts[state] = counts.get(state, 0) + 1
    print("\n" + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))


def cmd_aggregate(args) -> None:
    from .reports.aggregate import to_markdown, write_tables
    from .api import aggregate

    results = Path(args.results or RESULTS)
    tables = aggregate(results, [b.strip() for b in args.by.split(",") if b.strip()], trend=args.trend)
    out = Path(args.out or results / "aggregate")
    if out.exists() and not out.is_dir():
        raise ProbeError(f"--out {str(out)!r} is a file; accepted: a folder for the tables")
    write_tables(tables, out)
    for name, df in tables.items():
        if name == "training-curves":  # every metric at every evaluation: a file to read, not a screenful
            print(f"\n## {name}\n\n{len(df)} rows (metric x step x variant): {out}/{name}.csv")
            continue
        print(f"\n## {name}\n\n{to_markdown(df)}")
    print(f"\ntables: {out}/<table>.csv, .parquet, .md (all in {out}/tables.md)")


def cmd_report(args) -> None:
    from .reports.html import write_report

    results = Path(args.results or RESULTS)
    out = write_report(results, [b.strip() for b in args.by.split(",") if b.strip()], args.out, args.trend)
    print(f"report: {out}")


def _print_table(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes (not the stream of the first call)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def build_parser() -> argparse.ArgumentParser:
    from .parser import build_parser as parser

    return parser({name[4:]: f for name, f in globals().items() if name.startswith("cmd_")})


def main(argv=None) -> int:
    import signal

    if hasattr(signal, "SIGPIPE"):  # `probe aggregate | head` ends quietly, as shell tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    log = logging.getLogger("probes")  # the API's progress lines ("loading ..."), on stderr as before
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        with confidence(getattr(args, "ci", 0.95)):
            args.func(args)
    except ProbeError as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # not the user's input: a folder that cannot be written, a full disk
        if e.filename is None:
            raise
        print(f"probe: error: cannot write or read {e.filename}: {e.strerror}; accepted: a path this user can "
              "write, on a disk with room", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        from .models.devices import is_out_of_memory  # torch is imported: it raised this

        if not is_out_of_memory(e):
            raise
        print(f"probe: error: out of memory ({type(e).__name__}); finished batches are kept: rerun with a "
              "smaller --batch-size, --quantize or more devices", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("probe: interrupted; finished batches are kept and a rerun resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
