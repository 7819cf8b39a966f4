"""The agents package: training every algorithm, presets, AMC's noise and episode reward, best.json as a policy,
evaluation, bad inputs, and a learning test on a synthetic model whose right allocation is known."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from stable_baselines3.common.logger import Logger
from torch import nn

import envs  # noqa: F401  (registers the ids)
from agents import evaluate as evaluate_mod
from agents import train as train_mod
from agents.algos import ALGOS, ON_POLICY
from agents.bounded_policy import BetaDistribution, BetaMlpPolicy, BoundedMlpPolicy
from agents.common import EnvFactory, split_serializable
from agents.episode_reward import EpisodeBaselineWrapper, EpisodeRewardReplayBuffer
from agents.evaluate import evaluate_run
from agents.noise import TruncatedNormalActionNoise
from agents.policy import BestPolicy, make_env_from_best
from agents.presets import get_preset, load_presets, resolve
from agents.relative_actions import AnchoredActions, RelativeActions, wrap_actions
from agents.train import train
from envs.cli import parse_key_values
from envs.data import DatasetSplits, Split
from envs.episodes import run_episode
from envs.paths import CACHE_ENV

ENV_ID = "ChannelPrune-ResNet20-v0"


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def small_kwargs(tiny_gym_kwargs):
    """The tiny env with a 100-image reward split and 64 calibration images: ~4x cheaper episodes."""
    data = tiny_gym_kwargs["data"]
    small = dataclasses.replace(data, reward=Split(data.reward.x[:100], data.reward.y[:100]),
                                calib=Split(data.calib.x[:64], data.calib.y[:64]))
    return {**tiny_gym_kwargs, "data": small}


def synthetic_kwargs(k: int = 16, copies: int = 8, depth: int = 2, budget: float = 0.25) -> dict:
    """A ChannelPruneEnv setting where the right allocation is known (1x1 convs on k-dim Gaussian inputs).

    The label is the argmax of the k input features. The chain is E0 R0 E1 R1 E2 (+ an identity classifier):
    an "essential" group E has k channels, channel j carrying feature j (pruning it loses class j); a "redundant"
    group R has copies*k channels, copies of the k features (any k of them, in index order, keep every class,
    since BN recalibration restores the scale). The right plan keeps every E whole and prunes every R to about
    1/copies; with the defaults (budget 0.25) it reaches ~0.95 accuracy (0.79 with R at min_keep), the best
    constant action 0.43, random actions 0.23 on average, and keeping everything alike lets the wall cut the late
    E groups. Channel choice is by L1 norm (all equal: index order), so no importance predictor is trained.
    """
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        x = torch.randn(n, k, 1, 1, generator=g)
        return Split(x, x.view(n, k).argmax(1))

    data = DatasetSplits("synthetic", split(256), split(512), split(256), split(256), k, (0.0,) * k, (1.0,) * k, 0)
    copy_w = torch.zeros(k * copies, k)
    copy_w[torch.arange(k * copies), torch.arange(k * copies) % k] = 1.0
    model = nn.Sequential()

    def add(name: str, w: torch.Tensor) -> None:
        conv = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=False)
        conv.weight.data.copy_(w.view(*w.shape, 1, 1))
        model.add_module(name, conv)
        model.add_module(f"bn_{name}", nn.BatchNorm2d(w.shape[0], momentum=None))

    add("e0", torch.eye(k))
    for d in range(depth):
        add(f"r{d}", copy_w)
        add(f"e{d + 1}", copy_w.T.contiguous())
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(k, k, bias=False))
    model.fc.weight.data.copy_(torch.eye(k))
    with torch.no_grad():  # BN statistics of the base model
        model.train()(data.calib.x)
    model.eval()
    return dict(model=model, data=data, scorer="l1", budget=budget, progress=False)


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


class Constant:
    """A policy that plays one action at every step."""

    def __init__(self, a: float):
        self.a = np.array([a], dtype=np.float32)

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        return self.a, None


# ---------------------------------------------------------------------------------------------- every algorithm
@pytest.mark.parametrize("algo", list(ALGOS))
def test_each_algo_trains_saves_reloads_predicts(algo, small_kwargs, tmp_path):
    # 10 episodes of 12 steps; the off-policy warm-up and the on-policy rollout are shortened so updates happen
    over = {"n_steps_episodes": 2} if algo in ON_POLICY else {"warmup_episodes": 3, "buffer_size": 500}
    run = train(algo, ENV_ID, small_kwargs, episodes=10, seed=0, out=tmp_path / algo, progress=False, **over)
    for name in ("model.zip", "config.yaml", "best.json", "episodes.csv"):
        assert (run / name).is_file(), name
    assert any((run / "tb").rglob("events.out.tfevents.*"))
    rows = read_csv(run / "episodes.csv")
    assert [int(r["episode"]) for r in rows] == list(range(1, 11))
    assert {"reward", "accuracy", "flops_ratio"} <= set(rows[0])
    assert all(float(r["flops_ratio"]) <= 0.5 + 1e-9 for r in rows)

    best = json.loads((run / "best.json").read_text())
    assert best["reward"] == max(float(r["reward"]) for r in rows)
    assert len(best["keep_ratios"]) == best["n_groups"] == 12
    assert best["env_id"] == ENV_ID and best["seed"] == 0 and best["algo"] == algo and best["min_keep"] == 0.1
    assert best["env_kwargs"]["width"] == 0.5 and best["env_kwargs_skipped"] == {"data": "envs.data.DatasetSplits"}
    for key in ("accuracy", "flops_ratio", "params_ratio", "effective_flops_ratio", "runtime_ratios"):
        assert key in best

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["status"] == "finished" and cfg["episodes_done"] == 10 and cfg["timesteps_done"] == 120
    if algo in ON_POLICY:
        assert cfg["hyperparams"]["n_steps"] == 24
    else:
        assert cfg["hyperparams"]["learning_starts"] == 36

    model = ALGOS[algo].load(run / "model.zip", device="cpu")
    assert model._n_updates > 0  # it did learn, not only collect
    env = gym.make(ENV_ID, **small_kwargs)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (1,) and np.all(np.abs(action) <= 1.0)
    batch, _ = model.predict(np.stack([obs, obs]), deterministic=True)
    assert batch.shape == (2, 1) and np.allclose(batch[0], action)


# ---------------------------------------------------------------------------------------------- learning
def _random_mean(kwargs: dict, episodes: int = 20, seed: int = 0) -> float:
    env = gym.make(ENV_ID, **kwargs)
    env.action_space.seed(seed)
    rewards = []
    for _ in range(episodes):
        env.reset(seed=seed)
        done = False
        while not done:
            _, r, terminated, truncated, _ = env.step(env.action_space.sample())
            done = terminated or truncated
        rewards.append(r)
    return float(np.mean(rewards))


def _constant_best(kwargs: dict) -> float:
    """The best reward of a policy that plays one action at every step (a grid of 21 actions)."""
    env = gym.make(ENV_ID, **kwargs)
    return max(run_episode(env, Constant(a))[0] for a in np.linspace(-1, 1, 21))


@pytest.mark.parametrize("algo", ["ppo", "ddpg"])
def test_agent_beats_random_actions(algo, tmp_path):
    """PPO (paper 7's preset) and DDPG (AMC's preset, unchanged) learn far better than chance in 150 episodes.

    On this env the untrained agents score 0.125, random actions ~0.23 on average, the best constant action 0.43,
    the right allocation ~0.95. The deterministic policy must beat the random mean by 0.2; PPO must also beat the
    best constant action by 0.15, i.e. have learned a per-group allocation (observed, seeds 0-3: PPO 0.79 each;
    DDPG 0.79, 0.43, 0.56, 0.49).
    """
    kwargs = synthetic_kwargs()
    random_mean = _random_mean(kwargs)
    assert 0.15 < random_mean < 0.3  # the test's premise: chance is poor here
    run = train(algo, ENV_ID, kwargs, episodes=150, seed=0, out=tmp_path, progress=False, tensorboard=False)
    model = ALGOS[algo].load(run / "model.zip", device="cpu")
    reward, info = run_episode(gym.make(ENV_ID, **kwargs), model)
    assert reward > random_mean + 0.2, (reward, random_mean, info["kept_counts"])
    if algo == "ppo":
        constant = _constant_best(kwargs)
        assert constant < 0.5 and reward > constant + 0.15, (reward, constant, info["kept_counts"])
        kept = info["kept_counts"]
        assert min(kept[0], kept[2], kept[4]) >= 12 and max(kept[1], kept[3]) <= 32  # E kept, R pruned


# ---------------------------------------------------------------------------------------------- best.json
@pytest.mark.parametrize("mode", ["static", "runtime"])
def test_best_json_replays_exactly_and_evaluates(mode, small_kwargs, tmp_path):
    kwargs = {**small_kwargs, "mode": mode}
    run = train("ppo", ENV_ID, kwargs, episodes=4, seed=3, out=tmp_path, progress=False, tensorboard=False)
    best = json.loads((run / "best.json").read_text())
    assert best["mode"] == mode
    data = small_kwargs["data"]
    with pytest.raises(ValueError, match="data"):
        make_env_from_best(run / "best.json")  # the DatasetSplits could not be recorded: must be passed
    env = make_env_from_best(run / "best.json", data=data)
    policy = BestPolicy.load(run / "best.json")
    reward, info = run_episode(env, policy)
    assert info["accuracy"] == best["accuracy"]
    assert info["flops_ratio"] == best["flops_ratio"]
    assert info["params_ratio"] == best["params_ratio"]
    assert info["keep_ratios"] == best["keep_ratios"]
    assert info["runtime_ratios"] == best["runtime_ratios"]
    assert info["effective_flops_ratio"] == best["effective_flops_ratio"]
    assert reward == best["reward"]
    if mode == "runtime":  # the runtime ratios are part of what is replayed
        assert any(r < 1.0 for r in best["runtime_ratios"])

    # batched observations: one action per row, each for the row's own step
    obs0, _ = env.reset()
    obs1, *_ = env.step(policy.predict(obs0)[0])
    acts, state = policy.predict(np.stack([obs0, obs1]))
    assert acts.shape == (2, 2 if mode == "runtime" else 1) and state is None
    assert np.allclose(acts[0], policy.action_for_step(0)) and np.allclose(acts[1], policy.action_for_step(1))

    results = evaluate_run(run, data=data)
    assert results["best"]["accuracy"] == best["accuracy"]
    assert set(results) == {"agent", "best"} and 0.0 <= results["agent"]["accuracy"] <= 1.0
    assert results["agent"]["flops_ratio"] <= 0.5 + 1e-9
    assert "accuracy" in evaluate_mod.format_results(results)


def test_raced_training_keeps_the_best_among_plans_scored_in_full(small_kwargs, tmp_path):
    kwargs = {**small_kwargs, "screen_size": 50}
    run = train("ppo", ENV_ID, kwargs, episodes=12, seed=0, out=tmp_path, progress=False, tensorboard=False)
    with open(run / "episodes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    full = len(small_kwargs["data"].reward)
    scored = {int(r["images_scored"]) for r in rows}
    assert scored <= {50, full} and full in scored
    best = json.loads((run / "best.json").read_text())
    best_row = rows[best["episode"] - 1]
    assert int(best_row["images_scored"]) == full  # the best episode was scored on the whole reward split
    assert best["accuracy"] == max(float(r["accuracy"]) for r in rows if int(r["images_scored"]) == full)
    assert json.loads(best_row["keep_ratios"]) == [round(r, 4) for r in best["keep_ratios"]]  # every plan logged
    env = make_env_from_best(run / "best.json", data=small_kwargs["data"])
    assert run_episode(env, BestPolicy.load(run / "best.json"))[1]["accuracy"] == best["accuracy"]


def test_policy_selection_keeps_the_snapshot_whose_deterministic_plan_scored_best(small_kwargs, tmp_path):
    """select_every: the deterministic policy is checked every K episodes on the reward split, raced like the
    training episodes; selected.zip is the first snapshot with the best whole-split check, it replays to that
    reward, and the benchmark gives the run a third row counting the checks as evaluations."""
    from agents.common import SELECTED_MODEL_FILE
    from baselines.experiments.benchmark import agent_checks, agent_methods, agent_plays

    kwargs = {**small_kwargs, "screen_size": 50}
    run = train("ppo", ENV_ID, kwargs, episodes=12, seed=0, out=tmp_path, progress=False, tensorboard=False,
                select_every=3, actions="anchored")
    with open(run / "selection.csv", newline="") as f:
        checks = list(csv.DictReader(f))
    assert [int(c["episodes"]) for c in checks] == [3, 6, 9, 12]
    full, scored = len(small_kwargs["data"].reward), [int(c["images_scored"]) for c in checks]
    assert scored[0] == full and 50 in scored  # the checks race too: the first in full, a losing one stopped at 50
    rewards = [float(c["reward"]) if n == full else -1.0 for c, n in zip(checks, scored)]  # screened: never chosen
    selected = json.loads((run / "selected.json").read_text())
    assert selected["reward"] == max(rewards) and selected["check"] == rewards.index(max(rewards)) + 1
    assert yaml.safe_load((run / "config.yaml").read_text())["selection_checks"] == 4
    policy = ALGOS["ppo"].load(run / SELECTED_MODEL_FILE, device="cpu")
    env = wrap_actions(gym.make(ENV_ID, **small_kwargs), "anchored")  # the run's actions, scored in full
    assert run_episode(env, policy)[1]["accuracy"] == selected["accuracy"]
    replay = evaluate_run(run, data=small_kwargs["data"])  # the CLI's replay, scored in full, names it too
    assert replay["selected"]["accuracy"] == selected["accuracy"]

    assert agent_methods("ppo", ENV_ID, 12, str(run)) == ["ppo", "ppo_best", "ppo_selected"]
    assert agent_methods("ppo", ENV_ID, 12, None) == ["ppo", "ppo_best"]  # the preset checks no policy
    assert agent_checks("ppo", ENV_ID, 12, str(run)) == 4
    # trained by the benchmark: the preset's checks (ResNet-18's: every 20 episodes), none in a short run
    assert agent_checks("ppo", "ChannelPrune-ResNet18-v0", 300, None) == 15
    assert agent_methods("ppo", "ChannelPrune-ResNet18-v0", 12, None) == ["ppo", "ppo_best"]
    plays = agent_plays("ppo", ENV_ID, env.unwrapped, kwargs, 0.5, 12, 0, tmp_path, str(run), False)
    assert [p[0] for p in plays] == ["ppo", "ppo_best", "ppo_selected"]
    assert {p[3] for p in plays} == {12 + 4}  # episodes plus policy checks: the run's reward-split evaluations
    with pytest.raises(ValueError, match="select_every=0"):
        resolve("ppo", {**get_preset("ppo", ENV_ID), "select_every": 0}, 12, 1, 1)


def test_shared_race_gives_every_env_the_runs_best_whole_split_score(small_kwargs):
    """--n-envs K: the envs of one run race against one bar, the best whole-split accuracy any of them scored, so
    an env stops plans that only beat its own best (SharedRace; one env's race is envs.screening's)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.callbacks import SharedRace

    seen = []  # (env, accuracy, screened) of every episode

    class Logged(gym.Wrapper):
        def step(self, action):
            out = super().step(action)
            if out[2]:
                seen.append((self.index, out[4]["accuracy"], out[4]["screened"]))
            return out

    envs_ = [Logged(gym.make(ENV_ID, **{**small_kwargs, "screen_size": 50})) for _ in range(2)]
    for i, env in enumerate(envs_):
        env.index = i
    vec = DummyVecEnv([lambda e=e: e for e in envs_])
    model = PPO("MlpPolicy", vec, n_steps=12, batch_size=12, seed=0, device="cpu")
    model.learn(total_timesteps=6 * 12 * 2, callback=SharedRace())
    full = [(i, acc) for i, acc, screened in seen if not screened]
    assert {i for i, _ in full} == {0, 1}  # each env scored plans in full, so each had a bar of its own
    best = max(acc for _, acc in full)
    assert [e.unwrapped.screen.best for e in envs_] == [best, best]
    own = [max(acc for i, acc in full if i == k) for k in (0, 1)]
    assert min(own) < best  # without sharing, one env would race against a lower bar than the run's best


