"""What a report's section leads with: per probe, a table whose first columns say which run a row is (model, task)
and whose next columns are the probe's headline metrics, each with its interval and count; the bookkeeping that
makes rows comparable (task digest and version, options, dtype, placement, self-check, versions) one click away in
each row. Also what kind of model a run probed (pretrained, random weights, trained here), for honest axes.

Tables are HTML that sort (click a header) and filter (the box above) with the report's small inline script; cells
carry their number in `data-v`, so a value with its interval sorts by the value.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd

from .aggregate import CURVES, SETUP_COLUMNS, TASK_SETUP, _unit

KIND_WORDS = {"pretrained": "pretrained", "random": "random weights", "trained": "trained here"}
MAX_PER_PATTERN = 6  # a pattern that matches more columns (a probe per layer) is shown at evenly spaced ones
MAX_RUNS_LISTED = 20  # runs listed in a row's bookkeeping (the rest counted)
LONG_TABLE = 25  # a table of more rows scrolls in a box of its own, its header kept in view

# probe -> [(column or pattern, header)], in the order the table shows them; a pattern's groups fill the header's
# {}. Probes not here lead with every metric that has an interval, in their summary's order.
LEAD = {
    "accuracy": [("accuracy", "accuracy"), ("consistent", "top-1 a prefix of the answer"),
                 ("whole_accuracy", "every step right")],
    "logit-lens": [("accuracy", "answer top-1 at the last layer"), ("answer_top1_layer", "answer first top-1 layer"),
                   ("argument_top1_layer", "argument first top-1 layer"), ("n_layers", "layers")],
    "ffn-readout": [("accuracy", "accuracy"), ("argument_top1_layer", "argument first top-1 layer"),
                    ("answer_top1_layer", "answer first top-1 layer"), ("switch_by_ffn", "switch made by an FFN"),
                    ("ffn_switch_block.block", "FFN switch block"), ("ffn_switch_block.share", "share at that block")],
    "ffn-transplant": [("best.top1", "answer top-1 with o (held out)"), ("baseline_top1", "without o"),
                       ("best.blocks", "at blocks"), ("best.scale", "scale"),
                       ("best_of_all.top1", "best of all (adjusted)")],
    "nback": [("accuracy", "accuracy")],
    "attention": [(r"nback_head\.(\d+)\.nback_mass_nonmatch", "N-back mass, N={}")],
    "activation-patching": [(r"by_site\.([^.]+)\.best\.recovery", "best cell's recovery ({})"),
                            ("pairs_used", "pairs used")],
    "attribution-patching": [(r"by_site\.([^.]+)\.best\.recovery", "best cell's recovery ({})"),
                             ("verification.spearman", "estimate vs exact (Spearman)"), ("pairs_used", "pairs used")],
    "linear-probe": [(r"layers\.(\d+)\.accuracy", "held-out accuracy, layer {}"),
                     (r"labels\.([^.]+)\.layers\.(\d+)\.accuracy", "{}: held-out accuracy, layer {}")],
    "logit-difference": [("logit_diff", "logit difference"), ("answer_preferred", "answer preferred"),
                         ("answer_prob", "P(answer)"), ("argument_prob", "P(argument)")],
    "induction": [("best_head_score", "best head's induction score"), ("loss_drop", "loss drop on the repeat")],
    "icl-score": [("score", "in-context learning score"), ("loss_early", "loss, early"), ("loss_late", "loss, late")],
}
# probe -> [(curve metric, the one value of the curve's dimension or None for each, header)]: curve columns the
# finding shows beside the summary's (ablation: the intact accuracy, then the drop at each variant)
CURVE_LEAD = {
    "ffn-ablation": [("accuracy", "none", "accuracy, intact"), ("relative_drop", None, "drop, {}")],
    "nback": [("dprime", None, "d', N={}")],
}
BOOK_WORDS = {"kind": "task kind", "family": "model family", "params": "parameters"}
SETUP_WORDS = {"limit": "limit", "task_options": "task options", "options": "options", "dtype": "", "quantize": ""}


def is_missing(v) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def norm(v) -> str | None:
    """A key value as text, the same for 6, 6.0 and '6', None for None and NaN."""
    if is_missing(v):
        return None
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)) or hasattr(v, "dtype"):
        try:
            f = float(v)
        except (TypeError, ValueError):
            return str(v)
        return str(int(f)) if f.is_integer() else repr(f)
    return str(v)


def fmt(v, digits: int = 3) -> str:
    """A number for reading: 3 significant digits, whole numbers as such; text as is; '' for missing."""
    if is_missing(v):
        return ""
    if isinstance(v, bool):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if f.is_integer() and abs(f) < 1e6:
        return str(int(f))
    return f"{f:.{digits}g}"


def model_kind(meta: dict) -> str:
    """'trained' for a checkpoint of a training run made here, 'random' for a model with random weights (a
    registry `tiny-*` entry, a config file), else 'pretrained'."""
    if meta.get("training"):
        return "trained"
    config = meta.get("config") or {}
    source = str(config.get("source") or "")
    if source.startswith("random") or (not source and str(config.get("model", "")).startswith("tiny-")):
        return "random"
    return "pretrained"


def row_keys(df: pd.DataFrame, by: list[str]) -> list[str]:
    """The columns that tell the rows of an aggregate table apart, as aggregate.group() grouped them."""
    return [c for c in [*by, *SETUP_COLUMNS] if c in df and (c not in TASK_SETUP or "task" in by)]


def runs_by_row(df: pd.DataFrame, by: list[str], runs: list[dict], probe: str) -> list[list[dict]]:
    """For each row of `probe`'s aggregate table, the runs pooled in it."""
    keys = row_keys(df, by)
    index: dict[tuple, list[dict]] = {}
    for m in runs:
        if m["config"]["probe"] == probe:
            unit = _unit(m)
            index.setdefault(tuple(norm(unit.get(k)) for k in keys), []).append(m)
    return [index.get(tuple(norm(row[k]) for k in keys), []) for _, row in df.iterrows()]


