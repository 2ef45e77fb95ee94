"""Gong & Zhang's N-back study on trained models: train the paper's model and a standard block for N = 1..6 and
three seeds each (configs/training/nback-{paper,standard}.yaml), then run the project's `nback` and `attention`
probes on every final checkpoint, on the 200 held-out sequences (tasks/nback-trained*.yaml), and write the table
(N x config: accuracy, d', total entropy, N-back attention mass, with intervals and seeds) to results/nback-trained/.

    .venv/bin/python scripts/reproduce_nback.py [--seeds 0 1 2] [--n 1 2 3 4 5 6] [--configs paper standard]

Every step resumes: finished runs and probe folders are skipped, so a rerun after a kill continues.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import probes  # noqa: E402
from probes.stats import mean  # noqa: E402
from probes.training.config import load_training_config  # noqa: E402
from probes.training.trainer import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--configs", nargs="+", default=["paper", "standard"])
    ap.add_argument("--out", default=str(ROOT / "results" / "nback-trained"))
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for name in args.configs:
        for n in args.n:
            for seed in args.seeds:
                cfg = load_training_config(ROOT / "configs" / "training" / f"nback-{name}.yaml", {"task.n": n}, seed)
                run = train(cfg, out / "runs" / name / f"n{n}-seed{seed}", resume=True, progress=False)
                model = probes.load(str(run), attn_implementation="eager")
                behaviour = probes.run(model, probes.task("nback-trained", n=[n]), "nback",
                                       output=out / "probes" / name / f"n{n}-seed{seed}" / "nback")
                attention = probes.run(model, probes.task("nback-trained-sequence", n=[n]), "attention",
                                       output=out / "probes" / name / f"n{n}-seed{seed}" / "attention")
                by_n = behaviour.summary["by_n"][n]
                head = attention.summary["nback_head"][n]
                rows.append({"config": name, "n": n, "seed": seed, "accuracy": by_n["accuracy"],
                             "accuracy_k": by_n["accuracy_k"], "accuracy_n": by_n["accuracy_n"],
                             "dprime": by_n["dprime"], "total_entropy": attention.summary["by_n"][n]["total_entropy"],
                             "nback_mass_match": head["nback_mass_match"],
                             "nback_mass_nonmatch": head["nback_mass_nonmatch"],
                             "other_letter_mass": head["other_letter_mass"]})
                print(rows[-1], flush=True)
    write_table(rows, out)


def write_table(rows: list[dict], out: Path) -> None:
    import pandas as pd

    from probes.stats import wilson

    df = pd.DataFrame(rows)
    df.to_csv(out / "runs.csv", index=False)
    lines = ["| config | N | seeds | accuracy (pooled, 95% Wilson) | d' (mean over seeds, 95% bootstrap) | "
             "total entropy (nats) | N-back mass, non-match | other letters |", "|" + " --- |" * 8]
    for (name, n), g in df.groupby(["config", "n"], sort=False):
        k, total = int(g.accuracy_k.sum()), int(g.accuracy_n.sum())
        lo, hi = wilson(k, total)
        d = mean(g.dprime, "d")
        e = mean(g.total_entropy, "e")
        lines.append(f"| {name} | {n} | {len(g)} | {k / total:.3f} [{lo:.3f}, {hi:.3f}] ({k}/{total}) | "
                     f"{d['d']:.2f} [{d['d_lo']:.2f}, {d['d_hi']:.2f}] | {e['e']:.1f} [{e['e_lo']:.1f}, {e['e_hi']:.1f}] | "
                     f"{g.nback_mass_nonmatch.mean():.3f} | {g.other_letter_mass.mean():.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