def test_best_policy_runtime_mode_maps_both_ratios():
    policy = BestPolicy([1.0, 0.55, 0.1], min_keep=0.1, runtime_ratios=[1.0, 0.5, 1.0], mode="runtime")
    a = policy.predict(np.array([0.5] + [0.0] * 22, dtype=np.float32))[0]  # step 1 of 3
    assert a.shape == (2,)
    assert np.allclose(a, [0.0, 2 * (0.5 - 0.1) / 0.9 - 1], atol=1e-6)
    assert np.allclose(policy.action_for_step(0), [1.0, 1.0]) and np.allclose(policy.action_for_step(2)[0], -1.0)


# ---------------------------------------------------------------------------------------------- CLIs
def test_cli_train_then_evaluate(tiny_setup, data_cache, monkeypatch, tmp_path, capsys):
    ckpt, _ = tiny_setup
    monkeypatch.setenv(CACHE_ENV, str(data_cache))  # the unpacked Fashion-MNIST files
    out = tmp_path / "run"
    rc = train_mod.main(["--algo", "a2c", "--env", ENV_ID, "--env-kwargs", "width=0.5", f"checkpoint={ckpt}",
                         "reward_size=100", "calib_size=64", "progress=false", "--episodes", "3", "--seed", "1",
                         "--out", str(out), "--no-progress", "--no-tensorboard"])
    assert rc == 0
    best = json.loads((out / "best.json").read_text())
    assert best["env_kwargs"]["reward_size"] == 100 and best["env_kwargs_skipped"] == {}
    assert len(read_csv(out / "episodes.csv")) == 3
    printed = capsys.readouterr().out
    assert re.search(r"^3 episodes in \d+ s: \d+\.\d episodes per minute$", printed, re.M), printed
    assert evaluate_mod.main([str(out)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("accuracy"))
    assert row.split()[2] == f"{best['accuracy']:.4f}"  # columns: metric, agent, best


def test_cli_rejects_bad_algo(capsys):
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--algo", "dqn", "--env", ENV_ID])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "dqn" in err and "ppo" in err and "ddpg" in err


def test_parse_env_kwargs_yaml_values():
    kw = parse_key_values(["budget=0.5", "width=0.5", "reward_size=200", "scorer=l1", "internal_only=true"])
    assert kw == {"budget": 0.5, "width": 0.5, "reward_size": 200, "scorer": "l1", "internal_only": True}
    assert isinstance(kw["reward_size"], int)
    with pytest.raises(ValueError, match="key=value"):
        parse_key_values(["budget"])
    # YAML 1.1 reads a number without a dot as a string: "learning_rate=1e-3" must still reach SB3 as a float
    hp = parse_key_values(["learning_rate=1e-3", "buffer_size=1E+4", "net_arch=[64, 64]"], "--hyperparams")
    assert hp == {"learning_rate": 1e-3, "buffer_size": 1e4, "net_arch": [64, 64]}
    assert parse_key_values(["ppo=runs/01"], "--agent-runs", raw=True) == {"ppo": "runs/01"}


# ---------------------------------------------------------------------------------------------- bad inputs
def _no_env(*args, **kwargs):
    raise AssertionError("an env was built before the arguments were checked")


@pytest.mark.parametrize("args,kwargs,match", [
    (("dqn", ENV_ID), {}, r"algo='dqn'.*ppo, a2c, sac, td3, ddpg"),
    (("ppo", "ChannelPrune-ResNet99"), {}, r"ChannelPrune-ResNet99.*ChannelPrune-ResNet18-v0"),
    (("ppo", ENV_ID, {"bugdet": 0.5}), {}, r"'bugdet'.*budget"),
    (("ppo", ENV_ID, {"budget": 2.0}), {}, r"budget=2.0"),
    (("ppo", ENV_ID), {"episodes": 3, "timesteps": 30}, r"not both"),
    (("ppo", ENV_ID), {"episodes": 0}, r"episodes=0"),
    (("ppo", ENV_ID), {"n_envs": 0}, r"n_envs=0"),
    (("ppo", ENV_ID), {"seed": -1}, r"seed=-1"),
    (("ppo", ENV_ID), {"learning_rat": 1e-3}, r"'learning_rat'.*learning_rate"),
    (("ddpg", ENV_ID), {"n_steps_episodes": 2}, r"'n_steps_episodes'.*warmup_episodes"),
    (("ppo", ENV_ID), {"policy": "TanhPolicy"}, r"policy='TanhPolicy'.*BoundedMlpPolicy, BetaMlpPolicy"),
    (("ddpg", ENV_ID), {"policy": "BoundedMlpPolicy"}, r"policy='BoundedMlpPolicy'.*algo='ddpg'.*MlpPolicy"),
    (("ppo", ENV_ID), {"actions": "sideways"}, r"actions='sideways'.*absolute, relative"),
])
def test_bad_inputs_fail_before_building(args, kwargs, match, monkeypatch, tmp_path):
    monkeypatch.setattr(train_mod, "make_vec_env", _no_env)
    with pytest.raises(ValueError, match=match):
        train(*args, out=tmp_path / "run", progress=False, **kwargs)


def test_unwritable_out_dir_fails_before_training(monkeypatch, tmp_path):
    monkeypatch.setattr(train_mod, "make_vec_env", _no_env)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"out=.*not a writable directory"):
        train("ppo", ENV_ID, {"width": 0.5}, out=blocker / "run", progress=False)


