"""`--lens` in every read-out that decodes a residual or an FFN update (logit-lens, ffn-readout, ffn-transplant's
source search): an untrained (identity) tuned lens gives exactly the logit lens' results on several families; a
perturbed one changes them, decoding what ffn_readout's docstring says (the bias never added to an update); the
logit-lens' KL column is the KL computed with plain torch hooks; a lens of another model is refused in one line; the
lens, with its digest, is part of a run's identity; the self-check stays the logit lens'."""

import json

import pandas as pd
import pytest
import torch

import probes
from probes.errors import ProbeError
from probes.methods.catalog import PROBES
from probes.methods.ffn_readout import last_position_updates, run_readout
from probes.methods.lens import run_lens
from probes.methods.readout import rank_of, target_ids
from probes.methods.tuned_lens import TunedLens, file_digest, model_identity, package_config, save_lens
from probes.reports import plots
from probes.runs.plan import plan_run
from probes.tasks.base import answer_token
from probes.tasks.files import load_task
from probes.tasks.prompts import prompts_task

from .conftest import loaded

LENS_PROBES = [name for name, spec in PROBES.items() if "lens" in spec.options]
FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-gpt-neox", "tiny-gemma3", "tiny-opt"]
LIMIT = 4
PROMPTS = [{"prompt": "The capital of France is", "answer": "Paris", "argument": "France"},
           {"prompt": "Q: What is the capital of Poland?\nA:", "answer": "Warsaw", "argument": "Poland"}]


def capitals():
    return load_task("capitals", {"ambiguous": "flag"})  # the tiny tokenizer makes most answers ambiguous


def saved(lm, folder, lens: TunedLens | None = None):
    """`lens` (default: untrained) saved for `lm` as `probe lens train` saves it; `--lens tuned:FOLDER`."""
    save_lens(lens if lens is not None else TunedLens(package_config(lm)), folder, {"model": model_identity(lm.spec)})
    return f"tuned:{folder}"


def perturbed(lm, seed: int = 0, bias: bool = True, weight: bool = True) -> TunedLens:
    lens = TunedLens(package_config(lm))
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in lens.layer_translators:
            if weight:
                t.weight.normal_(0, 0.2)
            if bias:
                t.bias.normal_(0, 2.0)
    return lens


def outcome(lm, probe: str, **options):
    """The table of a run (no self-check: it reads the logit lens either way), or the one line refusing it."""
    try:
        return probes.run(lm, capitals(), probe, limit=LIMIT, self_check=False, **options).table
    except ProbeError as e:
        return str(e)


def switch_lens(lm, items) -> TunedLens:
    """A lens under which block 0's FFN switches the first item's answer on: translator 1 adds k v (r . h), v the
    answer's unembedding row (centred), r the part of the item's FFN update orthogonal to the state before it, so the
    state before the FFN decodes as under the logit lens and the state after it decodes to the answer."""
    it = items[0]
    u = last_position_updates(lm, [it.prompt])
    before, update = (u["resid"][0, 0] + u["attn"][0, 0]).float(), u["ffn"][0, 0].float()
    r = update - (update @ before) / (before @ before) * before
    r = r / r.norm()
    w = lm.arch.hf.get_output_embeddings().weight[answer_token(lm.tokenizer, it)].detach().float()
    lens = TunedLens(package_config(lm))
    with torch.no_grad():
        lens.layer_translators[1].weight.copy_(1e3 * torch.outer(w - w.mean(), r) / (r @ update))
    return lens


def test_the_probes_that_decode_take_the_lens():
    assert set(LENS_PROBES) == {"logit-lens", "ffn-readout", "ffn-transplant"}


@pytest.mark.parametrize("probe", LENS_PROBES)
@pytest.mark.parametrize("name", FAMILIES)
def test_an_untrained_lens_gives_the_logit_lens_results_exactly(probe, name, tmp_path):
    lm = loaded(name)
    value = saved(lm, tmp_path / "lens")
    logit, identity = outcome(lm, probe), outcome(lm, probe, lens=value)
    if isinstance(logit, str):  # ffn-transplant on a random model: no FFN switches an answer on, under either
        assert "switched on by an FFN" in logit
        assert identity == logit.replace("; pass", f" under --lens {value}; pass") + " (with --lens logit)"
    else:
        assert logit.equals(identity)


