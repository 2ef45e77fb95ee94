"""The Python API: the README's example runs and equals the command's table.csv; bad input raises ProbeError
with the command's one-line message; the public names are typed and documented."""

import inspect
import re
from pathlib import Path

import pandas as pd
import pytest

import probes
from probes import ProbeError

from .test_cli import probe

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_equals_the_command_row_for_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    result = scope["result"]
    assert isinstance(result, probes.Result) and result.summary and "accuracy" in result.report
    r = probe("run", "--model", "tiny-gpt2", "--task", "capitals", "--task-option", "ambiguous=flag",
              "--limit", "6", "--output", str(tmp_path / "cli"))
    assert r.returncode == 0, r.stderr
    cli = pd.read_csv(tmp_path / "cli" / "table.csv", keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(result.table.reset_index(drop=True), cli)
    assert scope["tables"]  # the aggregate of the example's kept run folder
    assert set(scope["tables"]["logit-lens"].model) == {"tiny-gpt2"}


def test_a_kept_run_folder_is_the_command_s_run_folder(tmp_path):
    model = probes.load("tiny-llama")
    task = probes.task("capitals", ambiguous="flag")
    first = probes.run(model, task, "accuracy", limit=4, output=tmp_path / "run")
    assert first.output == tmp_path / "run" and (tmp_path / "run" / "meta.json").exists()
    again = probes.run(model, task, "accuracy", limit=4, output=tmp_path / "run")  # resumes: same rows
    pd.testing.assert_frame_equal(first.table, again.table)


def test_the_model_object_exposes_nnsight_tokenizer_and_architecture():
    model = probes.load("tiny-llama")
    ids = model.tokenizer("The capital of France is").input_ids
    with model.trace("The capital of France is"):
        ffn = model.arch.ffn_update(0, like=model.arch.block_input(0)).save()  # modules in forward order
        h = model.arch.resid(model.arch.n_layers).save()
        logits = model.model.output.logits.save()
    assert h.shape[1] == len(ids) and ffn.shape == h.shape
    assert (model.arch.decode(h[0, -1]) - logits[0, -1].float()).abs().max() < 1e-4  # last-layer lens = logits


@pytest.mark.parametrize("call, message", [
    (lambda: probes.load("no-such-model"), r"^unknown model 'no-such-model'; accepted: "),
    (lambda: probes.task("no-such-task"), r"^unknown task 'no-such-task'; accepted: "),
    (lambda: probes.run("tiny-gpt2", "capitals", "x-ray"), r"^unknown probe 'x-ray'; accepted: accuracy, "),
    (lambda: probes.run("tiny-gpt2", "capitals", "accuracy", topk=3),
     r"^probe 'accuracy' takes no option 'topk'; accepted: vocab$"),
    (lambda: probes.load("tiny-gpt2", dtype="float8"), r"^unknown dtype 'float8'; accepted: float32, "),
    (lambda: probes.run(probes.load("tiny-gpt2"), probes.task("nback-sequence"), "attention"),
     r"^probe 'attention' needs the model loaded with attn_implementation='eager'"),
])
def test_bad_input_raises_the_command_s_one_line_error(call, message):
    with pytest.raises(ProbeError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_the_command_prints_the_same_message():
    r = probe("run", "--model", "tiny-gpt2", "--task", "capitals", "--probe", "accuracy", "--topk", "3")
    assert r.returncode == 2 and r.stderr == "probe: error: probe 'accuracy' takes no option 'topk'; accepted: vocab\n"


def test_every_public_name_is_typed_and_documented():
    assert sorted(probes.__all__) == probes.__all__
    for name in probes.__all__:
        obj = getattr(probes, name)
        assert inspect.getdoc(obj), name
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            assert sig.return_annotation is not inspect.Signature.empty, name
            assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()
                       if p.kind not in (p.VAR_KEYWORD,)), name
