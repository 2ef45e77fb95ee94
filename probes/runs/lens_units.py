"""The `lens` part of a sweep file: one tuned-lens training unit per distinct model of the sweep (after expansion: a
trained run's checkpoints are models each), training `probe lens train`'s lens into the model's cache folder, where
`--lens tuned` reads it (methods/tuned_lens.py):

    lens: {tokens: 65536, corpus: stdlib-english, slurm: {time: "02:00:00"}}   # each optional

A model's lens unit runs before its probe units: in-process first, with the model loaded once for both; on Slurm as
its own job, which the probe units that read the cached lens (`options: {lens: tuned}`) wait for (afterok). A lens
unit is done when its cache folder holds a lens trained on the same tokens and corpus (its meta.json); one trained on
others is trained again, replacing it: the cache holds one lens per model, the sweep file says which, and each run's
identity keeps its lens' digest, so runs through the old lens are rerun, never mixed with the new."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProbeError
from .rundir import RunLock, safe_name, write_json
from .trained_units import SLURM_KEYS, TrainUnit

LENS_KEYS = ("tokens", "corpus", "slurm")


@dataclass(frozen=True)
class LensUnit:
    """The tuned lens of one model of the sweep, trained on `tokens` tokens of `corpus`."""
    model: str
    label: str | None  # as Unit.label: the model's name where its path makes a poor one
    trained_by: TrainUnit | None
    tokens: int
    corpus: str

    @property
    def id(self) -> str:
        return f"lens/{safe_name(self.label or self.model)}"


def lens_spec(spec, base: Path, where: str) -> dict:
    """A sweep's `lens` mapping, checked: tokens (default tuned_lens.TOKENS), corpus (default stdlib-english; a
    file:PATH relative to the sweep file, kept absolute) and slurm (the lens jobs' resources)."""
    from ..methods.tuned_lens import CORPUS, TOKENS
    from ..tasks.corpus import ACCEPTED, check

    bad = sorted(set(spec) - set(LENS_KEYS))
    if bad:
        raise ProbeError(f"{where}: unknown lens field(s) {', '.join(bad)}; accepted: {', '.join(LENS_KEYS)}")
    tokens, corpus, slurm = spec.get("tokens", TOKENS), spec.get("corpus", CORPUS), spec.get("slurm") or {}
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ProbeError(f"{where}: lens tokens {tokens!r}; accepted: a positive integer (default {TOKENS})")
    if not isinstance(corpus, str):
        raise ProbeError(f"{where}: lens corpus {corpus!r}; accepted: {ACCEPTED}")
    check(corpus, f"{where}: lens")
    if corpus.startswith("file:"):
        path = base / corpus.removeprefix("file:")
        if not path.is_file():
            raise ProbeError(f"{where}: lens corpus {corpus!r}: no file {str(path)!r}; accepted: file:PATH of a "
                             ".jsonl or .txt file, relative to the sweep file")
        corpus = f"file:{path.resolve()}"
    if not isinstance(slurm, dict) or set(slurm) - SLURM_KEYS:
        raise ProbeError(f"{where}: lens slurm {slurm!r}; accepted: a mapping of {', '.join(sorted(SLURM_KEYS))}")
    return {"tokens": tokens, "corpus": corpus, "slurm": slurm}


def reads_lens(sweep, unit) -> bool:
    """Whether a probe unit decodes through its model's cached tuned lens (`options: {lens: tuned}`)."""
    from ..methods.catalog import probe_options

    return probe_options(unit.probe, sweep.options).get("lens") == "tuned"


def lens_folder(spec) -> Path:
    """Where the model's lens goes: the cache folder `--lens tuned` reads."""
    from ..methods.tuned_lens import cache_folder

    return cache_folder(spec)


def lock_folder(folder: Path) -> Path:
    """Beside the lens folder, which holds the lens' files alone (tuned_lens.check_output): its lock and a failure's
    record."""
    return folder.parent / ".training" / folder.name


def matches(meta: dict | None, lu: LensUnit) -> bool:
    """The lens' meta.json says it was trained on the tokens and corpus the unit asks for."""
    return isinstance(meta, dict) and meta.get("tokens_asked") == lu.tokens and meta.get("corpus") == lu.corpus


def lens_state(sweep, lu: LensUnit, meta: dict | None, queued: dict) -> tuple[str, str]:
    """(state, detail) of a lens unit whose model exists, as sweep.unit_states gives them."""
    from .queue import last_job

    folder = sweep.output(lu)
    lock = RunLock(lock_folder(folder))
    failed = _read(lock_folder(folder) / "failed.json")
    if matches(meta, lu):
        return "done", f"{meta['tokens']:,} tokens of {meta['corpus']} in {folder}"
    if lock.alive():
        h = lock.holder() or {}
        job = f", job {h['slurm_job']}" if h.get("slurm_job") else ""
        return "running", f"pid {h.get('pid')} on {h.get('host')}{job}"
    if lu.id in queued:
        return "running" if queued[lu.id].startswith("running") else "queued", queued[lu.id]
    if failed:
        return "failed", failed.get("error", "")
    if meta:
        return "pending", (f"stale: its cached lens was trained on {meta.get('tokens_asked')} tokens of "
                           f"{meta.get('corpus')}; a rerun trains it again")
    if last := last_job(sweep, lu):
        return "pending", f"no lens; last submitted as job {last[0]}, which has ended (log: {last[1]})"
    return "pending", ""


def run_lens(sweep, lu: LensUnit, loaded, progress: bool = True) -> str:
    """Train the unit's lens into its model's cache folder: 'done', 'skipped' (trained already, or another process
    holds it) or 'failed: ...', which is kept for `probe status` until a training succeeds."""
    from ..methods.tuned_lens import train_lens

    folder = sweep.output(lu)
    lock = RunLock(lock_folder(folder))
    if not lock.acquire():
        return "skipped"
    failed = lock_folder(folder) / "failed.json"
    try:
        if matches(_read(folder / "meta.json"), lu):  # another process trained it after the caller's look
            return "skipped"
        train_lens(loaded, lu.tokens, lu.corpus, folder, progress)
        failed.unlink(missing_ok=True)
        return "done"
    except Exception as e:  # as sweep.run_unit: one unit's failure must not stop the others
        error = str(e) if isinstance(e, ProbeError) else f"{type(e).__name__}: {e}"
        write_json(failed, {"error": error, "tokens": lu.tokens, "corpus": lu.corpus})
        return f"failed: {error}"
    finally:
        lock.release()


def lens_time(p, lu: LensUnit, gpu: bool) -> str:
    """A lens unit's Slurm time limit (planning.time_limit): its tokens in chunks of tuned_lens.SEQ_LEN, each a
    forward of the model and per layer the lens' logits forward and backward, counted as three passes of the whole
    model (an upper bound: the unembedding is part of it)."""
    from ..methods.tuned_lens import SEQ_LEN
    from ..models.planning import time_limit

    return time_limit(p, 1 + 3 * p.n_layers, math.ceil(lu.tokens / SEQ_LEN), 1, SEQ_LEN, gpu)


def _read(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
