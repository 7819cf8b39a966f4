"""One-off: PPO's selected policy (select_every=20) against its last policy, its best episode and the random
searches, at budget 0.3 or 0.5 on ResNet-18 or ResNet-56 (issue 13). From the repository root, after the runs
and benchmarks of the sections "Choosing the final policy ..." (docs/reports/agents.md):

    python docs/agents/ppo-r18-select-2026-12-07/summarize.py [BUDGET] [MODEL]   # 0.3 (default) or 0.5; r18 or r56

Reads results/sel-<MODEL>-bench-b<BUDGET>-s<S>/results.csv (this machine) and the earlier rows of
docs/agents/ppo-<MODEL>-avx512-2026-12-01/anchored-b<BUDGET>/results.csv (the earlier machine, bf16 evaluator;
where anchored actions were never run there, as at 0.7 on ResNet-56, b<BUDGET>/results.csv, whose absolute-action
PPO rows become ppo_abs and ppo_abs_best),
and the matched searches rerun on this machine with more seeds, results/i13-<MODEL>-rsa-b<BUDGET>-s<S>/results.csv
(section "More seeds of the matched search at budget 0.5"); writes summary.md, results.csv, selection.png and each
run's logs next to this file (ResNet-18 at 0.3), into b<BUDGET>/ (ResNet-18) or into r56-b<BUDGET>/."""
import csv
import glob
import shutil
import sys
from pathlib import Path

import matplotlib
import numpy as np
from scipy import stats as st

from baselines.experiments.stats import compare, estimate

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

budget = sys.argv[1] if len(sys.argv) > 1 else "0.3"
model = sys.argv[2] if len(sys.argv) > 2 else "r18"
if model not in ("r18", "r56"):
    raise ValueError(f"MODEL must be r18 or r56, got {model!r}")
net = {"r18": "ResNet-18", "r56": "ResNet-56"}[model]
subdir = {"r18": "" if budget == "0.3" else f"b{budget}", "r56": f"r56-b{budget}"}[model]
here = Path(__file__).parent / subdir
here.mkdir(exist_ok=True)
earlier = Path(f"docs/agents/ppo-{model}-avx512-2026-12-01/anchored-b{budget}/results.csv")
renamed = {}  # the earlier PPO rows of absolute actions, where no anchored run was made
if not earlier.exists():
    earlier = earlier.parent.parent / f"b{budget}" / "results.csv"
    renamed = {"ppo": "ppo_abs", "ppo_best": "ppo_abs_best"}
rows = [r for f in sorted(glob.glob(f"results/sel-{model}-bench-b{budget}-s*/results.csv"))
        for r in csv.DictReader(open(f)) if r["status"] == "ok"]
rows += [dict(r, method=renamed.get(r["method"], r["method"]) + " (earlier)") for r in csv.DictReader(open(earlier))
         if r["method"] in ("random_search", "random_search_anchored", "ppo_anch", "ppo_anch_best", "unpruned",
                            "uniform_internal", "polarization", *renamed)]
rows += [dict(r, method=r["method"] + " (here)")
         for f in sorted(glob.glob(f"results/i13-{model}-rsa-b{budget}-s*/results.csv"))
         for r in csv.DictReader(open(f)) if r["status"] == "ok" and r["method"] != "unpruned"]
