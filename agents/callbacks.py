"""Training callbacks: per-episode log (CSV + TensorBoard), the best episode as ``best.json``, progress, stopping;
a falling cap on an on-policy Gaussian's exploration (:class:`ExplorationDecay`); one race of the reward
split for several training envs (:class:`SharedRace`); and the choice of the policy a
run ends with, on the reward split (:class:`PolicySelection`).

The env reports an episode's result in the ``info`` of its last step (accuracy, FLOPs / params / effective-FLOPs
ratios, keep ratios, ...). SB3 exposes the step's ``infos`` and ``dones`` to callbacks through ``self.locals``;
:class:`EpisodeRecorder` reads every finished episode from there, appends it to ``episodes.csv``, and rewrites
``best.json`` (atomically) as soon as an episode beats the best reward so far, so an interrupted run keeps it.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import SubprocVecEnv, VecEnv
from tqdm.auto import tqdm

from .common import BEST_FILE, EPISODES_FILE, SELECTED_FILE, SELECTED_MODEL_FILE, SELECTION_FILE, write_json_atomic

CSV_FIELDS = ("episode", "timesteps", "env", "reward", "accuracy", "flops_ratio", "params_ratio",
              "effective_flops_ratio", "clamp_total", "images_scored", "eval_seconds", "seconds",
              "keep_ratios")
PENDING_MODEL_FILE = "check.zip"  # the snapshot of the check being scored (becomes selected.zip if it wins)
SELECTION_FIELDS = ("check", "episodes", "reward", "accuracy", "flops_ratio", "params_ratio", "images_scored",
                    "keep_ratios")
BEST_KEYS = ("accuracy", "loss", "flops_ratio", "params_ratio", "effective_flops_ratio", "latency_ratio",
             "budget_excess", "keep_ratios", "runtime_ratios", "kept_counts", "requested_ratios", "clamp_total")


def episode_return(info: dict[str, Any], step_reward: float) -> float:
    """The return of the episode that ended with this step's ``info``: exact when the env is wrapped in
    :class:`agents.common.EpisodeReturnInfo`, else Monitor's (rounded), else the vec env's float32 step reward
    (every reward arrives at the last step)."""
    if "episode_return" in info:
        return float(info["episode_return"])
    return float(info["episode"]["r"]) if "episode" in info else float(step_reward)


class EpisodeRecorder(BaseCallback):
    """Record finished episodes; keep the best one in ``best.json``; stop after ``max_episodes``.

    Args:
        run_dir: where ``episodes.csv``, ``best.json`` and ``tb/episodes`` go.
        meta: fields copied into ``best.json`` (env id and kwargs, algo, seed, min_keep, mode, ...).
        max_episodes: stop training once this many episodes have finished (None: the timestep budget decides).
        total_timesteps: the timestep budget (for the progress bar when ``max_episodes`` is None).
        progress: show a tqdm bar (episodes, or timesteps).
        tensorboard: also write per-episode scalars (reward, accuracy, flops_ratio) under ``tb/episodes``.
    """

    def __init__(self, run_dir: Path, meta: dict[str, Any], max_episodes: int | None = None,
                 total_timesteps: int | None = None, progress: bool = True, tensorboard: bool = True):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.meta = dict(meta)
        self.max_episodes, self.total_timesteps = max_episodes, total_timesteps
        self.progress, self.tensorboard = progress, tensorboard
        self.episodes = 0
        self.best: dict[str, Any] | None = None
        self._csv = self._writer = self._tb = self._bar = None
        self._t0 = time.perf_counter()

    # -- lifecycle
    def _on_training_start(self) -> None:
        self._t0 = time.perf_counter()
        self._csv = open(self.run_dir / EPISODES_FILE, "w", newline="")
        self._writer = csv.DictWriter(self._csv, fieldnames=CSV_FIELDS)
        self._writer.writeheader()
        self._csv.flush()
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb" / "episodes"))
        by_episode = self.max_episodes is not None
        self._bar = tqdm(total=self.max_episodes if by_episode else self.total_timesteps,
                         disable=not self.progress,
                         unit="ep" if by_episode else "step", desc=f"{self.meta.get('algo', '')} "
                         f"{self.meta.get('env_id', '')}", dynamic_ncols=True, leave=True)

    def _on_training_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- per step
    def _on_step(self) -> bool:
        dones = np.asarray(self.locals.get("dones", []))
        infos = self.locals.get("infos", [])
        rewards = np.asarray(self.locals.get("rewards", np.zeros(len(dones))))
        if self.max_episodes is None and self._bar is not None:
            self._bar.update(len(dones))
        for i in np.flatnonzero(dones):
            info = infos[i]
            if "accuracy" not in info:  # not a ChannelPruneEnv episode end (should not happen)
                continue
            self._record(int(i), episode_return(info, float(rewards[i])), info)
            if self.max_episodes is not None and self._bar is not None:
                self._bar.update(1)
        return self.max_episodes is None or self.episodes < self.max_episodes

    def _record(self, env_index: int, reward: float, info: dict[str, Any]) -> None:
        self.episodes += 1
        row = {"episode": self.episodes, "timesteps": self.num_timesteps, "env": env_index, "reward": reward,
               "accuracy": info.get("accuracy"), "flops_ratio": info.get("flops_ratio"),
               "params_ratio": info.get("params_ratio"),
               "effective_flops_ratio": info.get("effective_flops_ratio"),
               "clamp_total": info.get("clamp_total"), "images_scored": info.get("images_scored"),
               # the env's own evaluation time; ``seconds`` minus it is what the search spends around it
               "eval_seconds": None if info.get("eval_seconds") is None else round(float(info["eval_seconds"]), 3),
               "seconds": round(time.perf_counter() - self._t0, 3),
               # the plan itself (a JSON list, as in the benchmark's rows): what did the search converge to?
               "keep_ratios": json.dumps([round(float(r), 4) for r in info.get("keep_ratios", [])])}
        self._writer.writerow(row)
        self._csv.flush()
        if self._tb is not None:
            for key in ("reward", "accuracy", "flops_ratio", "effective_flops_ratio"):
                if row[key] is not None:
                    self._tb.add_scalar(f"episode/{key}", float(row[key]), self.episodes)
        # a plan stopped at a rung of the race (``screen_size``) was not scored in full: never the best
        if not info.get("screened") and (self.best is None or reward > self.best["reward"]):
            self.best = {**self.meta, "episode": self.episodes, "timesteps": self.num_timesteps, "reward": reward,
                         **{k: info[k] for k in BEST_KEYS if k in info}}
            write_json_atomic(self.run_dir / BEST_FILE, self.best)
        if self._bar is not None:  # the best so far, and the search's speed in the unit its time goals use
            b = self.best
            self._bar.set_postfix(best=f"{b['reward']:.4f}", acc=f"{b.get('accuracy', float('nan')):.4f}",
                                  flops=f"{b.get('flops_ratio', float('nan')):.3f}",
                                  ep_min=f"{60 * self.episodes / max(time.perf_counter() - self._t0, 1e-9):.1f}",
                                  refresh=False)


class ExplorationDecay(BaseCallback):
    """Cap a Gaussian policy's std by a schedule falling log-linearly from its initial std to ``final_std``.

    PPO learns its std, and with a few hundred episodes it keeps exploring to the end, so the last episodes are
    far noisier than the policy's mean (ResNet-56 at budget 0.3: mean reward 0.19-0.41 over the last 50
    episodes, best 0.45-0.53). AMC decays DDPG's noise per episode for the same reason; this is the on-policy
    counterpart. Before each rollout every log-std is clipped to the schedule's value at the run's progress, so
    the rollout's log-probabilities are those of the policy that acts; PPO may still learn a smaller std.

    Measured (docs/reports/agents.md, "ResNet-56 (30 groups)", its ablations; 3 seeds, ``final_std=0.1``): no gain.
    The final policies scored 0.25, 0.40 and 0.39 on test (the preset's, same seeds: 0.18, 0.49, 0.43), so it is
    not in the presets.

    Args:
        final_std: the cap at the end of the run (the std in the [-1, 1] action space).
        total_timesteps: the run's length, which the schedule spans.
    """

    def __init__(self, final_std: float, total_timesteps: int):
        super().__init__()
        if not (isinstance(final_std, (int, float)) and 0 < final_std):
            raise ValueError(f"final_std={final_std!r} must be a positive number")
        self.final_log_std = math.log(float(final_std))
        self.total_timesteps = max(int(total_timesteps), 1)
        self.start_log_std: float | None = None

    def _on_training_start(self) -> None:
        log_std = getattr(self.model.policy, "log_std", None)
        if not isinstance(log_std, torch.nn.Parameter):
            raise ValueError(f"final_std needs a Gaussian policy with a learned log_std; "
                             f"{type(self.model.policy).__name__} has none")
        self.start_log_std = float(log_std.detach().max())

    def cap(self) -> float:
        """The log-std cap now: the start value at step 0, ``log(final_std)`` at the last step."""
        frac = min(self.num_timesteps / self.total_timesteps, 1.0)
        return self.start_log_std + frac * (self.final_log_std - self.start_log_std)

    def _on_rollout_start(self) -> None:
        with torch.no_grad():
            self.model.policy.log_std.clamp_(max=self.cap())

    def _on_step(self) -> bool:
        return True


class SharedRace(BaseCallback):
    """One race for all the training envs of a run (``--n-envs K``, ``screen_size``). An env races the reward
    split against the best plan it has scored in full; alone, each of K envs would race against a bar below the
    run's best and score more plans in full than one race would. After each step, the best whole-split accuracy
    of any env goes to every env (``ChannelPruneEnv.share_race_best``)."""

    def __init__(self):
        super().__init__()
        self.best = -math.inf

    def _on_step(self) -> bool:
        full = [info["accuracy"] for info in self.locals["infos"]
                if "accuracy" in info and info.get("screened") is False]
        if full and max(full) > self.best:
            self.best = max(full)
            self.training_env.env_method("share_race_best", self.best)
        return True


class PolicySelection(BaseCallback):
    """Every ``every`` training episodes, play the deterministic policy once on ``eval_env`` and keep the best
    snapshot: early stopping on the reward split, as RL Zoo keeps ``best_model`` with SB3's EvalCallback.

    A PPO policy's mean can drift away from its best plans late in a run (docs/reports/agents.md, "Cheaper
    episodes": 800 episodes on ResNet-18, best found at episode 81, final policy 12 points below it on test). The
    snapshot whose deterministic plan scores best on the reward split is saved as ``selected.zip``, its plan as
    ``selected.json`` (same fields as ``best.json``), and every check as a row of ``selection.csv``. Each check is
    one more reward-split evaluation, which the benchmark adds to the run's count. With ``screen_size`` the checks
    are raced like the training episodes (``make_selection_env``): a check whose score at a rung cannot beat the
    best check is stopped there (``images_scored`` says so) and is never selected, so only whole-split scores are
    chosen by. A check that may win costs what it did unraced; the others cost BN recalibration and the rungs
    they reached.

    In a worker process (``eval_env`` a SubprocVecEnv, as ``make_selection_env`` builds it for ``--n-envs`` K > 1)
    a check does not stop training: its plan is chosen at once (the deterministic policy's steps cost no
    evaluation), the snapshot is saved, and the plan is scored while training goes on; its result is recorded
    before the next check starts, or when training ends. The rows and the choice are those of a check scored on
    the spot.

    Args:
        eval_env: a one-env VecEnv built like the training env (same actions wrapper), used only here.
        run_dir: where ``selected.zip``, ``selected.json`` and ``selection.csv`` go.
        meta: fields copied into ``selected.json`` (as :class:`EpisodeRecorder`'s ``meta``).
        every: training episodes between checks (checks come after ``every``, ``2 every``, ... episodes).
        episode_len: steps per episode (the model's number of groups).
        n_envs: training envs (each callback call is one step of each).
    """

    def __init__(self, eval_env: VecEnv, run_dir: Path, meta: dict[str, Any], every: int, episode_len: int,
                 n_envs: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"select_every={every!r} must be a positive integer (training episodes per check)")
        super().__init__()
        self.eval_env, self.eval_freq = eval_env, max(1, every * episode_len // n_envs)
        self.run_dir, self.meta, self.episode_len = Path(run_dir), dict(meta), int(episode_len)
        self.background = isinstance(eval_env, SubprocVecEnv)
        self.checks = 0
        self.selected: dict[str, Any] | None = None
        self._pending: int | None = None  # episodes at the check being scored

    def _on_training_start(self) -> None:
        with open(self.run_dir / SELECTION_FILE, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=SELECTION_FIELDS).writeheader()

    def _on_step(self) -> bool:
        if self.n_calls % self.eval_freq == 0:
            self.collect()  # the previous check first: checks are raced and recorded in order
            self._start()
            if not self.background:
                self.collect()
        return True

    def _on_training_end(self) -> None:
        self.collect()

    def _start(self) -> None:
        """Play the deterministic policy up to its last action, save the snapshot, and send the last step (the
        evaluation) to the eval env without waiting for it."""
        obs = self.eval_env.reset()
        for _ in range(self.episode_len - 1):
            obs, _, done, _ = self.eval_env.step(self.model.predict(obs, deterministic=True)[0])
            if done[0]:
                raise RuntimeError(f"the check's episode ended before step {self.episode_len}; episode_len "
                                   "must be the env's number of groups")
        self.model.save(self.run_dir / PENDING_MODEL_FILE)
        self.eval_env.step_async(self.model.predict(obs, deterministic=True)[0])
        self._pending = self.num_timesteps // self.episode_len

    def collect(self) -> None:
        """Wait for the check being scored, if any, and record it."""
        if self._pending is None:
            return
        episodes, self._pending = self._pending, None
        _, rewards, dones, infos = self.eval_env.step_wait()
        if not dones[0]:
            raise RuntimeError(f"the check's episode did not end after {self.episode_len} steps; episode_len must "
                               "be the env's number of groups")
        self._record(episode_return(infos[0], float(rewards[0])), infos[0], episodes)

    def _record(self, reward: float, info: dict[str, Any], episodes: int) -> None:
        self.checks += 1
        row = {"check": self.checks, "episodes": episodes, "reward": reward, "accuracy": info.get("accuracy"),
               "flops_ratio": info.get("flops_ratio"), "params_ratio": info.get("params_ratio"),
               "images_scored": info.get("images_scored"),
               "keep_ratios": json.dumps([round(float(r), 4) for r in info.get("keep_ratios", [])])}
        with open(self.run_dir / SELECTION_FILE, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=SELECTION_FIELDS).writerow(row)
        pending = self.run_dir / PENDING_MODEL_FILE
        # a part-split score (screened) is too noisy to choose by, and cannot win the race anyway; ties keep the
        # earlier snapshot
        if not info.get("screened") and (self.selected is None or reward > self.selected["reward"]):
            pending.replace(self.run_dir / SELECTED_MODEL_FILE)
            self.selected = {**self.meta, "check": self.checks, "episodes": episodes, "reward": reward,
                             **{k: info[k] for k in BEST_KEYS if k in info}}
            write_json_atomic(self.run_dir / SELECTED_FILE, self.selected)
        else:
            pending.unlink(missing_ok=True)