def test_serializable_env_kwargs_record_types(small_kwargs):
    ok, skipped = split_serializable({**small_kwargs, "scorer": "l1"})
    assert "data" not in ok and skipped == {"data": "envs.data.DatasetSplits"}
    assert ok["scorer"] == "l1" and ok["width"] == 0.5


# ---------------------------------------------------------------------------------------------- presets
def test_presets_merge_resolve_and_are_valid():
    table = load_presets()
    assert set(table["default"]) == set(ALGOS)
    for block in table.values():
        for algo, hp in block.items():
            resolve(algo, {**table["default"][algo], **hp}, episode_len=12, n_envs=1, action_dim=1)  # no bad keys
    assert get_preset("ppo", "ChannelPrune-ResNet18-v0")["n_steps_episodes"] == 2
    assert get_preset("ppo", "ChannelPrune-ResNet20-v0")["n_steps_episodes"] == 4

    ppo = resolve("ppo", get_preset("ppo", ENV_ID), episode_len=12, n_envs=1, action_dim=1).kwargs
    assert ppo["n_steps"] == 48 and 48 % ppo["batch_size"] == 0 and ppo["gamma"] == 1.0

    res = resolve("ddpg", get_preset("ddpg", ENV_ID), episode_len=12, n_envs=1, action_dim=1)
    kw = res.kwargs
    assert kw["learning_starts"] == 25 * 12 and kw["batch_size"] == 64 and kw["tau"] == 0.01
    assert kw["gamma"] == 1.0 and kw["actor_learning_rate"] == 1e-4 and kw["learning_rate"] == 1e-3
    assert kw["policy_kwargs"]["net_arch"] == {"pi": [300, 300], "qf": [300, 300]}
    assert isinstance(kw["action_noise"], TruncatedNormalActionNoise)
    assert kw["action_noise"].sigma0 == 0.5 and kw["action_noise"].decay == 0.95
    assert kw["action_noise"].warmup_episodes == 25
    assert res.episode_reward and kw["replay_buffer_class"] is EpisodeRewardReplayBuffer
    assert kw["train_freq"] == (1, "episode")
    # several envs: SB3 allows episode train_freq with one env only; the warm-up splits across envs
    kw2 = resolve("ddpg", get_preset("ddpg", ENV_ID), episode_len=12, n_envs=2, action_dim=1).kwargs
    assert kw2["train_freq"] == (12, "step") and kw2["action_noise"].warmup_episodes == 25

    on = resolve("ppo", {**get_preset("ppo", ENV_ID), "episode_reward": True}, 12, 1, 1)
    assert on.episode_reward and on.kwargs["gamma"] == 1.0 and on.kwargs["gae_lambda"] == 1.0


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_bounded_policy_keeps_its_mean_inside_the_action_bounds(algo, tmp_path):
    """Pushed far outside [-1, 1], MlpPolicy's Gaussian mean follows and BoundedMlpPolicy's stays inside; the
    preset name resolves to the class, the record keeps the name, and a saved model reloads and acts the same."""
    res = resolve(algo, {**get_preset(algo, ENV_ID), "policy": "BoundedMlpPolicy"}, 12, 1, 1)
    assert res.kwargs["policy"] is BoundedMlpPolicy and res.record["policy"] == "BoundedMlpPolicy"
    env = gym.make(ENV_ID, **synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5))
    obs = torch.as_tensor(np.stack([env.observation_space.sample() for _ in range(8)]))
    means = {}
    for policy in ("MlpPolicy", BoundedMlpPolicy):
        model = ALGOS[algo](policy, env, seed=0, device="cpu")
        with torch.no_grad():
            model.policy.action_net.bias.fill_(-3.0)  # where PPO's mean went on ResNet-18 at budget 0.3 (~-2)
            means[policy] = model.policy.get_distribution(obs).distribution.mean
    assert (means["MlpPolicy"] < -1.5).all()
    bounded = means[BoundedMlpPolicy]
    assert (bounded.abs() < 1).all() and (bounded < -0.9).all()  # inside, yet it still says "cut hard"
    model.save(tmp_path / "model.zip")
    again = ALGOS[algo].load(tmp_path / "model.zip", device="cpu")
    assert isinstance(again.policy, BoundedMlpPolicy)
    o = obs[:1].numpy()
    assert np.array_equal(again.predict(o, deterministic=True)[0], model.predict(o, deterministic=True)[0])