with open(here / "results.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
by: dict[str, list] = {}
for r in rows:
    if r["method"] == "unpruned" and "unpruned" in by:
        continue
    by.setdefault(r["method"], []).append((int(r["seed"]), float(r["reward_acc_before_ft"]),
                                           float(r["test_acc_before_ft"]), r["evaluations"]))
est = {m: estimate([t for _, _, t, _ in v]) for m, v in by.items()}


def welch(a, b):
    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return f"{100 * (np.mean(a) - np.mean(b)):+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]"


order = ["ppo_selected", "ppo_best", "ppo", "ppo_anch_best (earlier)", "ppo_anch (earlier)",
         "ppo_abs_best (earlier)", "ppo_abs (earlier)", "random_search (earlier)", "random_search_anchored (earlier)",
         "random_search_anchored (here)", "uniform_internal (earlier)", "polarization (earlier)", "unpruned",
         "unpruned (earlier)"]
tests = {m: [t for _, _, t, _ in by[m]] for m in by}
searches = ("random_search (earlier)", "random_search_anchored (earlier)", "random_search_anchored (here)")
rs = tests["random_search (earlier)"]
rsa = tests.get("random_search_anchored (earlier)", tests.get("random_search_anchored (here)"))
lines = ["| method | seeds | evaluations | reward split, per seed | test, per seed | **test, mean [95% t]** | "
         "vs random_search (intervals) | minus random_search [Welch 95%] | minus random_search_anchored "
         "[Welch 95%] |", "|---" * 9 + "|"]
for m in [m for m in order if m in by]:
    v, e = by[m], est[m]
    many = len(v) > 1 and m not in searches
    lines.append(f"| `{m}` | {', '.join(str(s) for s, *_ in v)} | {v[0][3]} | "
                 f"{', '.join(f'{r:.4f}' for _, r, _, _ in v)} | {', '.join(f'{t:.4f}' for _, _, t, _ in v)} | "
                 f"{e.mean:.4f}" + (f" [{e.low:.4f}, {e.high:.4f}]" if len(v) > 1 else "") + " | "
                 + (compare(e, est['random_search (earlier)']) if m != "random_search (earlier)" else "") + " | "
                 + (welch(tests[m], rs) if many else "") + " | "
                 + (welch(tests[m], rsa) if many and len(rsa) > 1 else "") + " |")
matched = {k: tests[f"random_search_anchored ({k})"] for k in ("earlier", "here")
           if f"random_search_anchored ({k})" in tests}
if "here" in matched:  # the matched search over every seed, both machines, against PPO's rows
    if "earlier" in matched:
        matched["all"] = matched["earlier"] + matched["here"]
    lines += ["", "| `random_search_anchored` seeds | n | test, per seed | **test, mean [95% t]** | "
              + " | ".join(f"`{m}` minus it [Welch 95%]" for m in ("ppo_selected", "ppo_best", "ppo")) + " |",
              "|---" * 7 + "|"]
    for k, v in matched.items():
        if len(v) < 2:  # one seed: no interval
            lines.append(f"| {k} | 1 | {v[0]:.4f} | {v[0]:.4f} | | | |")
            continue
        e = estimate(v)
        diffs = " | ".join(welch(tests[m], v) for m in ("ppo_selected", "ppo_best", "ppo"))
        lines.append(f"| {k} | {len(v)} | {', '.join(f'{t:.4f}' for t in v)} | {e.mean:.4f} [{e.low:.4f}, "
                     f"{e.high:.4f}] | {diffs} |")
sel = {}
for run in sorted(glob.glob(f"results/sel-{model}-b{budget}-s[0-9]")):
    if not (Path(run) / "selected.json").exists():
        continue  # still training
    seed = run.rsplit("-s", 1)[1]
    dest = here / f"ppo_sel-b{budget}-s{seed}"
    dest.mkdir(exist_ok=True)
    for name in ("episodes.csv", "selection.csv", "selected.json", "best.json", "config.yaml"):
        shutil.copy(Path(run) / name, dest / name)
    sel[seed] = (list(csv.DictReader(open(Path(run) / "episodes.csv"))),
                 list(csv.DictReader(open(Path(run) / "selection.csv"))))
lines += ["", "| run | selected check (episode) | its reward | last check's reward | checks' rewards |",
          "|---|---|---|---|---|"]
fig, ax = plt.subplots(figsize=(8, 4.5))
for seed, (eps, checks) in sel.items():
    r = np.array([float(e["reward"]) for e in eps])
    k = 20
    ax.plot(np.arange(k, len(r) + 1), np.convolve(r, np.ones(k) / k, "valid"), alpha=0.6,
            label=f"seed {seed}: episodes, mean of 20")
    cr = [float(c["reward"]) for c in checks]
    ax.plot([int(c["episodes"]) for c in checks], cr, "o-", ms=4, label=f"seed {seed}: deterministic checks")
    i = int(np.argmax(cr))
    lines.append(f"| ppo_sel-b{budget}-s{seed} | {i + 1} ({checks[i]['episodes']}) | {cr[i]:.4f} | {cr[-1]:.4f} | "
                 + ", ".join(f"{c:.4f}" for c in cr) + " |")
ax.set_xlabel("training episode")
ax.set_ylabel("reward-split accuracy")
ax.set_title(f"PPO (anchored), {net}, budget {budget}: episodes and deterministic-policy checks")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(here / "selection.png", dpi=110)
(here / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
