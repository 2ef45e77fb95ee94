"""benchmarks/gpu.py, the GPU check, dry-run on the CPU (device = cpu) so that it cannot rot: every probe runs and
equals itself, the speed ratios come out, and the JSON is written."""

import json
import subprocess
import sys
from pathlib import Path

from probes.methods.catalog import PROBES

from .test_cli import ENV

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--models",
                        "tiny-gpt2", "--speed-model", "tiny-llama", "--reps", "1", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [row["probe"] for row in result["probes"]] == list(PROBES) and all(row["ok"] for row in result["probes"])
    assert {"logit-lens / bare, 8 prompts", "logit-lens / bare, 64 prompts", "ffn-readout / bare, 8 prompts",
            "ffn-ablation (7 variants) / bare, 8 prompts", "lens over all positions / bare, 8 prompts"} == set(
        result["speed"]) and all(v > 0 for v in result["speed"].values())
