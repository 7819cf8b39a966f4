"""One-off: PPO vs random search (issue 13). From the repository root:

    python docs/agents/ppo-r56-avx512-2026-12-01/summarize.py OUT BUDGET [VARIANT ...] [--variants-only] \
        [--model r18]

Reads results/i13-<model>-* (model r56 unless --model says otherwise): the preset's runs (bench-b<B>-s<S>), random
search (rs*; rsa*: random_search_anchored), the other baselines (others, others-b<B>), and per VARIANT (e.g. "decay", "anch") its runs
<VARIANT>-bench-b<B>-s<S>, whose rows are renamed ppo_<VARIANT> / ppo_<VARIANT>_best. When random_search_anchored
rows exist, a last column compares the learned rows with it. With --variants-only, the episode logs and curves are
those of the variants and of random_search_anchored only (the preset's are in the folders of the first tables). Writes OUT/summary.md, results.csv, reward_curves.png and the episode logs."""
import csv, glob, shutil, sys
from pathlib import Path
import numpy as np
from scipy import stats as st
from baselines.experiments.stats import estimate, compare
from baselines.experiments.benchmark import plot_reward_curves

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
only = "--variants-only" in sys.argv
args = sys.argv[3:]
model = args.pop(args.index("--model") + 1) if "--model" in args else "r56"
B, variants = sys.argv[2], [v for v in args if not v.startswith("--")]
sources = [(f, "") for f in sorted(glob.glob(f"results/i13-{model}-bench-b{B}-s*/results.csv"))]
sources += [(f, "") for f in sorted(glob.glob(f"results/i13-{model}-rs*/results.csv")) + sorted(glob.glob(f"results/i13-{model}-others*/results.csv"))]
for v in variants:
    sources += [(f, v) for f in sorted(glob.glob(f"results/i13-{model}-{v}-bench-b{B}-s*/results.csv"))]
rows = []
for f, v in sources:
    for r in csv.DictReader(open(f)):
        if r["status"] != "ok":  # e.g. a ResNet-20 run's best.json (12 groups) played on ResNet-56
            continue
        if r["method"] == "unpruned" and any(x["method"] == "unpruned" for x in rows):
            continue
        if r["method"] != "unpruned" and float(r["budget"]) != float(B):
            continue
        if v:
            if r["method"] not in ("ppo", "ppo_best"):
                continue
            r["method"] = r["method"].replace("ppo", f"ppo_{v}", 1)
        rows.append(r)
with open(out / "results.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()), extrasaction="ignore"); w.writeheader(); w.writerows(rows)
learned = ["ppo_best", "ppo"] + [m for v in variants for m in (f"ppo_{v}_best", f"ppo_{v}")]
searches = ["random_search", "random_search_anchored"]
by, seen = {}, set()
for r in rows:
    if r["method"] not in learned + searches:  # deterministic given the checkpoint: once
        if r["method"] in seen:
            continue
        seen.add(r["method"])
    by.setdefault(r["method"], []).append((int(r["seed"]), float(r["reward_acc_before_ft"]), float(r["test_acc_before_ft"])))
est = {m: estimate([t for _, _, t in v]) for m, v in by.items()}


def welch(a, b):
    """Mean difference a - b and its 95% Welch interval (unpaired: separate random streams)."""
    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return f"{100 * (np.mean(a) - np.mean(b)):+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]"


static = [m for m in ["uniform_internal", "uniform", "l1", "l1_merge", "pfp", "scop", "polarization", "grda"] if m in by]
anch = "random_search_anchored" in by
lines = ["| method | seeds | reward split (selection), per seed | test, per seed | **test, mean [95% t interval]** | vs random search (intervals) | minus random search, points [Welch 95%] |"
         + (" minus anchored random search [Welch 95%] |" if anch else ""), "|---|---|---|---|---|---|---|" + ("---|" if anch else "")]
rs_test = [t for _, _, t in by["random_search"]]
for m in learned + searches + static + ["unpruned"]:
    if m not in by: continue
    v = sorted(by[m]); e = est[m]; rs = est["random_search"]
    if m in ("random_search", "unpruned"):
        vs = ""
    elif e.n == 1:  # deterministic: against random search's interval
        vs = "below" if e.mean < rs.low else ("above" if e.mean > rs.high else "tie")
    else:
        vs = {"<": "below", ">": "above"}.get(compare(e, rs), compare(e, rs))
    lines.append(f"| `{m}` | {', '.join(str(s) for s, _, _ in v)} | {', '.join(f'{r:.4f}' for _, r, _ in v)} | "
                 f"{', '.join(f'{t:.4f}' for _, _, t in v)} | {e.text()} | {vs} | "
                 + (welch([t for _, _, t in v], rs_test) if m in learned or m == "random_search_anchored" else "") + " |"
                 + ((" " + welch([t for _, _, t in v], [t for _, _, t in by["random_search_anchored"]]) + " |"
                     if m in learned else " |") if anch else ""))
trains = {"polarization", "grda"}  # they train the network before pruning it; the searches keep its weights
for label, group in (("on the unchanged network", [m for m in static if m not in trains]),
                     ("that trains the network first (polarization, gRDA)", [m for m in static if m in trains])):
    if group:
        b = max(group, key=lambda m: est[m].mean)
        lines += ["", f"Best static baseline {label}: `{b}` {est[b].mean:.4f}; learned rows whose whole interval "
                  "lies above it: " + (", ".join(f"`{m}`" for m in learned if m in by and est[m].n > 1 and est[m].low > est[b].mean) or "none") + "."]
# learning: mean reward first 50 vs last 50 episodes, and where the best was found
curves = out / "agents"; curves.mkdir(exist_ok=True)
runs = [] if only else [(d, f"ppo-b{B}-s{d.rstrip('/').split('-s')[-1]}") for d in sorted(glob.glob(f"results/i13-{model}-ppo-b{B}-s*/"))]
for v in variants:
    runs += [(d, f"ppo_{v}-b{B}-s{d.rstrip('/').split('-s')[-1]}") for d in sorted(glob.glob(f"results/i13-{model}-{v}-b{B}-s*/"))]
for d, name in runs:
    (curves / name).mkdir(exist_ok=True)
    for f in ("episodes.csv", "best.json", "config.yaml"):
        shutil.copy(Path(d) / f, curves / name / f)
for d in sorted(glob.glob(f"results/i13-{model}-rs*/agents/random_search{'_anchored' if only else '*'}-b{B}-s*/")):
    (curves / Path(d).name).mkdir(exist_ok=True)
    shutil.copy(Path(d) / "episodes.csv", curves / Path(d).name / "episodes.csv")
lines += ["", "| run | mean reward, first 50 episodes | last 50 | best reward (episode) | scored in full |", "|---|---|---|---|---|"]
for d in sorted(curves.iterdir(), key=lambda p: (p.name.rsplit("-s", 1)[0], int(p.name.rsplit("-s", 1)[1]))):
    r = list(csv.DictReader(open(d / "episodes.csv")))
    rw = np.array([float(x["reward"]) for x in r])
    full = sum(int(x["images_scored"]) == 2000 for x in r) if "images_scored" in r[0] else "-"
    lines.append(f"| {d.name} | {rw[:50].mean():.3f} | {rw[-50:].mean():.3f} | {rw.max():.4f} ({int(rw.argmax()) + 1}) | {full} |")
plot_reward_curves(curves, out / "reward_curves.png")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
