"""PPO on ResNet-56 with one change to the preset (an "arm") against the preset itself, same seeds, both with
`select_every=20` (issue 13, docs/reports/agents.md): "A falling learning rate on ResNet-56" (arm `lrd`,
`final_learning_rate=1e-4`) and "Self-imitation on ResNet-56" (arms `sil`, `self_imitation=true`, and `sil1`,
`self_imitation={steps: 1}`). From the repository root, after the runs and their benchmarks:

    python docs/agents/compare_r56_arm.py lrd 0.3 docs/agents/ppo-r56-lrdecay-2026-12-07
    python docs/agents/compare_r56_arm.py sil 0.3 docs/agents/ppo-r56-sil-2026-12-07

Reads results/<ARM>-r56-bench-b<B>-s<S>/results.csv and results/<ARM>-r56-b<B>-s<S>/selection.csv (the arm) and
the same files of results/sel-r56-... (the preset, section "Choosing the final policy on ResNet-56"), and the
random searches' rows from docs/agents/ppo-r18-select-2026-12-07/r56-b<B>/results.csv; writes summary.md,
results.csv, checks.png and each arm run's logs into OUT/b<B>/."""
import csv
import glob
import json
import shutil
import sys
from pathlib import Path

import matplotlib
import numpy as np
from scipy import stats as st

from baselines.experiments.stats import estimate

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARMS = {"lrd": "falling", "sil": "self-imitation", "sil1": "self-imitation (1 step)"}  # run prefix -> name
if len(sys.argv) != 4 or sys.argv[1] not in ARMS:
    sys.exit(f"usage: compare_r56_arm.py ARM BUDGET OUT   (ARM: {', '.join(ARMS)})")
prefix, budget = sys.argv[1], sys.argv[2]
arm_name = ARMS[prefix]
here = Path(sys.argv[3]) / f"b{budget}"
here.mkdir(parents=True, exist_ok=True)
arms = {arm_name: prefix, "preset": "sel"}


def bench_rows(arm: str) -> list[dict[str, str]]:
    """The rows of one arm's benchmark replays that ran."""
    return [dict(r, arm=arm) for f in sorted(glob.glob(f"results/{arms[arm]}-r56-bench-b{budget}-s*/results.csv"))
            for r in csv.DictReader(open(f)) if r["status"] == "ok"]