@pytest.mark.parametrize("probe", ["logit-lens", "ffn-readout"])
def test_a_perturbed_lens_changes_the_table(probe, tmp_path):
    lm = loaded("tiny-llama")
    logit, tuned = outcome(lm, probe), outcome(lm, probe, lens=saved(lm, tmp_path / "lens", perturbed(lm)))
    stage = "answer_prob" if probe == "logit-lens" else "answer_rank_after_ffn"
    assert not logit[stage].equals(tuned[stage])
    if probe == "ffn-readout":  # the update's own decoding too
        assert not logit.ffn_answer_rank.equals(tuned.ffn_answer_rank)
        assert logit.ffn_norm.equals(tuned.ffn_norm)  # |u| is no lens'


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gpt-neox"])
def test_the_transplant_s_sources_are_found_under_the_lens(name, tmp_path):
    """Under the logit lens no FFN switches an answer on in a random model, and the transplant is refused; under a
    lens where block 0's FFN switches the first item's answer on, that item at block 0 is the source, and the table is
    the logit lens' run given that source and block."""
    lm = loaded(name)
    items, _ = capitals().scored_items(lm.tokenizer, LIMIT)
    assert "switched on by an FFN" in outcome(lm, "ffn-transplant")
    result = probes.run(lm, capitals(), "ffn-transplant", limit=LIMIT, self_check=False, output=tmp_path / "run",
                        lens=saved(lm, tmp_path / "lens", switch_lens(lm, items)))
    prepared = json.loads((tmp_path / "run" / "meta.json").read_text())["prepared"]
    assert prepared["source_items"] == [items[0].input] and prepared["source_layer"] == 0
    assert prepared["tuned_lens"]["params_sha256"] == file_digest(tmp_path / "lens" / "params.pt")
    given = outcome(lm, "ffn-transplant", source_items=items[0].input, source_layer=0)
    assert result.table.equals(given)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-falcon"])
def test_the_readout_decodes_translated_residuals_and_updates_without_the_bias(name):
    """Residual index i through T_i, the state before block i's FFN through T_{i+1}, the update through T_{i+1}'s
    linear part: checked against decoding those vectors by hand; a lens that is only a bias changes the residuals'
    columns and leaves the update's as the logit lens has them."""
    lm = loaded(name)
    items = prompts_task(rows=PROMPTS).items()
    lens = perturbed(lm)
    rows = pd.DataFrame(run_readout(lm, items, state=lens))
    u = last_position_updates(lm, [it.prompt for it in items])
    answer = target_ids(lm, items)["answer"]

    def ranks(vectors):  # (batch, d) -> the answer's rank
        return rank_of(lm.arch.decode(vectors), answer).tolist()

    with torch.no_grad():
        for i in range(lm.arch.n_layers):
            t = lens.layer_translators[i + 1] if i + 1 < lm.arch.n_layers else None
            after, mid, ffn = u["resid"][:, i + 1], u["resid"][:, i] + u["attn"][:, i], u["ffn"][:, i]
            if t is not None:
                after, mid, ffn = after + t(after), mid + t(mid), ffn + ffn @ t.weight.T
            got = rows[rows.block == i].sort_values("item")
            assert list(got.answer_rank_after_ffn) == ranks(after)
            assert list(got.answer_rank_before_ffn) == ranks(mid)
            assert list(got.ffn_answer_rank) == ranks(ffn)
    logit = pd.DataFrame(run_readout(lm, items))
    bias = pd.DataFrame(run_readout(lm, items, state=perturbed(lm, weight=False)))
    assert bias.ffn_answer_rank.equals(logit.ffn_answer_rank) and bias.ffn_topk.equals(logit.ffn_topk)
    assert not bias.answer_rank_before_ffn.equals(logit.answer_rank_before_ffn)


# the HF modules a hand-written lens reads: blocks, final norm, unembedding
MODULES = {"tiny-gpt2": lambda hf: (hf.transformer.h, hf.transformer.ln_f, hf.lm_head),
           "tiny-llama": lambda hf: (hf.model.layers, hf.model.norm, hf.lm_head)}


def hooked_kl(lm, prompt: str, lens: TunedLens | None) -> torch.Tensor:
    """KL(model's next-token distribution || lens distribution) at the last position per residual index, with plain
    torch: each block's input and output caught by hooks, decoded through final norm and unembedding by hand."""
    hf = lm.arch.hf
    blocks, norm, unembed = MODULES[lm.spec.name](hf)
    caught = []
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args, kwargs: caught.append(
        (args[0] if args else kwargs["hidden_states"])[0, -1]), with_kwargs=True)]
    hooks += [b.register_forward_hook(lambda m, args, out: caught.append(
        (out[0] if isinstance(out, tuple) else out)[0, -1])) for b in blocks]
    try:
        with torch.no_grad():
            logits = hf(**lm.tokenizer(prompt, return_tensors="pt")).logits[0, -1].float()
            p = logits.log_softmax(-1)
            kl = []
            for i, h in enumerate(caught):
                if lens is not None and i < len(blocks):
                    t = lens.layer_translators[i]
                    h = h + h @ t.weight.T + t.bias
                q = unembed(norm(h)).float().log_softmax(-1)
                kl.append((p.exp() * (p - q)).sum())
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(kl)


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("tuned", [False, True])
def test_the_kl_column_is_the_kl_to_the_model_s_distribution(name, tuned):
    lm = loaded(name)
    items = prompts_task(rows=PROMPTS).items()
    lens = perturbed(lm) if tuned else None
    for positions in (None, "all"):  # a padded batch, at the last position and at every one
        rows = pd.DataFrame(run_lens(lm, items, positions=positions, state=lens))
        rows = rows[rows.last_position]
        for it in items:
            mine = torch.tensor(rows[rows.item == it.index].sort_values("layer").kl_to_final.tolist())
            torch.testing.assert_close(mine, hooked_kl(lm, it.prompt, lens), rtol=1e-3, atol=2e-6)
            assert mine[-1] == 0 and (mine[:-1] > 0).all()