def test_relative_actions_zero_is_the_even_plan_and_a_common_shift_moves_budget_forward():
    env = gym.make(ENV_ID, **synthetic_kwargs())  # budget 0.25; groups of 16 and 128 channels
    cost = env.unwrapped.cost
    even = cost.fit_to_budget(np.ones(env.unwrapped.n_groups))  # the uniform plan that spends the budget
    zero = run_episode(RelativeActions(env), Constant(0.0))[1]
    assert np.allclose(zero["keep_ratios"], even, atol=1 / 16 + 1e-9)  # up to one channel of rounding
    assert 0.25 - 0.02 < zero["flops_ratio"] <= 0.25 + 1e-9
    # with the env's own actions a common shift is one more constant plan; here it moves budget to early groups
    shifted = run_episode(RelativeActions(env), Constant(0.5))[1]["keep_ratios"]
    assert shifted[0] > zero["keep_ratios"][0] + 0.2 and shifted[-1] < zero["keep_ratios"][-1] - 0.1
    # the env records the plan in its own terms: replaying its ratios without the wrapper gives the same network
    again = run_episode(env, BestPolicy(zero["keep_ratios"], env.unwrapped.min_keep))[1]
    assert again["kept_counts"] == zero["kept_counts"] and again["accuracy"] == zero["accuracy"]


