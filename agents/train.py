"""Train an SB3 agent on a ChannelPrune environment.

    python -m agents.train --algo ppo --env ChannelPrune-ResNet18-v0 --env-kwargs budget=0.5 --episodes 200
    python -m agents.train --algo ddpg --env ChannelPrune-ResNet20-v0 --env-kwargs width=0.5 reward_size=200 \\
        --episodes 150 --n-envs 2 --seed 1 --out runs/ddpg-r20

Hyperparameters come from ``agents/presets.yaml`` (``default`` block, overridden by the env id's block;
``--hyperparams key=value`` overrides both). The run directory gets:

* ``model.zip``: the SB3 model (saved at the end, also after Ctrl-C);
* ``config.yaml``: algo, env id and kwargs, seed, n_envs, budget and the resolved hyperparameters;
* ``best.json``: the best episode so far (keep / runtime ratios per group, accuracy, FLOPs / params /
  effective-FLOPs ratios, reward, seed, env id and kwargs, min_keep), rewritten whenever it improves; it is a
  policy itself (:class:`agents.policy.BestPolicy`);
* ``episodes.csv``: one row per episode (episode, reward, accuracy, flops_ratio, ...) for reward curves;
* ``tb/``: TensorBoard logs (SB3's training scalars and per-episode reward / accuracy / FLOPs);
* with the hyperparameter ``select_every=K``: ``selected.zip``, ``selected.json`` and ``selection.csv``, the
  deterministic policy checked every K episodes on the reward split (raced like the episodes with
  ``screen_size``; only whole-split scores are chosen by) and the best snapshot kept
  (:class:`agents.callbacks.PolicySelection`); each check is one more reward-split evaluation;
* with ``self_imitation`` (PPO, A2C): the policy also learns from the run's best episodes between updates
  (:class:`agents.self_imitation.SelfImitation`, Oh et al. 2018); no extra evaluation.

Env kwargs that cannot be written to JSON (a ``DatasetSplits``, an ``nn.Module``) are used but not recorded;
``best.json`` and ``config.yaml`` list them with their type under ``env_kwargs_skipped``.

``--n-envs K`` collects with K SubprocVecEnv workers (one torch thread each); with ``--ray [ADDRESS]`` the K envs
are Ray actors on a local Ray or on a cluster (``agents.distributed.RayVecEnv``; same seeds, same episodes).
Episodes are counted over all workers. ``--episode-reward`` switches on AMC's episode-level reward assignment (see
:mod:`agents.episode_reward`); the DDPG preset has it on.
"""

from __future__ import annotations

import argparse
import csv
import signal
import sys
import time
from pathlib import Path
from typing import Any

import stable_baselines3
import torch
import yaml
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import HumanOutputFormat, Logger

from envs.cli import parse_key_values

from .algos import ALGOS, ON_POLICY
from .callbacks import EpisodeRecorder, ExplorationDecay, PolicySelection, SharedRace
from .common import (
    BEST_FILE,
    CONFIG_FILE,
    EPISODES_FILE,
    MODEL_FILE,
    SELECTED_FILE,
    SELECTED_MODEL_FILE,
    SELECTION_FILE,
    check_algo,
    check_env_id,
    check_env_kwargs,
    check_writable_dir,
    make_selection_env,
    make_vec_env,
    split_serializable,
    write_yaml,
)
from .presets import check_keys, get_preset, load_presets, resolve
from .relative_actions import actions_of_config, check_actions
from .self_imitation import SelfImitation