def test_the_report_gives_the_kl_per_layer_with_its_interval_and_count():
    lm = loaded("tiny-gpt2")
    result = probes.run(lm, prompts_task(rows=PROMPTS), "logit-lens", self_check=False)
    kl = result.summary["kl_to_final"]
    assert [k["layer"] for k in kl] == list(range(lm.arch.n_layers + 1)) and all(k["kl_to_final_n"] == 2 for k in kl)
    assert all(k["kl_to_final_lo"] <= k["kl_to_final"] <= k["kl_to_final_hi"] for k in kl)
    means = result.table.groupby("layer").kl_to_final.mean()
    assert [k["kl_to_final"] for k in kl] == pytest.approx(list(means), rel=1e-9)
    assert "kl_to_final" in result.report and f"{kl[0]['kl_to_final']:.3f} [" in result.report and "(n=2)" in result.report


def test_the_heat_maps_over_positions_are_the_chosen_lens(tmp_path, monkeypatch):
    lm = loaded("tiny-gpt2")
    items = prompts_task(rows=PROMPTS).items()
    logit = pd.DataFrame(run_lens(lm, items, positions="all"))
    tuned = pd.DataFrame(run_lens(lm, items, positions="all", state=perturbed(lm)))
    early = ~logit.last_position & (logit.layer < lm.arch.n_layers)
    assert (logit[early].answer_prob - tuned[early].answer_prob).abs().min() > 0  # every cell but the last index's
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    for options in ({}, {"lens": "tuned:x"}):
        plots.plot_lens(tuned, {"model": "m", "task": "t", "options": options}, tmp_path / "p.png")
    titles = [fig._suptitle.get_text() for fig in drawn]
    assert titles[0].startswith("logit lens by layer and position") and titles[1].startswith("tuned lens by layer")
    image = drawn[1].axes[0].images[0].get_array()
    first = tuned[tuned.item == items[0].index].pivot_table(index="layer", columns="position", values="answer_prob")
    assert (image == first.to_numpy()).all()


@pytest.mark.parametrize("probe", LENS_PROBES)
def test_a_lens_of_one_model_is_refused_on_another_in_one_line(probe, tmp_path):
    value = saved(loaded("tiny-gpt2"), tmp_path / "lens")
    refusal = outcome(loaded("tiny-llama"), probe, lens=value)
    assert isinstance(refusal, str) and "\n" not in refusal
    assert "trained on tiny-gpt2, not tiny-llama" in refusal


def test_a_tuned_lens_with_named_sources_is_refused_before_loading(tmp_path):
    value = saved(loaded("tiny-gpt2"), tmp_path / "lens")
    with pytest.raises(ProbeError, match="--source-items names them") as e:
        plan_run("tiny-gpt2", [capitals()], "ffn-transplant",
                 {"lens": value, "source_items": "Poland", "source_layer": 0})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("probe", ["logit-lens", "ffn-readout"])
def test_the_lens_and_its_digest_are_the_run_s_identity(probe, tmp_path):
    """A logit run's folder refuses a tuned run, and a tuned run's folder refuses the same option once the lens there
    is another (trained again); the self-check stays the logit lens'."""
    lm = loaded("tiny-gpt2")
    value = saved(lm, tmp_path / "lens", perturbed(lm))

    def run(folder, **options):
        probes.run(lm, capitals(), probe, limit=LIMIT, output=tmp_path / folder, **options)
        return json.loads((tmp_path / folder / "meta.json").read_text())

    logit, tuned = run("logit"), run("tuned", lens=value)
    assert "tuned_lens" not in logit["config"] and tuned["self_check"] == logit["self_check"]
    assert tuned["config"]["tuned_lens"] == {"params_sha256": file_digest(tmp_path / "lens" / "params.pt")}
    with pytest.raises(ProbeError, match="holds a different run"):
        plan_run(loaded=lm, tasks=[capitals()], probe=probe, options={"lens": value}, limit=LIMIT,
                 output=tmp_path / "logit")
    plan_run(loaded=lm, tasks=[capitals()], probe=probe, options={"lens": value}, limit=LIMIT,
             output=tmp_path / "tuned")  # the same run: it would resume
    saved(lm, tmp_path / "lens", perturbed(lm, seed=1))
    with pytest.raises(ProbeError, match="holds a different run.*params_sha256") as e:
        plan_run(loaded=lm, tasks=[capitals()], probe=probe, options={"lens": value}, limit=LIMIT,
                 output=tmp_path / "tuned")
    assert "\n" not in str(e.value)