def setup_varying(df: pd.DataFrame, by: list[str]) -> list[str]:
    """The setup columns whose values differ between the rows of a table (what else tells its rows apart)."""
    return [c for c in row_keys(df, by) if c in SETUP_COLUMNS and df[c].map(norm).nunique(dropna=False) > 1]


def _options_words(text) -> str:
    try:
        options = json.loads(text) if isinstance(text, str) else (text or {})
    except ValueError:
        return str(text)
    if not isinstance(options, dict):
        return str(options)
    return ", ".join(f"{k}={v if not isinstance(v, (list, dict)) else json.dumps(v)}" for k, v in options.items()) \
        or "none"


def setup_words(df: pd.DataFrame, by: list[str]) -> list[str]:
    """Per row, what sets it apart from the other rows beyond `by`, in words ('limit 40, task options: shots=1');
    a task file edited between runs is 'task content A', 'B', ... (its digest is in the row's bookkeeping)."""
    varying = setup_varying(df, by)
    if not varying:
        return [""] * len(df)
    contents: dict = {}  # task -> its (version, digest) pairs in the order met
    for _, row in df.iterrows():
        seen = contents.setdefault(norm(row.get("task")), [])
        if (pair := (norm(row.get("task_version")), norm(row.get("task_digest")))) not in seen:
            seen.append(pair)
    out = []
    for _, row in df.iterrows():
        words = []
        seen = contents[norm(row.get("task"))]
        if any(c in TASK_SETUP for c in varying) and len(seen) > 1:
            index = seen.index((norm(row.get("task_version")), norm(row.get("task_digest"))))
            words.append(f"task content {chr(ord('A') + index % 26)}")
        for c in varying:
            if c in TASK_SETUP:
                continue
            v = row.get(c)
            if c in ("task_options", "options"):
                words.append(f"{SETUP_WORDS[c]}: {_options_words(v)}")
            elif is_missing(v):
                words.append({"quantize": "not quantized", "limit": "no limit"}.get(c, f"no {c}"))
            else:
                words.append(f"{SETUP_WORDS[c]} {fmt(v)}".strip())
        out.append(", ".join(words))
    return out