DEFAULT_EPISODES = 100


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def default_run_dir(algo: str, env_id: str, seed: int) -> Path:
    return Path("runs") / env_id / f"{algo}_s{seed}_{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    algo: str,
    env_id: str,
    env_kwargs: dict[str, Any] | None = None,
    episodes: int | None = None,
    timesteps: int | None = None,
    n_envs: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    episode_reward: bool | None = None,
    presets: str | Path | dict | None = None,
    tensorboard: bool = True,
    verbose: int = 0,
    init_from: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Train ``algo`` on ``env_id`` and return the run directory.

    Args:
        algo: one of ppo, sac, td3, ddpg, a2c.
        env_id: a registered ChannelPrune id; ``env_kwargs`` go to ``ChannelPruneEnv`` (checked first).
        episodes / timesteps: the budget (one of them; default ``DEFAULT_EPISODES`` episodes). Episodes are
            counted over all envs; training stops right after the episode that reaches the count.
        n_envs: parallel envs (SubprocVecEnv when > 1; Ray actors with ``ray_address``).
        ray_address: run the envs as Ray actors: "local" starts Ray here, else a cluster's address
            ("auto", "HOST:PORT"); the same seeds give the same episodes as without.
        seed: seeds SB3 (networks, exploration, env resets).
        out: run directory (created; must be writable; a previous run's best.json and model.zip there are
            removed first). Default ``runs/<env id>/<algo>_s<seed>_<time>``.
        progress: tqdm progress bar.
        episode_reward: AMC's episode-level reward assignment (None: the preset's choice).
        presets: a preset file or dict instead of the packaged ``agents/presets.yaml``.
        tensorboard: write TensorBoard logs under ``<out>/tb``.
        init_from: a run directory of the same algo (any ChannelPrune env: the observation has the same length
            for every model) whose ``model.zip`` policy weights start this run, e.g. a ResNet-20 agent for a
            ResNet-56 search. The optimizer starts afresh.
        **overrides: hyperparameters overriding the preset (SB3 arguments or preset keys such as
            ``warmup_episodes``).
    """
    check_algo(algo)
    env_id = check_env_id(env_id)
    env_kwargs = check_env_kwargs(env_kwargs)
    if episodes is not None and timesteps is not None:
        raise ValueError(f"give episodes={episodes!r} or timesteps={timesteps!r}, not both")
    if episodes is None and timesteps is None:
        episodes = DEFAULT_EPISODES
    if episodes is not None:
        episodes = _positive_int(episodes, "episodes")
    if timesteps is not None:
        timesteps = _positive_int(timesteps, "timesteps")
    n_envs = _positive_int(n_envs, "n_envs")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    table = presets if isinstance(presets, dict) else load_presets(presets)
    hp = get_preset(algo, env_id, table)
    check_keys(algo, hp, f"preset for {env_id}/{algo}")
    check_keys(algo, overrides, "overrides")
    hp.update(overrides)
    if episode_reward is not None:
        hp["episode_reward"] = bool(episode_reward)
    actions = check_actions(hp.get("actions", "absolute"))
    source = _check_init_from(init_from, algo, actions) if init_from is not None else None
    run_dir = check_writable_dir(out if out is not None else default_run_dir(algo, env_id, seed))
    for stale in (BEST_FILE, MODEL_FILE, SELECTED_FILE, SELECTED_MODEL_FILE, SELECTION_FILE):
        (run_dir / stale).unlink(missing_ok=True)

    er = bool(hp.get("episode_reward", False))
    alpha = float(hp.get("baseline_alpha", 0.5))
    vec_env = make_vec_env(env_id, env_kwargs, n_envs, baseline_alpha=alpha if er and algo in ON_POLICY else None,
                           ray_address=ray_address, actions=actions)
    selection_env = selector = None
    try:
        attrs = {k: vec_env.get_attr(k, indices=0)[0]
                 for k in ("n_groups", "min_keep", "mode", "budget", "target", "round_to", "storage_budget")}
        groups = vec_env.get_attr("groups", indices=0)[0]
        n_groups = int(attrs["n_groups"])
        res = resolve(algo, hp, episode_len=n_groups, n_envs=n_envs, action_dim=int(vec_env.action_space.shape[0]))
        kw_ok, kw_skipped = split_serializable(env_kwargs)
        meta = {"env_id": env_id, "env_kwargs": kw_ok, "env_kwargs_skipped": kw_skipped, "algo": algo,
                "seed": seed, **attrs, "group_names": [g.name for g in groups]}
        config = {"algo": algo, "env_id": env_id, "env_kwargs": kw_ok, "env_kwargs_skipped": kw_skipped,
                  "seed": seed, "n_envs": n_envs, "episodes": episodes, "timesteps": timesteps,
                  "episode_len": n_groups, "hyperparams": res.record,
                  "init_from": str(init_from) if init_from is not None else None,
                  "versions": {"stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__},
                  "status": "running"}
        write_yaml(run_dir / CONFIG_FILE, config)

        model = ALGOS[algo](env=vec_env, seed=seed, verbose=verbose,
                            tensorboard_log=str(run_dir / "tb") if tensorboard else None, **res.kwargs)
        if source is not None:
            _load_policy(model, algo, source, init_from)
        if not tensorboard:  # SB3's default logger would create an empty /tmp/SB3-<time> folder per run
            model.set_logger(Logger(None, [HumanOutputFormat(sys.stdout)] if verbose else []))
        total = episodes * n_groups if episodes is not None else timesteps
        recorder = EpisodeRecorder(run_dir, meta, max_episodes=episodes, total_timesteps=total, progress=progress,
                                   tensorboard=tensorboard)
        t0 = time.perf_counter()
        status = "finished"
        try:
            callbacks = [recorder] + ([SharedRace()] if n_envs > 1 else [])
            if res.final_std is not None:
                callbacks.append(ExplorationDecay(res.final_std, total))
            if res.self_imitation is not None:
                callbacks.append(SelfImitation(**res.self_imitation, seed=seed))
            if res.select_every is not None:
                selection_env = make_selection_env(vec_env, env_id, env_kwargs, actions)
                selector = PolicySelection(selection_env, run_dir, meta, res.select_every, n_groups, n_envs)
                callbacks.append(selector)
            model.learn(total_timesteps=total, callback=CallbackList(callbacks), tb_log_name=algo,
                        progress_bar=False)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            status = "interrupted" if interrupted else f"failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            recorder.close()
            model.save(run_dir / MODEL_FILE)
            config.update(status=status, episodes_done=recorder.episodes, timesteps_done=int(model.num_timesteps),
                          selection_checks=selector.checks if selector is not None else 0,
                          train_seconds=round(time.perf_counter() - t0, 2))
            write_yaml(run_dir / CONFIG_FILE, config)
    finally:
        vec_env.close()
        if selection_env is not None:
            selection_env.close()
    return run_dir


def _check_init_from(init_from: str | Path, algo: str, actions: str) -> Path:
    """The ``model.zip`` of run directory ``init_from``, checked to be one of ``algo`` acting as ``actions``
    (a policy trained on relative actions means something else with absolute ones)."""
    run = Path(init_from)
    cfg_path, model_path = run / CONFIG_FILE, run / MODEL_FILE
    if not (cfg_path.is_file() and model_path.is_file()):
        raise ValueError(f"init_from={str(init_from)!r} must be a run directory of agents.train with "
                         f"{CONFIG_FILE} and {MODEL_FILE}")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    if cfg.get("algo") != algo:
        raise ValueError(f"init_from={str(init_from)!r} is a {cfg.get('algo')!r} run; this run's algo is {algo!r}")
    if actions_of_config(cfg) != actions:
        raise ValueError(f"init_from={str(init_from)!r} was trained with actions={actions_of_config(cfg)!r}; "
                         f"this run's actions are {actions!r}")
    return model_path


def _load_policy(model, algo: str, source: Path, init_from: str | Path) -> None:
    """Copy the source run's policy weights into ``model`` (same spaces and network shapes required)."""
    trained = ALGOS[algo].load(source, device=model.device)
    if trained.observation_space.shape != model.observation_space.shape or \
            trained.action_space.shape != model.action_space.shape:
        raise ValueError(f"init_from={str(init_from)!r} acts on observations {trained.observation_space.shape} "
                         f"and actions {trained.action_space.shape}; this env has "
                         f"{model.observation_space.shape} and {model.action_space.shape}")
    try:
        model.policy.load_state_dict(trained.policy.state_dict())
    except RuntimeError as exc:  # another net_arch or policy class
        raise ValueError(f"init_from={str(init_from)!r} has a policy of another shape: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agents.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", required=True, help=f"one of: {', '.join(ALGOS)}")
    p.add_argument("--env", required=True, help="a ChannelPrune env id, e.g. ChannelPrune-ResNet18-v0")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ChannelPruneEnv arguments, values parsed as YAML (budget=0.5 width=0.5 reward_size=200)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--episodes", type=int, help=f"episodes over all envs (default {DEFAULT_EPISODES})")
    budget.add_argument("--timesteps", type=int, help="environment steps over all envs")
    p.add_argument("--n-envs", type=int, default=1, help="parallel envs (SubprocVecEnv, one torch thread each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the --n-envs envs as Ray actors: on a local Ray, or on the cluster at ADDRESS")
    p.add_argument("--out", help="run directory (default runs/<env>/<algo>_s<seed>_<time>)")
    p.add_argument("--episode-reward", action=argparse.BooleanOptionalAction, default=None,
                   help="AMC's episode-level reward assignment (default: the preset's; on for ddpg)")
    p.add_argument("--hyperparams", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override preset hyperparameters, values parsed as YAML (learning_rate=1e-3)")
    p.add_argument("--init-from", metavar="RUN_DIR",
                   help="start from the policy weights of this run (same algo; e.g. trained on ResNet-20)")
    p.add_argument("--presets", help="a preset file instead of the packaged agents/presets.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs")
    p.add_argument("--verbose", type=int, default=0, help="SB3 verbosity (0, 1, 2)")
    return p


def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM (a job scheduler, `kill`) stops like Ctrl-C: the model and best.json so far are kept
    signal.signal(signal.SIGTERM, _interrupt)
    out = args.out or default_run_dir(args.algo, args.env, args.seed)
    try:
        env_kwargs = parse_key_values(args.env_kwargs, "--env-kwargs")
        overrides = parse_key_values(args.hyperparams, "--hyperparams")
        run_dir = train(args.algo, args.env, env_kwargs, episodes=args.episodes, timesteps=args.timesteps,
                        n_envs=args.n_envs, seed=args.seed, out=out, ray_address=args.ray,
                        progress=not args.no_progress,
                        episode_reward=args.episode_reward, presets=args.presets,
                        tensorboard=not args.no_tensorboard, verbose=args.verbose, init_from=args.init_from,
                        **overrides)
    except ValueError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the model and best.json so far are saved in {out}", file=sys.stderr)
        return 130
    import json

    best = json.loads((run_dir / BEST_FILE).read_text()) if (run_dir / BEST_FILE).exists() else None
    print(f"run directory: {run_dir}")
    rate = episode_rate(run_dir / EPISODES_FILE)
    if rate is not None:
        episodes, seconds = rate
        per_minute = 60 * episodes / max(seconds, 1e-9)
        print(f"{episodes} episodes in {seconds:.0f} s: {per_minute:.1f} episodes per minute")
    if best:
        print(f"best episode {best['episode']}: reward {best['reward']:.4f}  accuracy {best['accuracy']:.4f}  "
              f"flops_ratio {best['flops_ratio']:.4f}  params_ratio {best['params_ratio']:.4f}")
    return 0


def episode_rate(episodes_csv: Path) -> tuple[int, float] | None:
    """(episodes, seconds since training started) from a run's ``episodes.csv``; None without episodes."""
    if not episodes_csv.exists():
        return None
    with open(episodes_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return (len(rows), float(rows[-1]["seconds"])) if rows else None


if __name__ == "__main__":
    sys.exit(main())
