"""One-off: ResNet-56 PPO vs random search (issue 13). From the repository root: python docs/agents/ppo-r56-avx512-2026-12-01/summarize.py OUT BUDGET
(reads results/i13-r56-*; writes OUT/summary.md, results.csv, reward_curves.png and the episode logs)."""
import csv, glob, shutil, sys
from pathlib import Path
import numpy as np
from baselines.experiments.stats import estimate, compare
from baselines.experiments.benchmark import plot_reward_curves

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
B = sys.argv[2]
rows = []
for f in sorted(glob.glob(f"results/i13-r56-bench-b{B}-s*/results.csv")) + sorted(glob.glob("results/i13-r56-rs*/results.csv")) + ["results/i13-r56-others/results.csv"]:
    if Path(f).exists():
        for r in csv.DictReader(open(f)):
            if r["method"] == "unpruned" and any(x["method"] == "unpruned" for x in rows):
                continue
            if r["method"] != "unpruned" and float(r["budget"]) != float(B):
                continue
            rows.append(r)
with open(out / "results.csv", "w", newline="") as fh:
    keys = list(rows[0].keys())
    w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore"); w.writeheader(); w.writerows(rows)
by = {}
seen = set()
for r in rows:
    if r["method"] not in ("ppo", "ppo_best", "random_search"):  # deterministic given the checkpoint: once
        if r["method"] in seen:
            continue
        seen.add(r["method"])
    by.setdefault(r["method"], []).append((int(r["seed"]), float(r["reward_acc_before_ft"]), float(r["test_acc_before_ft"])))
est = {m: estimate([t for _, _, t in v]) for m, v in by.items()}
from scipy import stats as st
def welch(a, b):
    """Mean difference a - b and its 95% Welch interval (unpaired: separate random streams)."""
    r = st.ttest_ind(a, b, equal_var=False)
    ci = r.confidence_interval(0.95)
    return f"{100 * (np.mean(a) - np.mean(b)):+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]"
lines = ["| method | seeds | reward split (selection), per seed | test, per seed | **test, mean [95% t interval]** | vs random search (intervals) | minus random search, points [Welch 95%] |", "|---|---|---|---|---|---|---|"]
for m in ["ppo_best", "ppo", "random_search", "uniform", "l1", "l1_merge", "pfp", "scop", "polarization", "grda", "unpruned"]:
    if m not in by: continue
    v = sorted(by[m]); e = est[m]
    rs = est["random_search"]
    if m in ("random_search", "unpruned"):
        vs = ""
    elif e.n == 1:  # deterministic: against random search's interval
        vs = "below" if e.mean < rs.low else ("above" if e.mean > rs.high else "tie")
    else:
        vs = {"<": "below", ">": "above"}.get(compare(e, rs), compare(e, rs))
    lines.append(f"| `{m}` | {', '.join(str(s) for s, _, _ in v)} | {', '.join(f'{r:.4f}' for _, r, _ in v)} | "
                 f"{', '.join(f'{t:.4f}' for _, _, t in v)} | {e.text()} | {vs} | "
                 + (welch([t for _, _, t in v], [t for _, _, t in by["random_search"]]) if m in ("ppo", "ppo_best") else "") + " |")
# learning: mean reward first 50 vs last 50 episodes, and where the best was found
curves = out / "agents"; curves.mkdir(exist_ok=True)
for d in sorted(glob.glob(f"results/i13-r56-ppo-b{B}-s*/")):
    s = d.rstrip("/").split("-s")[-1]
    (curves / f"ppo-b{B}-s{s}").mkdir(exist_ok=True)
    shutil.copy(Path(d) / "episodes.csv", curves / f"ppo-b{B}-s{s}" / "episodes.csv")
    shutil.copy(Path(d) / "best.json", curves / f"ppo-b{B}-s{s}" / "best.json")
for d in sorted(glob.glob(f"results/i13-r56-rs*/agents/random_search-b{B}-s*/")):
    name = Path(d).name
    (curves / name).mkdir(exist_ok=True)
    shutil.copy(Path(d) / "episodes.csv", curves / name / "episodes.csv")
lines += ["", "| run | mean reward, first 50 episodes | last 50 | best reward (episode) | scored in full |", "|---|---|---|---|---|"]
for d in sorted(curves.iterdir()):
    r = list(csv.DictReader(open(d / "episodes.csv")))
    rw = np.array([float(x["reward"]) for x in r])
    full = sum(int(x["images_scored"]) == 2000 for x in r) if "images_scored" in r[0] else "-"
    lines.append(f"| {d.name} | {rw[:50].mean():.3f} | {rw[-50:].mean():.3f} | {rw.max():.4f} ({int(rw.argmax()) + 1}) | {full} |")
plot_reward_curves(curves, out / "reward_curves.png")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