def test_anchored_actions_zero_is_the_streams_whole_plan_and_depart_from_it(make_env):
    env = make_env(budget=0.5, budget_mode="fill")
    stream = np.array([g.kind == "residual" for g in env.groups])
    anchor = env.cost.streams_whole()
    wrapped = AnchoredActions(env)
    zero = run_episode(wrapped, Constant(0.0))[1]
    assert zero["kept_counts"] == env.cost.plan_counts(anchor)[0] and zero["fill_total"] == 0.0
    assert zero["clamp_total"] == 0.0
    # a = -1 on the streams only cuts them (to a third, before the fill scales the whole plan back up)

    class CutStreams(Constant):
        def predict(self, obs, state=None, episode_start=None, deterministic=True):
            return np.array([-1.0 if obs[1] > 0.5 else 0.0], dtype=np.float32), None  # obs[1]: is_residual

    low = np.asarray(run_episode(wrapped, CutStreams(0.0))[1]["keep_ratios"])
    assert np.all(low[stream] < 0.7) and np.all(low[~stream] > anchor[~stream] + 0.1)
    # each episode starts again from the first group's anchor (the step counter is reset)
    assert run_episode(wrapped, Constant(0.0))[1]["kept_counts"] == zero["kept_counts"]
    assert wrap_actions(env, "anchored").anchor.tolist() == anchor.tolist()


def test_a_run_trained_with_relative_actions_is_evaluated_through_them(tmp_path):
    kwargs = synthetic_kwargs()
    run = train("ppo", ENV_ID, kwargs, episodes=4, seed=0, out=tmp_path, progress=False, tensorboard=False,
                n_steps_episodes=2, actions="relative")
    assert yaml.safe_load((run / "config.yaml").read_text())["hyperparams"]["actions"] == "relative"
    model = ALGOS["ppo"].load(run / "model.zip", device="cpu")
    through = run_episode(RelativeActions(gym.make(ENV_ID, **kwargs)), model)[1]["kept_counts"]
    direct = run_episode(gym.make(ENV_ID, **kwargs), model)[1]["kept_counts"]
    assert through != direct  # the premise: the wrapper changes what this policy's actions ask for
    skipped = {k: kwargs[k] for k in ("model", "data")}
    assert evaluate_run(run, **skipped)["agent"]["kept_counts"] == through


def test_beta_policy_acts_inside_the_bounds_with_the_right_density(tmp_path):
    dist = BetaDistribution(1).proba_distribution(torch.tensor([[0.0, 0.0]]))
    a, b = dist.distribution.concentration1.item(), dist.distribution.concentration0.item()
    assert a == b == pytest.approx(1 + np.log(2))  # softplus(0): a symmetric start, mode at action 0
    draws = dist.proba_distribution(torch.zeros(4000, 2)).sample()
    assert ((draws > -1) & (draws < 1)).all() and abs(draws.mean().item()) < 0.05  # nothing left to clip
    x = torch.tensor([[-0.5], [0.25]])
    want = torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).log_prob((x[:, 0] + 1) / 2) - np.log(2)
    assert torch.allclose(dist.proba_distribution(torch.zeros(2, 2)).log_prob(x), want)
    skewed = dist.proba_distribution(torch.log(torch.expm1(torch.tensor([[2.0, 1.0]]))))  # Beta(3, 2): mode 2/3
    assert skewed.mode().item() == pytest.approx(2 * 2 / 3 - 1)

    res = resolve("ppo", {**get_preset("ppo", ENV_ID), "policy": "BetaMlpPolicy"}, 12, 1, 1)
    assert res.kwargs["policy"] is BetaMlpPolicy and res.record["policy"] == "BetaMlpPolicy"
    env = gym.make(ENV_ID, **synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5))
    model = ALGOS["ppo"](BetaMlpPolicy, env, seed=0, device="cpu", n_steps=24, batch_size=12)
    model.learn(48)
    assert not hasattr(model.policy, "log_std") and model._n_updates > 0
    obs = np.stack([env.observation_space.sample() for _ in range(8)])
    acts, _ = model.predict(obs, deterministic=True)
    assert np.all(np.abs(acts) < 1)
    model.save(tmp_path / "model.zip")
    again = ALGOS["ppo"].load(tmp_path / "model.zip", device="cpu")
    assert np.array_equal(again.predict(obs, deterministic=True)[0], acts)
    with pytest.raises(ValueError, match=r"BetaMlpPolicy needs a Box action space with bounds \[-1, 1\]"):
        ALGOS["ppo"](BetaMlpPolicy, "Pendulum-v1", device="cpu")


def test_exploration_decay_caps_ppos_std_down_to_final_std(monkeypatch, tmp_path):
    """final_std: every rollout acts with a std under the falling cap, the run ends at final_std (recorded),
    the caps fall from the initial std, and a policy without a Gaussian std is refused by name."""
    kwargs = synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5)
    stds = []

    class Spy(train_mod.ExplorationDecay):
        def _on_rollout_start(self) -> None:
            super()._on_rollout_start()
            stds.append((self.cap(), float(self.model.policy.log_std.detach().max())))

    monkeypatch.setattr(train_mod, "ExplorationDecay", Spy)
    run = train("ppo", ENV_ID, kwargs, episodes=12, seed=0, out=tmp_path, progress=False, tensorboard=False,
                n_steps_episodes=2, final_std=0.1)
    caps = [c for c, _ in stds]
    assert len(stds) == 6 and caps[0] == pytest.approx(-0.5) and all(np.diff(caps) < 0)  # preset log_std_init
    assert all(s <= c + 1e-6 for c, s in stds)  # each rollout acted under the cap
    assert caps[-1] > np.log(0.1)  # the last rollout starts before the end, above the final value
    assert yaml.safe_load((run / "config.yaml").read_text())["hyperparams"]["final_std"] == 0.1
    model = ALGOS["ppo"].load(run / "model.zip", device="cpu")
    assert model.policy.log_std.max().item() <= caps[-1] + 0.1  # one update after the last cap: near it
    with pytest.raises(ValueError, match="final_std=2"):
        resolve("ppo", {**get_preset("ppo", ENV_ID), "final_std": 2}, 12, 1, 1)
    with pytest.raises(ValueError, match="BetaMlpPolicy"):
        resolve("ppo", {**get_preset("ppo", ENV_ID), "policy": "BetaMlpPolicy", "final_std": 0.1}, 12, 1, 1)