def test_runs_with_two_different_tuned_lenses_are_never_pooled():
    """`probe aggregate` pools runs that differ only by seed; a tuned lens' digest is part of the setup, so two
    lenses (same --lens text, retrained) stay two rows, and logit runs keep no lens column."""
    from probes.reports.aggregate import group, summary_table

    def meta(seed, digest=None):
        config = {"model": "m", "task": "t", "probe": "logit-lens", "seed": seed, "limit": 4,
                  "options": {"lens": "tuned"} if digest else {},
                  **({"tuned_lens": {"params_sha256": digest}} if digest else {})}
        return {"config": config, "summary": {"accuracy": 0.5}, "model_params": 1}

    tuned = summary_table([meta(0, "a"), meta(1, "a"), meta(0, "b")], "logit-lens")
    assert sorted(group(tuned, ["model", "task"]).runs.tolist()) == [1, 2]
    plain = summary_table([meta(0), meta(1)], "logit-lens")
    assert "lens" not in plain and group(plain, ["model", "task"]).runs.tolist() == [2]


def test_a_tuned_run_without_output_goes_beside_the_logit_lens_run(tmp_path):
    """`probe run` without --output: the logit lens' run in <probe>, a tuned lens' in <probe>-lens-<value>, so the
    second is a run of its own, not a refusal."""
    from probes.runs.plan import default_output

    assert default_output(tmp_path, "m", "t", "logit-lens") == tmp_path / "m" / "t" / "logit-lens"
    assert default_output(tmp_path, "m", "t", "logit-lens", "logit") == tmp_path / "m" / "t" / "logit-lens"
    assert default_output(tmp_path, "m", "t", "logit-lens", "tuned") == tmp_path / "m" / "t" / "logit-lens-lens-tuned"
    other = default_output(tmp_path, "m", "t", "ffn-readout", "tuned:/x/../lens")
    assert other.parent == tmp_path / "m" / "t" and other.name.startswith("ffn-readout-lens-tuned")
    assert "/" not in other.name and ".." not in other.name


@pytest.mark.parametrize("probe", LENS_PROBES)
def test_lens_logit_spelled_out_is_the_run_without_the_option(probe):
    from probes.methods.catalog import probe_options

    assert probe_options(probe, {"lens": "logit"}) == probe_options(probe, {})
    assert probe_options(probe, {"lens": "tuned"})["lens"] == "tuned"


def test_the_reports_lens_figure_names_the_lens_of_its_rows(tmp_path):
    """The report's figure across runs is titled by the lens its rows used (aggregate's `lens` column: a tuned lens'
    digest, missing for the logit lens), and a tuned row is labelled as such beside logit ones."""
    from probes.reports.figures import lens_figures

    table = pd.DataFrame({"item": [0, 0, 1, 1], "layer": [0, 1, 0, 1], "answer_rank": [3, 0, 2, 0],
                          "answer_prob": [0.1, 0.9, 0.2, 0.8]})
    table.to_csv(tmp_path / "table.csv", index=False)

    def entry(label, lens=None):
        row = {"task": "capitals", "answer_top1_layer": 1, "answer_top1_layer_reached": 2, "answer_top1_layer_of": 2,
               **({"lens": lens} if lens else {})}
        return {"runs": [{"path": str(tmp_path)}], "row": row, "label": label, "kind": "pretrained"}

    def titles(entries):
        return [fig._suptitle.get_text() for fig, _ in lens_figures(entries)]

    assert titles([entry("m")])[0].startswith("logit lens · capitals")
    assert titles([entry("m", "abc")])[0].startswith("tuned lens · capitals")
    mixed = lens_figures([entry("m"), entry("m", "abc")])[0][0]
    assert mixed._suptitle.get_text().startswith("logit and tuned lenses")
    labels = [t.get_text() for t in mixed.legends[0].texts] if mixed.legends else []
    assert any("(tuned lens)" in t for t in labels) and any("(tuned lens)" not in t for t in labels)