def lead_metrics(df: pd.DataFrame, probe: str) -> list[tuple[str, str]]:
    """[(column, header)]: the probe's headline metrics present in its table, in LEAD's order; a pattern matching
    many columns (one per layer) keeps MAX_PER_PATTERN evenly spaced ones, the first and last among them."""
    out = []
    for pattern, header in LEAD.get(probe, ()):
        found = []
        for c in df.columns:
            m = re.fullmatch(pattern, c)
            if m and c not in (x for x, _ in out) and (not df[c].map(is_missing).all() or f"{c}_reached" in df):
                found.append((c, header.format(*m.groups())))
        if len(found) > MAX_PER_PATTERN:
            step = (len(found) - 1) / (MAX_PER_PATTERN - 1)
            found = [found[round(i * step)] for i in range(MAX_PER_PATTERN)]
        out += found
    if not out and probe not in CURVE_LEAD:
        out = [(c, c) for c in df.columns if f"{c}_lo" in df and f"{c}_hi" in df
               and not c.endswith(("_mean", "_lo", "_hi")) and not df[c].map(is_missing).all()][:MAX_PER_PATTERN]
    return out


def with_curve(df: pd.DataFrame, curve: pd.DataFrame | None, probe: str, by: list[str]) -> tuple[pd.DataFrame, list]:
    """`df` with the curve's lead columns (CURVE_LEAD) joined on each row's keys, named 'metric@value', with their
    `_lo`, `_hi` and `_n`; and their [(column, header)]."""
    if curve is None or not len(curve) or probe not in CURVE_LEAD:
        return df, []
    dim = CURVES[probe][1]
    keys = row_keys(df, by)
    key_of = lambda row: tuple(norm(row.get(k)) for k in keys)  # noqa: E731
    values = list(dict.fromkeys(curve[dim]))
    added: dict[str, dict] = {}
    headers = []
    for metric, only, header in CURVE_LEAD[probe]:
        if metric not in curve:
            continue
        for value in values if only is None else [only]:
            if only is None and probe == "ffn-ablation" and str(value) == "none":
                continue  # nothing is removed: no drop
            name = f"{metric}@{value}"
            sub = curve[[norm(x) == norm(value) for x in curve[dim]]]
            if sub.empty:
                continue
            by_key = {key_of(r): r for _, r in sub.iterrows()}
            count = next((c for c in (f"{metric}_n", "accuracy_n", "trials") if c in sub), None)
            for suffix, source in (("", metric), ("_lo", f"{metric}_lo"), ("_hi", f"{metric}_hi"), ("_n", count)):
                if source in sub:
                    added[name + suffix] = {i: by_key[key_of(r)].get(source) if key_of(r) in by_key else None
                                            for i, r in df.iterrows()}
            headers.append((name, header.format(value)))
    if not added:
        return df, []
    return pd.concat([df, pd.DataFrame(added, index=df.index)], axis=1), headers


def metric_cell(row, col: str) -> tuple[float | str, str]:
    """(sort value, HTML): the value, its interval, its count ('n=40'; for a median over the items that reach a
    layer, 'k/n reach it'), and for a row pooling several runs, the mean over the runs with its t interval."""
    v = row.get(col)
    lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
    reached, of = row.get(f"{col}_reached"), row.get(f"{col}_of")
    if is_missing(v):
        text = "never" if not is_missing(reached) and float(reached) == 0 else "–"
        sort = ""
    else:
        text = html.escape(fmt(v))
        sort = float(v) if isinstance(v, (int, float)) or hasattr(v, "dtype") else str(v)
        if not is_missing(lo) and not is_missing(hi):
            text += f" <span class='ci'>[{fmt(lo)}, {fmt(hi)}]</span>"
    if not is_missing(row.get(f"{col}_n")):
        text += f" <span class='n'>n={int(float(row[f'{col}_n']))}</span>"
    elif not is_missing(reached) and not is_missing(of):
        text += f" <span class='n'>{int(float(reached))}/{int(float(of))} reach it</span>"
    runs, mean = row.get("runs"), row.get(f"{col}_mean")
    if not is_missing(runs) and int(runs) > 1 and not is_missing(mean):
        lo, hi = row.get(f"{col}_mean_lo"), row.get(f"{col}_mean_hi")
        interval = f" [{fmt(lo)}, {fmt(hi)}]" if not is_missing(lo) and not is_missing(hi) else ""
        text += f"<div class='mean'>mean of {int(runs)} runs {fmt(mean)}{interval}</div>"
    return sort, text


def _selfcheck_words(check) -> str:
    if not isinstance(check, dict):
        return "not recorded"
    try:
        from ..runs.selfcheck import describe

        return describe(check).removeprefix("self-check: ")
    except Exception:  # a check of another version, a hand-edited meta.json: its figures as they are
        return json.dumps(check, default=str)


