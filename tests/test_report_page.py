"""The report as a reader meets it, in headless Chromium at 1,400 px: each probe's section leads with a table whose
first columns say which run a row is and whose next its headline metric with interval and count, visible without
scrolling; the bookkeeping is one click away per row; tables sort and filter; the probe's own figures are there;
random-weight models stay off the pretrained size curve; legends are in words; no console errors; no network."""

import base64
import html
import json
import re
import shutil
import subprocess

import pandas as pd
import pytest

from probes.reports.html import build_report, metric_plot

from .cluster import chromium

WIDTH = 1400
# pretend pretrained models: copies of a tiny run's folder whose meta.json says hub model of a given size and
# accuracy, so that the size plot has a pretrained curve and the tables numbers that sort
PRETEND = {"pretend-pretrained-a": (1.2e8, 0.6, 24, 40), "pretend-pretrained-b": (4.0e8, 0.8, 32, 40)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Tiny models only (seconds): the lens on two tasks for two models, accuracy with two seeds pooled in one row,
    an ablation; and two pretend-pretrained copies of a lens run."""
    import probes

    folder = tmp_path_factory.mktemp("page") / "results"
    plan = [("tiny-gpt2", "capitals", "logit-lens", 0), ("tiny-llama", "capitals", "logit-lens", 0),
            ("tiny-gpt2", "uppercase", "logit-lens", 0), ("tiny-llama", "uppercase", "logit-lens", 0),
            ("tiny-gpt2", "capitals", "accuracy", 0), ("tiny-gpt2", "capitals", "accuracy", 1),
            ("tiny-llama", "capitals", "ffn-ablation", 0)]
    for model, task, name, seed in plan:
        probes.run(probes.load(model), probes.task(task, ambiguous="flag", seed=seed), name, limit=6,
                   output=folder / model / task / name / f"seed-{seed}")
    source = folder / "tiny-gpt2" / "capitals" / "logit-lens" / "seed-0"
    for model, (params, accuracy, first, n) in PRETEND.items():
        target = folder / model / "capitals" / "logit-lens"
        shutil.copytree(source, target)
        meta = json.loads((target / "meta.json").read_text())
        meta["config"].update(model=model, source=f"hub:example/{model}")
        meta["model_params"] = params
        k = round(accuracy * n)
        meta["summary"].update(accuracy=k / n, accuracy_k=k, accuracy_n=n, accuracy_lo=k / n - 0.15,
                               accuracy_hi=k / n + 0.1, answer_top1_layer=first, answer_top1_layer_reached=k,
                               answer_top1_layer_of=n, items=n)
        (target / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def page(results, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(build_report(results, ["model", "task", "probe"]))
    return path


# first in <head>: every error the page raises or logs; last in <body>, after the page's own script: what the
# reader sees at 1,400 px, then a click on headers and a word in a filter box; the answer goes to the title
HOOK = """<script>window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
window.addEventListener("unhandledrejection", e => window.__errors.push(String(e.reason)));
const __error = console.error; console.error = (...a) => { window.__errors.push(a.join(" ")); __error(...a); };
</script>"""
MEASURE = """<script>window.addEventListener("load", () => {
  const view = document.documentElement.clientWidth, out = {view: view, page: document.documentElement.scrollWidth,
    tables: []};
  for (const table of document.querySelectorAll("table.sortable")) {
    if (table.closest("details:not([open])")) continue;  // in a collapsed section
    const box = table.closest(".table").getBoundingClientRect();
    const heads = [...table.tHead.rows[0].cells], i = heads.findIndex(h => h.classList.contains("metric"));
    const entry = {id: table.id, heads: heads.map(h => h.textContent), metric: i};
    if (i >= 0) {
      const cells = [...table.tBodies[0].rows].filter(r => !r.classList.contains("book")).map(r => r.cells[i]);
      const right = Math.max(...[heads[i], ...cells].map(c => c.getBoundingClientRect().right));
      entry.visible = right <= Math.min(view, box.right) + 1 && heads[i].getBoundingClientRect().left >= box.left - 1;
      entry.interval = cells.some(c => /\\[[^\\]]+,[^\\]]+\\]/.test(c.textContent));
    }
    out.tables.push(entry);
  }
  const main = table => [...table.tBodies[0].rows].filter(r => !r.classList.contains("book"));
  const column = (table, i) => main(table).map(r => r.cells[i].getAttribute("data-v") ?? r.cells[i].textContent);
  const sorts = {};
  let heads;
  for (const id of ["t-logit-lens", "t-accuracy"]) {
    const table = document.getElementById(id), heads = [...table.tHead.rows[0].cells];
    const rec = {before: column(table, 0)};
    for (const name of ["task", "answer top-1 at the last layer", "runs"]) {
      const i = heads.findIndex(h => h.textContent === name);
      if (i < 0) continue;
      heads[i].click(); rec[name + " up"] = column(table, i); rec[name + " up, first column"] = column(table, 0);
      heads[i].click(); rec[name + " down"] = column(table, i);
    }
    sorts[id] = rec;
  }
  out.sorts = sorts;
  const input = document.querySelector("input[data-table='t-logit-lens']");
  input.value = "uppercase"; input.dispatchEvent(new Event("input"));
  const lens = document.getElementById("t-logit-lens");
  out.filter = {shown: main(lens).filter(r => !r.hidden).map(r => r.cells[1].textContent),
                books: [...lens.querySelectorAll("tr.book")].filter(r => !r.hidden).length,
                count: input.parentNode.querySelector(".shown").textContent};
  input.value = ""; input.dispatchEvent(new Event("input"));
  const row = main(lens)[1], book = row.nextElementSibling;
  out.closed = book.getBoundingClientRect().height; row.querySelector("button.book").click();
  out.opened = {height: book.getBoundingClientRect().height, width: book.getBoundingClientRect().width,
                row: row.getBoundingClientRect().width, text: book.textContent, model: row.cells[0].textContent};
  input.value = "uppercase"; input.dispatchEvent(new Event("input"));
  out.kept = !book.hidden === row.cells[1].textContent.includes("uppercase");  // an opened row's setup filters with it
  heads = [...lens.tHead.rows[0].cells]; heads[1].click();
  out.follows = main(lens).every(r => !r.nextElementSibling || r.nextElementSibling.classList.contains("book"));
  out.errors = window.__errors;
  document.title = JSON.stringify(out);
});</script>"""


def in_browser(page, tmp_path) -> tuple[dict, str]:
    probe_page = tmp_path / "measured.html"
    text = page.read_text().replace("<head>", "<head>" + HOOK, 1)
    probe_page.write_text(text.replace("</body>", MEASURE + "</body>"))
    r = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--enable-logging=stderr", "--v=0", f"--window-size={WIDTH},900",
                        "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()],
                       capture_output=True, text=True, timeout=180, check=True)
    return json.loads(html.unescape(re.search(r"<title>(.*?)</title>", r.stdout, re.S).group(1))), r.stderr


def test_each_table_leads_with_its_metric_and_interval_in_view_sorts_filters_and_logs_no_error(page, tmp_path):
    m, stderr = in_browser(page, tmp_path)
    assert m["errors"] == [] and "Uncaught" not in stderr, (m["errors"], stderr[-2000:])
    assert m["page"] <= m["view"] and WIDTH - 20 <= m["view"] <= WIDTH, m  # no sideways scrolling (a scrollbar aside)
    shown = {t["id"]: t for t in m["tables"]}
    assert {"t-accuracy", "t-logit-lens", "t-ffn-ablation"} <= set(shown)
    for t in m["tables"]:  # every table in view, findings or curve: its first metric column and its interval
        assert t["metric"] >= 0 and t["visible"] and t["interval"], t
    lens = shown["t-logit-lens"]["heads"]
    assert lens[:3] == ["model", "task", "answer top-1 at the last layer"], lens
    assert not {"task_version", "task_digest", "task_options", "options", "dtype", "quantize", "limit"} & set(lens)
    assert shown["t-ffn-ablation"]["heads"][2:4] == ["accuracy, intact", "drop, top 1/6"]

    lens = m["sorts"]["t-logit-lens"]
    assert lens["task up"] == sorted(lens["task up"]) and lens["task down"] == sorted(lens["task down"], reverse=True)
    assert lens["task up, first column"] != lens["before"]  # a click reorders the rows
    up = [float(v) for v in lens["answer top-1 at the last layer up"]]
    down = [float(v) for v in lens["answer top-1 at the last layer down"]]
    assert up == sorted(up) and down == sorted(down, reverse=True) and up[-1] == 0.8 and down[0] == 0.8
    runs = [int(v) for v in m["sorts"]["t-accuracy"]["runs down"]]
    assert runs == sorted(runs, reverse=True) and runs[0] == 2  # two seeds pooled

    assert m["filter"]["shown"] == ["uppercase", "uppercase"] and m["filter"]["count"] == "2 of 6 rows", m["filter"]
    assert m["filter"]["books"] == 0  # no row's setup shows until asked for
    opened = m["opened"]  # a click on a row's "setup" shows its bookkeeping beneath it, the table's width
    assert m["closed"] == 0 and opened["height"] > 40 and opened["width"] == opened["row"], opened
    assert all(w in opened["text"] for w in ("task_digest", "self-check", opened["model"].split()[0])), opened
    assert m["kept"] and m["follows"]  # it filters and sorts with its row


def test_the_bookkeeping_is_kept_per_row_and_the_page_needs_no_network(page, results):
    text = page.read_text()
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", text)  # one file: nothing fetched
    lens = text[text.index("id='t-logit-lens'"):text.index("</table>", text.index("id='t-logit-lens'"))]
    meta = json.loads(next(results.glob("tiny-llama/capitals/logit-lens/*/meta.json")).read_text())
    for shown in ("task_digest", meta["config"]["task_digest"], "self-check: lens = logits", "cpu (by default)",
                  "tiny-llama/capitals/logit-lens/seed-0", "transformers"):
        assert shown in lens, shown
    assert "mean of 2 runs" in text  # the pooled row carries the mean over its runs beneath the pooled rate
    assert text.count("class='tag random'") >= 3  # tiny models are tagged as random weights wherever they lead


def _svgs(text: str) -> list[str]:
    return [base64.b64decode(s).decode() for s in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', text)]


def test_each_probe_shows_its_own_figure_with_legends_in_words(page, results):
    text = page.read_text()
    svgs = _svgs(text)
    lens = [s for s in svgs if "answer at the last position, by layer" in s]
    assert len(lens) == 2  # one per task
    assert "pretend-pretrained-b · capitals: n=6, top-1 from layer 32 (32/40 items)" in "".join(lens)
    assert "tiny-llama · capitals [random weights]: n=6, never top-1" in "".join(lens)
    assert any("accuracy and its relative drop per variant" in s for s in svgs)
    for s in svgs:
        assert "task_version" not in s and "task_digest" not in s and not re.search(r"\b[0-9a-f]{16}\b", s)
    # every run's plot is still there, and the size plot
    plots = len(list(results.rglob("plot.png")))
    assert text.count('<img src="data:image/png;base64,') == plots + 1  # and the lens by model size
    assert "logit-lens: accuracy by model size" in text


def test_random_and_trained_models_stay_off_the_pretrained_size_curve_and_every_point_has_its_count():
    from matplotlib.container import ErrorbarContainer

    df = pd.DataFrame({"model": ["tiny-a", "pre-1", "pre-2", "tiny-b", "run-x"], "task": "capitals",
                       "params": [2e5, 1.3e8, 3.6e8, 3e5, 1e6], "accuracy": [0.0, 0.4, 0.6, 0.1, 0.9],
                       "accuracy_lo": [0.0, 0.3, 0.5, 0.0, 0.8], "accuracy_hi": [0.3, 0.5, 0.7, 0.4, 1.0],
                       "accuracy_n": [8, 40, 40, 8, 20], "task_version": [1, 1, 2, 1, 1],
                       "task_digest": ["7ce52e52a3d0c6ee"] * 2 + ["0123456789abcdef"] + ["7ce52e52a3d0c6ee"] * 2})
    kinds = ["random", "pretrained", "pretrained", "random", "trained"]
    fig = metric_plot(df, "logit-lens", "params", kinds)
    assert [ax.get_title() for ax in fig.axes] == ["pretrained models", "random weights: no scaling curve",
                                                   "trained here"]
    for ax, joined in zip(fig.axes, (True, False, False)):
        for c in ax.containers:
            assert isinstance(c, ErrorbarContainer)
            line = c.lines[0]
            assert (line.get_linestyle() != "None") == joined
        xs = sorted(x for c in ax.containers for x in c.lines[0].get_xdata())
        assert xs == sorted(df.params[[k == ["pretrained", "random", "trained"][fig.axes.index(ax)]
                                       for k in kinds]]), ax.get_title()
        counts = [t.get_text() for t in ax.texts]
        assert len(counts) == len(xs) and all("n=" in t for t in counts), counts
        legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert "task_version" not in legend and "task_digest" not in legend and "7ce52e52" not in legend
    # the pretrained curve's two tasks contents are told apart in words
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"capitals (task content A)",
                                                                           "capitals (task content B)"}
    # one size of each kind: no plot against size
    assert metric_plot(df.iloc[[0, 1]], "logit-lens", "params", kinds[:2]) is None