def test_final_learning_rate_falls_linearly_over_the_run(tmp_path):
    """final_learning_rate: the schedule falls linearly from learning_rate to the final rate, the run's last
    update runs near the final rate, the run records both, and a non-number is refused by name."""
    kwargs = synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5)
    run = train("ppo", ENV_ID, kwargs, episodes=12, seed=0, out=tmp_path, progress=False, tensorboard=False,
                n_steps_episodes=2, learning_rate=1e-3, final_learning_rate=1e-4)
    hp = yaml.safe_load((run / "config.yaml").read_text())["hyperparams"]
    assert hp["learning_rate"] == 1e-3 and hp["final_learning_rate"] == 1e-4
    model = ALGOS["ppo"].load(run / "model.zip", device="cpu")
    last = model.policy.optimizer.param_groups[0]["lr"]  # the rate of the run's last update
    assert 1e-4 <= last < 0.35e-3  # 6 updates: the last starts at 5/6 of the run
    assert model.lr_schedule(1.0) == pytest.approx(1e-3) and model.lr_schedule(0.5) == pytest.approx(5.5e-4)
    with pytest.raises(ValueError, match="final_learning_rate='low'"):
        resolve("ppo", {**get_preset("ppo", ENV_ID), "final_learning_rate": "low"}, 12, 1, 1)


def test_self_imitation_pulls_the_policy_towards_episodes_that_beat_the_critic(tmp_path):
    """self_imitation (SIL, Oh et al. 2018): the buffer keeps the top_k fully scored returns; SIL steps raise the
    log-probability of kept actions whose return beats V(s) and move the deterministic action towards them;
    returns below V(s) change nothing. A run with it records its settings; bad settings are refused by name."""
    from agents.self_imitation import SelfImitation

    kwargs = synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5)
    run = train("ppo", ENV_ID, kwargs, episodes=8, seed=0, out=tmp_path, progress=False, tensorboard=False,
                n_steps_episodes=2, self_imitation={"top_k": 2})
    hp = yaml.safe_load((run / "config.yaml").read_text())["hyperparams"]
    assert hp["self_imitation"] == {"top_k": 2, "steps": 4, "batch_size": 64, "value_coef": 0.01}

    model = ALGOS["ppo"].load(run / "model.zip", device="cpu")
    model.set_logger(Logger(None, []))
    sil = SelfImitation(top_k=2, steps=20, batch_size=8, seed=0)
    sil.init_callback(model)
    sil._on_training_start()
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (5, *model.observation_space.shape)).astype(np.float32)
    target = np.full((5, *model.action_space.shape), 0.8, dtype=np.float32)
    for ret in (0.1, 5.0, 0.2, 4.0, 0.3):  # far above any value the critic has learned
        sil._keep(ret, obs, target, np.full(5, ret, dtype=np.float32))
    assert sorted(e[0] for e in sil.elites) == [4.0, 5.0]
    # what a rollout step hands the callback: two envs, each ending an episode at the second step; env 1's was
    # stopped at the race's first rung, so only env 0's (return 0.9 at every step, gamma 1) is offered
    collector = SelfImitation(top_k=4, seed=0)
    collector.init_callback(model)
    o2, a2 = torch.zeros(2, *model.observation_space.shape), np.zeros((2, *model.action_space.shape))
    for done, reward in ((False, 0.0), (True, 0.9)):
        collector.update_locals({"obs_tensor": o2, "actions": a2, "dones": np.array([done, done]),
                                 "rewards": np.array([reward, reward], dtype=np.float32),
                                 "infos": [{"episode_return": reward},
                                           {"episode_return": reward, "screened": True}]})
        collector.on_step()
    assert len(collector.elites) == 1 and collector.elites[0][0] == 0.9
    assert np.allclose(collector.elites[0][4], [0.9, 0.9]) and collector.elites[0][2].shape[0] == 2
    before_mean = model.policy.predict(obs, deterministic=True)[0]
    obs_t, act_t = torch.as_tensor(obs), torch.as_tensor(target)
    with torch.no_grad():
        before_lp = model.policy.evaluate_actions(obs_t, act_t)[1].mean()
    sil.update()
    with torch.no_grad():
        after_lp = model.policy.evaluate_actions(obs_t, act_t)[1].mean()
    after_mean = model.policy.predict(obs, deterministic=True)[0]
    assert after_lp > before_lp
    assert np.abs(after_mean - 0.8).mean() < np.abs(before_mean - 0.8).mean()

    low = SelfImitation(top_k=2, steps=5, batch_size=8, seed=0)  # returns far below V(s): no gradient at all
    low.init_callback(model)
    low._on_training_start()
    low._keep(-100.0, obs, target, np.full(5, -100.0, dtype=np.float32))
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    low.update()
    assert all(torch.equal(weights[k], v) for k, v in model.policy.state_dict().items())
    with pytest.raises(ValueError, match="self_imitation.top_k=0"):
        resolve("ppo", {**get_preset("ppo", ENV_ID), "self_imitation": {"top_k": 0}}, 12, 1, 1)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        resolve("ddpg", {**get_preset("ddpg", ENV_ID), "self_imitation": True}, 12, 1, 1)
    with pytest.raises(ValueError, match="episode_reward=True"):
        resolve("ppo", {**get_preset("ppo", ENV_ID), "self_imitation": True, "episode_reward": True}, 12, 1, 1)