def _placement_words(meta: dict) -> str:
    p = meta.get("placement")
    if not isinstance(p, dict):
        return "not recorded"
    where = ", ".join(map(str, p.get("devices") or [])) or str(p.get("device_map"))
    return where + (" (by default)" if p.get("default") else f" (device_map {p.get('device_map')})")


def bookkeeping(row, runs: list[dict], results: Path, columns: list[str]) -> str:
    """A row's setup and provenance (shown under the row on a click): the setup columns of the aggregate table,
    then per run its folder, seed, placement, self-check, versions and commit."""
    items = []
    for c in columns:
        if c in row.index and not is_missing(row[c]):
            value = f"{int(row[c]):,}" if c == "params" else fmt(row[c])
            items.append(f"<dt>{html.escape(BOOK_WORDS.get(c, c))}</dt><dd>{html.escape(value)}</dd>")
    listed = []
    for m in sorted(runs, key=lambda m: m["path"])[:MAX_RUNS_LISTED]:
        path = Path(m["path"])
        try:
            path = path.relative_to(results)
        except ValueError:
            pass
        c = m["config"]
        versions = m.get("versions") or {}
        listed.append(
            f"<li><code>{html.escape(str(path))}</code>: seed {html.escape(fmt(c.get('seed')))}, "
            f"{html.escape(KIND_WORDS[model_kind(m)])} ({html.escape(str(c.get('source') or c.get('model')))}"
            f"{', revision ' + html.escape(str(c['revision'])) if c.get('revision') else ''}), "
            f"on {html.escape(_placement_words(m))}; self-check: {html.escape(_selfcheck_words(m.get('self_check')))}; "
            + html.escape(", ".join(f"{k} {v}" for k, v in versions.items() if k in ("probe", "torch", "transformers",
                                                                                   "nnsight")))
            + (f"; commit {html.escape(str(m['git_commit']))}" if m.get("git_commit") else "")
            + (f"; finished {html.escape(str(m['finished']))}" if m.get("finished") else "") + "</li>")
    more = len(runs) - len(listed)
    runs_html = (f"<dt>runs</dt><dd><ul>{''.join(listed)}</ul>" + (f"and {more} more" if more > 0 else "") + "</dd>"
                 if listed else "")
    return f"<dl class='setup'>{''.join(items)}{runs_html}</dl>"


def render_table(headers: list[tuple[str, str]], rows: list[list[tuple]], table_id: str,
                 filter_from: int = 4, details: list[str] | None = None) -> str:
    """A sortable table in a box that scrolls sideways (so a wide one never widens the page), with a filter box
    above when it has `filter_from` rows or more. headers: [(text, class)]: 'id' (what the row is), 'metric'
    (a headline value with its interval), '' otherwise; rows: [[(sort value, HTML)]]; details: per row, HTML
    shown in a full-width row beneath it when its last cell's 'setup' button is clicked (hidden rows that sort
    and filter with theirs; shown anyway where scripts do not run)."""
    head = "".join(f"<th class='{cls}' title='sort'>{html.escape(text)}</th>" for text, cls in headers)
    body = []
    for i, row in enumerate(rows):
        body.append("<tr>" + "".join(
            f"<td class='{cls}'" + (f" data-v='{html.escape(str(sort))}'" if sort != "" else "") + f">{cell}</td>"
            for (sort, cell), (_, cls) in zip(row, headers)) + "</tr>")
        if details is not None:
            body.append(f"<tr class='book' hidden><td colspan='{len(headers)}'>{details[i]}</td></tr>")
    long = " long" if len(rows) > LONG_TABLE else ""
    box = (f"<div class='table{long}'><table class='sortable' id='{table_id}'><thead><tr>{head}</tr></thead>"
           f"<tbody>{''.join(body)}</tbody></table></div>")
    if len(rows) >= filter_from:
        box = (f"<div class='filter'><input type='search' placeholder='filter rows (words, all must match)' "
               f"data-table='{table_id}' aria-label='filter rows'> <span class='shown'>{len(rows)} rows</span></div>"
               + box)
    return box


