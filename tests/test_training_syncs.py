"""A training step with no host work: the counter of host synchronisations (training/syncs.py) counts what it
should, a training run reads nothing from its tensors between logging steps (the loss is read at logging steps,
not checked for NaN at every step; no attention mask to inspect; AdamW fused, with no per-parameter reads of its
step count), and the compiled step equals the eager one within float32 rounding."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from probes.training import trainer as trainer_module
from probes.training.config import load_training_config, steps_per_epoch
from probes.training.syncs import HostSyncs

from .test_training import PAPER, ROOT

TREE = ROOT / "configs" / "training" / "tree-cpu.yaml"


def test_the_counter_counts_host_reads():
    x = torch.ones(3)
    with HostSyncs() as s:
        y = (x * 2).sum()
        assert s.count == 0
        y.item(), float(y), bool(y > 0)
        _ = int(x.argmax())
    assert s.count == 4


def intervals(cfg: dict, tmp_path) -> list[tuple[int, int]]:
    """(global step after the interval, host syncs from one step's start to the next's) over a run of `cfg`."""
    seen = []

    class Count(TrainerCallback):
        mode = None

        def on_step_begin(self, args, state, control, **kw):
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                seen.append((state.global_step, self.mode.count))
            self.mode = HostSyncs()
            self.mode.__enter__()

        def on_train_end(self, args, state, control, **kw):
            if self.mode is not None:
                self.mode.__exit__(None, None, None)

    trainer_module.train(cfg, tmp_path / "run", progress=False, callbacks=[Count()])
    return seen


@pytest.mark.parametrize("config, changes", [
    (TREE, {"task.train": 256, "task.test": 32, "train.steps": 12, "train.eval_steps": 4, "train.save_steps": 12}),
    (PAPER, {"model.n_embd": 32, "task.train": 64, "task.test": 16, "train.steps": 12, "train.batch_size": 8,
             "train.eval_steps": 4, "train.save_steps": 12})])
def test_no_host_sync_between_logging_steps(tmp_path, config, changes):
    cfg = load_training_config(config, changes)
    per_epoch = steps_per_epoch(cfg)
    seen = intervals(cfg, tmp_path)
    assert len(seen) == 11
    logging = {s for s, _ in seen if s % 4 == 0 or s % per_epoch == 0}  # logs, evaluations; epoch-start metrics
    quiet = [(s, n) for s, n in seen if s not in logging]
    assert quiet and all(n == 0 for _, n in quiet), quiet
    assert any(n > 0 for s, n in seen if s in logging)  # the counter sees the reads where they are


def test_a_compiled_step_equals_the_eager_one(tmp_path):
    """50 steps of a small N-back model, eager and with torch.compile (inductor, on this CPU): the same weights
    within float32 rounding (transformers' init: the paper's leaves the qkv bias's key part, which the softmax
    ignores, to rounding noise that Adam normalises)."""
    base = {"model.n_embd": 32, "model.init": "hf", "task.train": 64, "task.test": 16, "train.steps": 50,
            "train.batch_size": 8, "train.save_steps": 50, "train.eval_steps": 50, "train.lr": 1e-3}
    runs = [trainer_module.train(load_training_config(PAPER, {**base, **extra}), tmp_path / name, progress=False)
            for name, extra in (("eager", {}), ("compiled", {"train.compile": "default"}))]
    a, b = (load_file(r / "model.safetensors") for r in runs)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_training_mask_is_causal_in_every_attention(attention):
    """The 4D mask the trainer passes (read by nothing on the host) gives the logits of no mask at all, in eager
    attention (which adds it to the scores) and in SDPA: a later token never moves an earlier position."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from probes.training.trainer import causal_mask

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                       attn_implementation=attention)).eval()
    x = torch.randint(0, 50, (3, 10))
    mask = causal_mask(10, torch.float32, x.device).expand(3, 1, 10, 10)
    torch.testing.assert_close(model(x, attention_mask=mask).logits, model(x).logits, rtol=0, atol=1e-5)
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50
    torch.testing.assert_close(model(changed, attention_mask=mask).logits[:, :-1],
                               model(x, attention_mask=mask).logits[:, :-1], rtol=0, atol=1e-6)


def test_a_diverged_run_stops_at_its_logging_step_and_says_so(tmp_path):
    """No per-step NaN check: the loss read at a logging step is checked there; the run stops in one line and its
    meta.json says failed, with the reason (not "running" forever)."""
    import json

    from probes.errors import ProbeError

    cfg = load_training_config(PAPER, {"model.n_embd": 32, "task.train": 64, "task.test": 16, "train.steps": 8,
                                       "train.batch_size": 8, "train.eval_steps": 4, "train.save_steps": 8,
                                       "train.lr": 1e12})
    with pytest.raises(ProbeError, match=r"^training loss (nan|inf) at step 4 of nback-paper: the run diverged"):
        trainer_module.train(cfg, tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "failed" and "diverged" in meta["error"] and meta["optimizer"].startswith("adamw")