def test_init_from_starts_a_run_from_another_models_policy(small_kwargs, tmp_path):
    """A policy trained on one model starts a run on another (same observation length): before any update the
    new run's policy is the source's; a run of another algo or without model.zip is refused by name."""
    source = train("ppo", "ChannelPrune-ResNet20-v0", synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5),
                   episodes=4, seed=0, out=tmp_path / "src", progress=False, tensorboard=False, n_steps_episodes=2)
    # learning_rate 0: the run keeps the weights it started from, so the saved model shows what it loaded
    run = train("ppo", ENV_ID, small_kwargs, episodes=2, seed=1, out=tmp_path / "dst", progress=False,
                tensorboard=False, n_steps_episodes=2, learning_rate=0.0, init_from=source)
    a = ALGOS["ppo"].load(source / "model.zip", device="cpu").policy.state_dict()
    b = ALGOS["ppo"].load(run / "model.zip", device="cpu").policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((run / "config.yaml").read_text())["init_from"] == str(source)
    fresh = ALGOS["ppo"].load(train("ppo", ENV_ID, small_kwargs, episodes=2, seed=1, out=tmp_path / "fresh",
                                    progress=False, tensorboard=False, n_steps_episodes=2,
                                    learning_rate=0.0) / "model.zip", device="cpu").policy.state_dict()
    assert not all(torch.equal(a[k], fresh[k]) for k in a)  # the premise: without it, other weights
    with pytest.raises(ValueError, match="is a 'ppo' run; this run's algo is 'a2c'"):
        train("a2c", ENV_ID, small_kwargs, episodes=1, out=tmp_path / "x", progress=False, init_from=source)
    with pytest.raises(ValueError, match="init_from="):
        train("ppo", ENV_ID, small_kwargs, episodes=1, out=tmp_path / "y", progress=False, init_from=tmp_path)
    with pytest.raises(ValueError, match="trained with actions='absolute'; this run's actions are 'relative'"):
        train("ppo", ENV_ID, small_kwargs, episodes=1, out=tmp_path / "z", progress=False, init_from=source,
              actions="relative")


# ---------------------------------------------------------------------------------------------- AMC noise
def test_truncated_normal_noise_stays_in_bounds_and_decays():
    np.random.seed(0)
    noise = TruncatedNormalActionNoise(size=1, sigma=0.5, decay=0.95, warmup_episodes=2)
    mu = np.full((4000, 1), 0.9)
    x = noise.around(mu)
    assert x.shape == mu.shape and np.all(x >= -1) and np.all(x <= 1)
    assert np.mean(x == 1.0) < 1e-3  # truncated, not clipped: no mass piled up at the bound
    assert x.mean() < 0.9 and np.std(x) > 0.1  # the cut upper tail pulls the mean down
    centred = noise.around(np.zeros((4000, 1)))
    assert abs(float(centred.mean())) < 0.05 and 0.38 < float(centred.std()) < 0.5  # TN(0, 0.5) on [-1, 1]: 0.44
    # AMC: episodes 0, 1 are the warm-up; episode 2 explores with sigma0, then 0.95 per episode
    assert [noise.sigma_at(e) for e in range(5)] == pytest.approx([0.5, 0.5, 0.5, 0.475, 0.45125])
    noise.reset()
    noise.reset()
    noise.reset()
    assert noise.episode == 3 and noise.sigma == pytest.approx(0.475)
    assert np.all(np.abs(noise()) <= 2.0)
    noise.sigma0 = 0.0
    assert np.allclose(noise.around(np.array([0.3, -2.0])), [0.3, -1.0])


@pytest.mark.parametrize("n_envs", [1, 2])
def test_ddpg_explores_with_truncated_noise_after_warmup(n_envs, monkeypatch):
    """AMC's schedule inside training: uniform warm-up actions without noise, then TN(mu, sigma_e) on [-1, 1]
    with sigma_e decaying per episode counted over all envs."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    kwargs = synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5)
    vec = DummyVecEnv([EnvFactory(ENV_ID, kwargs) for _ in range(n_envs)])
    res = resolve("ddpg", {**get_preset("ddpg", ENV_ID), "warmup_episodes": 2}, episode_len=3, n_envs=n_envs,
                  action_dim=1)
    model = ALGOS["ddpg"](env=vec, seed=0, **res.kwargs)
    model.set_logger(Logger(None, []))  # no /tmp/SB3-* folder
    seen = []  # (episode index, sigma) of every noisy sample
    original = TruncatedNormalActionNoise.around

    def spy(self, mu):
        seen.append((self.episode, self.sigma))
        return original(self, mu)

    monkeypatch.setattr(TruncatedNormalActionNoise, "around", spy)
    model.learn(total_timesteps=3 * 6)
    # 6 episodes of 3 steps: the 2 warm-up episodes draw no noise, the other 4 do at every step
    assert len(seen) == 4 * 3
    # the index is the number of finished episodes: two parallel envs share it within a round
    assert sorted({e for e, _ in seen}) == ([2, 3, 4, 5] if n_envs == 1 else [2, 4])
    assert all(s == pytest.approx(0.5 * 0.95 ** (e - 2)) for e, s in seen)
    acts = model.replay_buffer.actions[: model.replay_buffer.size()].ravel()
    assert len(acts) == 18 and np.all(np.abs(acts) <= 1.0)


# ---------------------------------------------------------------------------------------------- episode reward
def test_episode_reward_buffer_commits_whole_episodes_with_final_reward():
    from gymnasium import spaces

    obs_space = spaces.Box(0, 1, (3,), np.float32)
    act_space = spaces.Box(-1, 1, (1,), np.float32)
    buf = EpisodeRewardReplayBuffer(100, obs_space, act_space, device="cpu", n_envs=2, baseline_alpha=0.5)
    o = np.zeros((2, 3), np.float32)
    infos = [{}, {}]
    buf.add(o, o, np.zeros((2, 1)), np.array([0.0, 0.0]), np.array([False, False]), infos)
    buf.add(o, o, np.zeros((2, 1)), np.array([0.0, 0.0]), np.array([False, False]), infos)
    assert buf.size() == 0  # nothing is sampleable before an episode's reward is known
    with pytest.raises(RuntimeError, match="no episode has finished"):
        buf.sample(4)
    buf.add(o, o, np.zeros((2, 1)), np.array([0.8, 0.0]), np.array([True, False]), infos)
    assert buf.size() == 3
    assert np.allclose(buf.rewards[:3, 0], 0.8) and list(buf.dones[:3, 0]) == [0, 0, 1]
    buf.add(o, o, np.zeros((2, 1)), np.array([0.0, 0.4]), np.array([False, True]), infos)
    assert buf.size() == 7 and np.allclose(buf.rewards[3:7, 0], 0.4)
    # sampling subtracts AMC's moving average of the sampled rewards
    np.random.seed(0)
    batch = buf.sample(64)
    assert buf.baseline == pytest.approx(float((batch.rewards + buf.baseline).mean()))
    raw = (batch.rewards + buf.baseline).numpy().ravel()
    assert np.all(np.isclose(raw, 0.8, atol=1e-6) | np.isclose(raw, 0.4, atol=1e-6))


def test_ddpg_episode_reward_in_training_credits_every_transition(tmp_path):
    """AMC's case: in DDPG's replay buffer every transition of an episode carries that episode's final reward."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    kwargs = synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5)
    n_envs, n_groups, episodes = 2, 3, 8
    vec = DummyVecEnv([EnvFactory(ENV_ID, kwargs) for _ in range(n_envs)])
    res = resolve("ddpg", {**get_preset("ddpg", ENV_ID), "warmup_episodes": 2}, episode_len=n_groups,
                  n_envs=n_envs, action_dim=1)
    assert res.kwargs["replay_buffer_class"] is EpisodeRewardReplayBuffer
    model = ALGOS["ddpg"](env=vec, seed=0, **res.kwargs)
    model.set_logger(Logger(None, []))  # no /tmp/SB3-* folder
    finals = []

    from stable_baselines3.common.callbacks import BaseCallback

    class Finals(BaseCallback):
        def _on_step(self) -> bool:
            for i in np.flatnonzero(self.locals["dones"]):
                finals.append(self.locals["infos"][i]["accuracy"])
            return True

    model.learn(total_timesteps=episodes * n_groups, callback=Finals())
    buf = model.replay_buffer
    assert buf.size() == episodes * n_groups and model._n_updates > 0
    rewards = buf.rewards[: buf.size(), 0].reshape(episodes, n_groups)
    assert np.allclose(rewards, rewards[:, :1])  # constant within each episode
    assert np.allclose(sorted(rewards[:, 0]), sorted(finals))  # and equal to the episode's final reward
    assert np.all(buf.dones[: buf.size(), 0].reshape(episodes, n_groups) == [0, 0, 1])


