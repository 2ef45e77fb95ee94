"""Properties of the real bundled models (GGUF packages, no hub)."""

import pandas as pd
import torch

from probes.methods.lens import run_lens
from probes.models.loading import _gguf_checkpoint
from probes.tasks.base import first_token
from probes.tasks.files import load_task

from .conftest import REGISTRY, bundled

COUNTRIES = ["Poland", "France", "Japan", "Germany", "Italy", "Egypt", "Russia", "China", "Spain", "Canada",
             "Greece", "Kenya"]


def test_gemma_capitals_lens_shows_argument_then_answer():
    lm = bundled("gemma3-270m")
    items = load_task("capitals").items(inputs=COUNTRIES)
    assert len(items) == len(COUNTRIES)
    df = pd.DataFrame(run_lens(lm, items))
    L = lm.arch.n_layers
    last = df[df.layer == L]
    assert (last.answer_rank == 0).sum() >= 10  # " Warsaw", " Paris", ...: at least 10 of 12 right
    rr = df.groupby("layer")[["answer_rr", "argument_rr"]].mean()
    assert rr.loc[: L // 2].max().max() < 0.01  # nothing about either in the first half of the network
    arg_peak = int(rr.argument_rr.idxmax())
    assert L // 2 < arg_peak < L and rr.argument_rr[arg_peak] > 0.4  # the argument forms in later layers...
    assert rr.answer_rr[L] > 0.8 and rr.answer_rr[arg_peak] < rr.answer_rr[L]  # ...then the answer takes over
    assert rr.argument_rr[L] < rr.argument_rr[arg_peak] / 2
    poland = last[last.input == "Poland"].iloc[0]
    assert poland.top1 == " Warsaw" and poland.answer_token == " Warsaw" and poland.argument_token == " Poland"


def test_bundled_tokenizers_give_the_answers_first_token_with_its_space():
    for name in ("gemma3-270m", "smollm2-135m"):
        tok = bundled(name).tokenizer
        for text in (" Warsaw", " Poland", " Paris"):
            assert tok.decode(first_token(tok, text)) == text, name


def test_gguf_cache_reloads_identical_weights():
    """The cached safetensors give exactly the logits of dequantizing the GGUF again; the second load hits."""
    from transformers import AutoModelForCausalLM

    from probes.models.loading import _gguf_file

    spec = REGISTRY["smollm2-135m"]
    lm = bundled("smollm2-135m")
    path, hit = _gguf_checkpoint(spec)
    assert hit and path.exists()
    gguf = _gguf_file(spec)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = lm.tokenizer("Q: What is the capital of Poland?\nA:", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(lm.model._module(**ids).logits, direct(**ids).logits, atol=0, rtol=0)


def test_gemma_in_float16_stops_with_one_line_naming_the_overflow(tmp_path):
    """Gemma 3 overflows float16 (its residual stream passes 65504): the run stops before writing anything, exit
    2, one line naming the dtype, the first block that computes inf or NaN, and what to use instead; it used to
    score NaN logits as 8/8 correct."""
    from .test_cli import probe

    bundled("gemma3-270m")  # the GGUF cached (or a clear failure naming the package)
    r = probe("run", "--model", "gemma3-270m", "--task", "capitals", "--probe", "accuracy", "--limit", "8",
              "--dtype", "float16", "--output", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("probe: error: self-check failed on gemma3-270m: float16 computes non-finite values")
    assert "first in block " in line and "--dtype bfloat16 or float32" in line
    assert not (tmp_path / "run" / "table.csv").exists()
