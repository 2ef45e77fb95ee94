"""benchmarks/gpu.py, the GPU check, dry-run on the CPU (device = cpu) so that it cannot rot: every probe runs and
equals itself, the speed ratios come out, and the JSON is written; and its training section, at small sizes
(--quick), writes its steps per second, host syncs and a paused window with its checkpoint under --training-out."""

import json
import subprocess
import sys
from pathlib import Path

from probes.methods.catalog import PROBES

from .test_cli import ENV

ROOT = Path(__file__).resolve().parent.parent


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", *args],
                       capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    gpu_check("--models", "tiny-gpt2", "--speed-model", "tiny-llama", "--reps", "1", "--no-training", "--out", str(out))
    result = json.loads(out.read_text())
    assert [row["probe"] for row in result["probes"]] == list(PROBES) and all(row["ok"] for row in result["probes"])
    assert {"logit-lens / bare, 8 prompts", "logit-lens / bare, 64 prompts", "ffn-readout / bare, 8 prompts",
            "ffn-ablation (7 variants) / bare, 8 prompts", "lens over all positions / bare, 8 prompts"} == set(
        result["speed"]) and all(v > 0 for v in result["speed"].values())
    assert "training" not in result


def test_the_training_section_runs_on_the_cpu(tmp_path):
    """Small models and batches; torch.compile left out (TORCH_COMPILE_DISABLE=1: inductor takes 10-30 s per
    compiled variant on a CPU; test_training_syncs compiles a training step for real), so the compiled variants run
    the same path through Trainer's compile option, eagerly."""
    out, kept = tmp_path / "gpu.json", tmp_path / "training"
    gpu_check("--only-training", "--quick", "--training-out", str(kept), "--out", str(out),
              env={"TORCH_COMPILE_DISABLE": "1"})
    t = json.loads(out.read_text())["training"]
    assert t["device"] == "cpu" and t["compile_disabled"] and t["steps"] == 12
    assert {"eager", "compile default", "compile reduce-overhead", "bare compiled loop"} <= set(t["tree"])
    for r in [t["tree"][k] for k in ("eager", "compile default", "compile reduce-overhead", "bare compiled loop")] + [
            t["nback"]["eager"]]:
        assert "error" not in r and r["steps_per_second"] > 0 and r["seconds"] > 0, r
    assert all(t["tree"][k]["x_floor"] > 0 for k in ("eager", "compile default", "compile reduce-overhead"))
    assert t["syncs"]["syncs_per_step"] == 0 and t["syncs"]["quiet_steps"] > 0 and t["syncs"]["bare_syncs_per_step"] == 0
    w = t["window"]
    assert w["status"] == "paused" and 0 < w["steps"] < w["total_steps"] and w["eta_seconds"] > 0, w
    run = kept / "tree-paper-window-quick"
    assert w["folder"] == str(run) and w["checkpoints"] == [f"checkpoint-{w['steps']}"]
    assert (run / w["checkpoints"][0]).is_dir() and json.loads((run / "meta.json").read_text())["status"] == "paused"
    assert f"--output {run} --resume" in w["resume"]