def test_on_policy_episode_baseline_wrapper():
    kwargs = synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5)
    env = EpisodeBaselineWrapper(gym.make(ENV_ID, **kwargs), alpha=0.5)
    shaped, raw = [], []
    for a in (1.0, -1.0, 0.5):
        env.reset(seed=0)
        rewards = []
        for _ in range(3):
            _, r, terminated, truncated, info = env.step(np.array([a], np.float32))
            rewards.append(r)
        assert rewards[:2] == [0.0, 0.0] and terminated
        shaped.append(rewards[-1])
        raw.append(info["raw_reward"])
    assert shaped[0] == 0.0  # the first episode is its own baseline
    assert shaped[1] == pytest.approx(raw[1] - raw[0])
    assert shaped[2] == pytest.approx(raw[2] - (raw[0] + 0.5 * (raw[1] - raw[0])))


def test_ppo_with_episode_reward_and_two_subprocess_envs(tmp_path):
    """--n-envs 2 (SubprocVecEnv) with the on-policy episode-level reward: episodes from both workers are logged,
    best.json keeps the env's raw reward (not the baseline-shifted one)."""
    kwargs = synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5)
    run = train("ppo", ENV_ID, kwargs, episodes=8, n_envs=2, seed=0, out=tmp_path, progress=False,
                tensorboard=False, episode_reward=True, n_steps_episodes=2)
    rows = read_csv(run / "episodes.csv")
    assert len(rows) == 8 and {r["env"] for r in rows} == {"0", "1"}
    assert all(float(r["reward"]) == float(r["accuracy"]) for r in rows)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["n_envs"] == 2 and cfg["hyperparams"]["gae_lambda"] == 1.0 and cfg["hyperparams"]["n_steps"] == 6
    best = json.loads((run / "best.json").read_text())
    assert best["reward"] == max(float(r["accuracy"]) for r in rows)


def test_policy_checks_in_a_worker_are_recorded_in_order_with_their_own_snapshots(tmp_path):
    """--n-envs 2: the policy checks run in a third worker while training goes on. Each check's row names the
    episodes it was taken at, and selected.zip is the snapshot of the check selected.json records (it replays to
    that check's score), not the policy of the later step at which the result came back."""
    from agents.common import SELECTED_MODEL_FILE

    kwargs = synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5)
    run = train("ppo", ENV_ID, kwargs, episodes=8, n_envs=2, seed=0, out=tmp_path / "checked", progress=False,
                tensorboard=False, select_every=2, n_steps_episodes=1)
    plain = train("ppo", ENV_ID, kwargs, episodes=8, n_envs=2, seed=0, out=tmp_path / "plain", progress=False,
                  tensorboard=False, n_steps_episodes=1)
    episodes = [[(r["reward"], r["keep_ratios"]) for r in read_csv(d / "episodes.csv")] for d in (run, plain)]
    assert episodes[0] == episodes[1]  # checking the policy does not change what it trains on
    checks = read_csv(run / "selection.csv")
    assert [int(c["episodes"]) for c in checks] == [2, 4, 6, 8]
    assert len({c["keep_ratios"] for c in checks}) > 1  # the policy changed between checks
    selected = json.loads((run / "selected.json").read_text())
    rewards = [float(c["reward"]) for c in checks]
    assert selected["reward"] == max(rewards) and selected["check"] == rewards.index(max(rewards)) + 1
    assert not (run / "check.zip").exists()
    policy = ALGOS["ppo"].load(run / SELECTED_MODEL_FILE, device="cpu")
    was = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker that scored it (BN statistics depend on the thread count)
    try:
        assert run_episode(gym.make(ENV_ID, **kwargs), policy)[1]["accuracy"] == selected["accuracy"]
    finally:
        torch.set_num_threads(was)


def test_timestep_budget(tmp_path):
    kwargs = synthetic_kwargs(k=4, copies=2, depth=1, budget=0.5)
    run = train("a2c", ENV_ID, kwargs, timesteps=30, seed=0, out=tmp_path, progress=False, tensorboard=False)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["timesteps_done"] == 30 and cfg["episodes"] is None and cfg["hyperparams"]["n_steps"] == 3
    assert len(read_csv(run / "episodes.csv")) == 10  # 3-step episodes


def test_parallel_workers_never_build_caches_the_parent_does(monkeypatch):
    # --n-envs K: the env is built once in the parent (checkpoint, data and predictor caches are written there),
    # then K workers that may only read them (train_if_missing=False) and print nothing.
    from agents import common

    made, workers = [], []

    class FakeEnv:
        def close(self):
            pass

    class FakeSubproc:
        def __init__(self, factories, start_method=None):
            workers.extend(factories)

    monkeypatch.setattr(common.gym, "make", lambda env_id, **kw: made.append((env_id, kw)) or FakeEnv())
    monkeypatch.setattr("stable_baselines3.common.vec_env.SubprocVecEnv", FakeSubproc)
    common.make_vec_env("ChannelPrune-ResNet20-v0", {"budget": 0.5}, n_envs=3)
    assert made == [("ChannelPrune-ResNet20-v0", {"budget": 0.5})]
    assert len(workers) == 3
    assert all(w.env_kwargs == {"budget": 0.5, "train_if_missing": False, "progress": False} and w.single_thread
               for w in workers)
