"""`make demo`: from nothing to the benchmark table and plots for ChannelPrune-ResNet18-v0 at 50% FLOPs.

Stages (each timed; the times are written to ``<out>/stages.json`` and printed):

1. data + pretrained ResNet-18 on Fashion-MNIST (the checkpoint shipped in ``envs/checkpoints``, installed into the
   cache; trained only when it does not match);
2. the environment: dependency graph, static and runtime importance predictors (trained once, cached);
3. the benchmark (``baselines.experiments.benchmark``, one budget, one seed): every baseline, both random searches
   (``random_search`` and ``random_search_anchored``, the control of the anchored PPO preset) at as many
   evaluations as the agent's episodes, and one agent (PPO: its final policy and its best episode) at 50%
   FLOPs; the common fine-tune; test-split accuracies before and after it, the reward split as the selection
   column; exported-model latency; table in ``<out>/results.md``, plots ``pareto.png`` and ``keep_ratios.png``.

Environment variables: ``DEMO_OUT`` (default ``results/demo``), ``DEMO_DEVICE`` (``auto``: CUDA when available,
else CPU; ``cpu``; ``cuda``; ``cuda:N``), ``DEMO_BASELINES`` (space-separated, default all),
``DEMO_AGENTS`` (default ``ppo``), and the run's size, whose defaults depend on the device (``PROFILES``):

=========================  ===========  ============================================================
variable                   GPU / CPU    what
=========================  ===========  ============================================================
``DEMO_EPISODES``          30 / 12      agent episodes, and random search's evaluations
``DEMO_FINETUNE_STEPS``    60 / 10      steps of the common fine-tune
``DEMO_TEST_SIZE``         all / 1000   test images per evaluation (the table says how many)
``DEMO_SCREEN_SIZE``       none / 500   the agent's and random search's plans are raced: scored on the
                                        first 500 reward images, in full only when they can still win
                                        (``envs.screening``; the table's rows are scored in full)
``DEMO_LATENCY_ROUNDS``    3 / 1        rounds of timing each exported net against the unpruned one
                                        (``benchmark``'s ``latency_rounds``; 3 takes ~25 s more per row
                                        on a 2-core CPU)
=========================  ===========  ============================================================

On a 2-core CPU the GPU's sizes take over an hour (two 10,000-image test evaluations and a 60-step fine-tune per
row); the CPU sizes keep the demo a walk through every method and column, and ``scripts/full_run.sh`` gives the
numbers to cite. ``stages.json`` names the machine the stages ran on (``envs.machine.backend(device).machine``) and
the sizes used.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import gymnasium as gym


PROFILES = {"cuda": {"episodes": "30", "finetune_steps": "60", "test_size": "all", "screen_size": "none",
                     "latency_rounds": "3"},
            "cpu": {"episodes": "12", "finetune_steps": "10", "test_size": "1000", "screen_size": "500",
                    "latency_rounds": "1"}}


def main() -> int:
    out = Path(os.environ.get("DEMO_OUT", "results/demo"))
    agents = os.environ.get("DEMO_AGENTS", "ppo").split()
    device = os.environ.get("DEMO_DEVICE", "auto")
    from envs.machine import backend

    be = backend(device)  # also checks the device name before anything long starts
    machine = be.machine
    size = {k: os.environ.get(f"DEMO_{k.upper()}", v) for k, v in PROFILES[be.device.type].items()}
    episodes, ft_steps, test_size = int(size["episodes"]), int(size["finetune_steps"]), size["test_size"]
    env_kwargs = {} if test_size == "all" else {"test_size": int(test_size)}
    if size["screen_size"] != "none":
        env_kwargs["screen_size"] = int(size["screen_size"])
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    from envs.pretrain import get_pretrained

    _, meta = get_pretrained("resnet18", "fashion-mnist", device=device)
    stages["1_pretrained_checkpoint_s"] = time.perf_counter() - t0
    print(f"[demo] ResNet-18 on Fashion-MNIST: test accuracy {meta['test_accuracy']:.4f} "
          f"(trained in {meta['train_seconds'] / 60:.1f} min; "
          f"stage took {stages['1_pretrained_checkpoint_s']:.0f} s on {machine})", file=sys.stderr)

    t1 = time.perf_counter()
    import envs  # noqa: F401

    env = gym.make("ChannelPrune-ResNet18-v0", budget=0.5, device=device).unwrapped
    stages["2_env_and_predictors_s"] = time.perf_counter() - t1
    if env.predictors is not None:
        print(f"[demo] importance predictors: {json.dumps(env.predictors.report)}", file=sys.stderr)
    del env

    t2 = time.perf_counter()
    from baselines import available
    from baselines.experiments.benchmark import benchmark

    names = os.environ.get("DEMO_BASELINES", "").split() or available()
    rows = benchmark("ChannelPrune-ResNet18-v0", [0.5], names, agents, episodes, ft_steps, out, env_kwargs,
                     device=device, latency_rounds=int(size["latency_rounds"]))
    stages["3_benchmark_s"] = time.perf_counter() - t2
    stages["total_s"] = time.perf_counter() - t0
    (out / "stages.json").write_text(json.dumps({**stages, "test_accuracy_unpruned": meta["test_accuracy"],
                                                "agent_episodes": episodes, "finetune_steps": ft_steps,
                                                "test_images": test_size, "screen_size": size["screen_size"],
                                                "latency_rounds": int(size["latency_rounds"]),
                                                "device": device, "machine": machine}, indent=2))
    print((out / "results.md").read_text())
    print("[demo] stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stages.items()))
    print(f"[demo] wrote {out}/results.csv, results.md, pareto.png, keep_ratios.png, stages.json")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