def frame_table(df: pd.DataFrame, table_id: str, first: list[str] = (), metrics: list[str] | None = None) -> str:
    """Any table for reading: each metric with `_lo`/`_hi` as one cell "0.602 [0.532, 0.668]" (its `_k` left out,
    its `_n` kept), `first` columns first, then the metrics, then the rest; `metrics`: columns to mark as metrics
    when they carry no bounds (cells that are already text with their interval)."""
    bounded = [c for c in df.columns if f"{c}_lo" in df and f"{c}_hi" in df]
    dropped = {x for c in bounded for x in (f"{c}_lo", f"{c}_hi", f"{c}_k")}
    marked = list(metrics or []) + bounded
    shown = [c for c in df.columns if c not in dropped]
    order = ([c for c in first if c in shown] + [c for c in shown if c in marked and c not in first]
             + [c for c in shown if c not in first and c not in marked])
    headers = [(str(c), "metric" if c in marked else ("id" if c in first else "")) for c in order]
    rows = []
    for _, row in df.iterrows():
        cells = []
        for c in order:
            v = row[c]
            if c in bounded:
                sort, text = metric_cell(row.drop([x for x in (f"{c}_n", "runs") if x in row.index]), c)
            else:
                sort = "" if is_missing(v) else (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 else str(v))
                text = html.escape(fmt(v, 4))
            cells.append((sort, text))
        rows.append(cells)
    return render_table(headers, rows, table_id)


def findings_table(df: pd.DataFrame, probe: str, by: list[str], runs: list[list[dict]], kinds: dict[str, str],
                   results: Path, curve: pd.DataFrame | None, table_id: str) -> str:
    """The section's lead: who (the `by` columns but the probe, the model marked with its kind), what else sets
    the row apart (in words, when anything does), the headline metrics with intervals and counts, the runs pooled,
    and the row's bookkeeping collapsed."""
    df, curve_headers = with_curve(df.reset_index(drop=True), curve, probe, by)
    ids = [c for c in by if c in df and c != "probe"]
    setup = setup_words(df, by)
    metrics = lead_metrics(df, probe) + curve_headers
    headers = [(c, "id") for c in ids] + ([("setup", "id")] if any(setup) else [])
    headers += [(h, "metric") for _, h in metrics] + [("runs", ""), ("setup", "book")]
    book_columns = [c for c in ("family", "params", "kind", *SETUP_COLUMNS, "seeds", "training_run") if c in df]
    rows, books = [], []
    for i, row in df.iterrows():
        cells = []
        for c in ids:
            v = row[c]
            text = html.escape(fmt(v))
            if c == "model" and kinds.get(str(v), "pretrained") != "pretrained":
                text += f" <span class='tag {kinds[str(v)]}'>{KIND_WORDS[kinds[str(v)]]}</span>"
            cells.append(("" if is_missing(v) else (float(v) if c == "step" else str(v)), text))
        if any(setup):
            cells.append((setup[i], html.escape(setup[i])))
        cells += [metric_cell(row, c) for c, _ in metrics]
        cells.append((int(row["runs"]) if "runs" in row and not is_missing(row["runs"]) else "",
                      fmt(row.get("runs")) + (f" <span class='n'>({fmt(row['seeds'])} seeds)</span>"
                                              if "seeds" in row and not is_missing(row["seeds"])
                                              and not is_missing(row.get("runs")) and row["seeds"] != row["runs"]
                                              else "")))
        cells.append(("", "<button type='button' class='book' aria-expanded='false'>setup</button>"))
        rows.append(cells)
        books.append(bookkeeping(row, runs[i], results, book_columns))
    return render_table(headers, rows, table_id, details=books)


def series_label(row, by: list[str], setup: str, kinds: dict[str, str], x: str | None = None) -> str:
    """A row in words for a legend: 'smollm2-135m · capitals', the setup that sets it apart, the model's kind
    when not pretrained; never a digest."""
    parts = [fmt(row[c]) for c in (*by, "training_run") if c in row.index and c not in ("probe", x, "step")
             and not is_missing(row[c]) and not (c == "training_run" and "model" in by)]
    label = " · ".join(dict.fromkeys(parts)) + (f" ({setup})" if setup else "")
    kind = kinds.get(str(row.get("model")), "pretrained") if "model" in row.index else "pretrained"
    return label + (f" [{KIND_WORDS[kind]}]" if kind != "pretrained" else "")