def bench(rows: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    """seed -> {method: test accuracy before fine-tuning} of the PPO rows."""
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["method"].startswith("ppo"):
            out.setdefault(int(r["seed"]), {})[r["method"]] = float(r["test_acc_before_ft"])
    return out


def final_std(arm: str, seed: int) -> float:
    """The Gaussian's std at the run's end (how much the policy still explores)."""
    from stable_baselines3 import PPO

    model = PPO.load(f"results/{arms[arm]}-r56-b{budget}-s{seed}/model.zip", device="cpu")
    return float(model.policy.log_std.detach().exp().mean())


def checks(arm: str, seed: int) -> list[float]:
    rows = csv.DictReader(open(f"results/{arms[arm]}-r56-b{budget}-s{seed}/selection.csv"))
    return [float(r["reward"]) for r in rows]


rows = {arm: bench_rows(arm) for arm in arms}
res = {arm: bench(rows[arm]) for arm in arms}
seeds = sorted(set(res[arm_name]) & set(res["preset"]))
rows = rows[arm_name]
with open(here / "results.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
searches: dict[str, list[float]] = {}
for r in csv.DictReader(open(f"docs/agents/ppo-r18-select-2026-12-07/r56-b{budget}/results.csv")):
    if r["method"].startswith("random_search"):
        name = "random_search_anchored" if r["method"].startswith("random_search_anchored") else "random_search"
        searches.setdefault(name, []).append(float(r["test_acc_before_ft"]))


def ci(v) -> str:
    e = estimate(list(v))
    return f"{e.mean:.4f} [{e.low:.4f}, {e.high:.4f}]"


def paired(a, b) -> str:
    c = st.ttest_rel(a, b).confidence_interval(0.95)
    return f"{100 * (np.mean(a) - np.mean(b)):+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}]"


def welch(a, b) -> str:
    c = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return f"{100 * (np.mean(a) - np.mean(b)):+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}]"


A = arm_name
lines = [f"Seeds: {', '.join(map(str, seeds))}. Test accuracy before fine-tuning; {A} minus preset is paired by "
         "seed (t 95%); minus a search is Welch's 95%.", "",
         f"| policy | {A}, per seed | **{A}, mean [95% t]** | preset, per seed | preset, mean [95% t] "
         f"| {A} minus preset [paired 95%] | {A} minus random_search | {A} minus "
         "random_search_anchored |", "|---" * 8 + "|"]
for m, label in (("ppo_selected", "selected"), ("ppo", "last"), ("ppo_best", "best of 280")):
    a = [res[arm_name][s][m] for s in seeds]
    b = [res["preset"][s][m] for s in seeds]
    lines.append(f"| {label} (`{m}`) | {', '.join(f'{x:.4f}' for x in a)} | {ci(a)} | "
                 f"{', '.join(f'{x:.4f}' for x in b)} | {ci(b)} | {paired(a, b)} | "
                 f"{welch(a, searches['random_search'])} | {welch(a, searches['random_search_anchored'])} |")
for name, v in searches.items():
    lines.append(f"| `{name}` ({len(v)} seeds, earlier section) | | | | {ci(v)} | | | |")

# how much the deterministic policy moves between checks, over the second half of the run
lines += ["", "| run | checks' rewards | mean abs. change between checks, 2nd half | lowest check, 2nd half | "
          "last check | std at the end |", "|---" * 6 + "|"]
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
stab = {arm: [] for arm in arms}
for ax, arm in zip(axes, arms):
    for s in seeds:
        c = checks(arm, s)
        half = c[len(c) // 2:]
        stab[arm].append((np.mean(np.abs(np.diff(half))), min(half), c[-1]))
        lines.append(f"| {arms[arm]}-b{budget}-s{s} ({arm}) | {', '.join(f'{x:.3f}' for x in c)} | "
                     f"{stab[arm][-1][0]:.3f} | {min(half):.3f} | {c[-1]:.3f} | {final_std(arm, s):.3f} |")
        ax.plot(20 * np.arange(1, len(c) + 1), c, "o-", ms=3, label=f"seed {s}")
    ax.set_title(f"{arm}, ResNet-56, budget {budget}")
    ax.set_xlabel("training episode")
    ax.legend(fontsize=7)
axes[0].set_ylabel("deterministic policy, reward-split accuracy")
fig.tight_layout()
fig.savefig(here / "checks.png", dpi=110)
for i, what in enumerate(("mean abs. change between checks, 2nd half", "lowest check, 2nd half", "last check")):
    a = [x[i] for x in stab[arm_name]]
    b = [x[i] for x in stab["preset"]]
    lines.append(f"| **{what}**: {A} minus preset, points [paired 95%] | {paired(a, b)} | | | | |")
# where the episodes' plans lie: mean |keep ratio - the anchor's| per group (the anchor: uniform_internal's plan)
anchor_rows = [r for r in csv.DictReader(open(f"docs/agents/ppo-r56-avx512-2026-12-01/anchored-b{budget}/results.csv"))
               if r["method"] == "uniform_internal"]
anchor = np.array(json.loads(anchor_rows[0]["keep_ratios"]))
lines += ["", "| run | plans' distance to the anchor, episodes 1-100 | episodes 181-280 | best plan's distance | "
          "share of episodes scored in full | last 8 checks at the anchor (every group within 0.125) |",
          "|---" * 6 + "|"]
dist = {arm: [] for arm in arms}
for arm in arms:
    for s in seeds:
        rows = list(csv.DictReader(open(f"results/{arms[arm]}-r56-b{budget}-s{s}/episodes.csv")))
        plans = np.array([json.loads(r["keep_ratios"]) for r in rows])
        full = np.array([not r["images_scored"] or int(r["images_scored"]) > 500 for r in rows])
        reward = np.where(full, [float(r["reward"]) for r in rows], -np.inf)
        d = np.abs(plans - anchor).mean(axis=1)
        dist[arm].append((d[:100].mean(), d[-100:].mean(), d[np.argmax(reward)], full.mean()))
        late = [json.loads(r["keep_ratios"]) for r in
                csv.DictReader(open(f"results/{arms[arm]}-r56-b{budget}-s{s}/selection.csv"))][-8:]
        # 0.125 = 2 channels of a 16-channel group: the plateaus of "A falling learning rate on ResNet-56"
        at_anchor = sum(np.abs(np.array(k) - anchor).max() <= 0.125 + 1e-9 for k in late)
        lines.append(f"| {arms[arm]}-b{budget}-s{s} ({arm}) | " + " | ".join(f"{x:.3f}" for x in dist[arm][-1])
                     + f" | {at_anchor} of {len(late)} |")
for i, what in enumerate(("distance, episodes 1-100", "distance, episodes 181-280")):
    a = [x[i] for x in dist[arm_name]]
    b = [x[i] for x in dist["preset"]]
    lines.append(f"| **{what}**: {A} minus preset [paired 95%] | {np.mean(a) - np.mean(b):+.3f} "
                 f"[{st.ttest_rel(a, b).confidence_interval(0.95).low:+.3f}, "
                 f"{st.ttest_rel(a, b).confidence_interval(0.95).high:+.3f}] | | | | |")
for s in seeds:
    dest = here / f"{prefix}-b{budget}-s{s}"
    dest.mkdir(exist_ok=True)
    for name in ("episodes.csv", "selection.csv", "selected.json", "best.json", "config.yaml"):
        shutil.copy(Path(f"results/{prefix}-r56-b{budget}-s{s}") / name, dest / name)
(here / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
