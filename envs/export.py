"""Export the physically pruned network of a policy: weights, a pickle-free channel config, ONNX and a report.

    from envs.export import export_policy, export_pruned, load_exported
    export_policy("best.json", "model/", finetune_steps=500)   # or export_pruned(env, kept_counts, "model/")

The command line (which can also export a baseline's plan) is ``python -m baselines.experiments.export``; it sits
above ``envs`` because a baseline's plan needs ``baselines``, which ``envs`` does not import.

The network is pruned exactly as the environment prunes it at the end of an episode (Torch-Pruning's handlers, i.e.
DepGraph, Fang et al., CVPR 2023, on a copy of the base model, the env's compensation if it has one, then BatchNorm
recalibration on the calibration split), so the exported weights carry the recalibrated BN statistics and the
exported model's accuracy on the reward split equals ``info["accuracy"]`` that the env reports for the same plan.
The plan is replayed through the env to check that: a plan the env's budget wall would change is rejected (given as
``kept_counts``), or the wall's result is exported (given as ``keep_ratios``, the way the env applies actions).

Files written to ``out_dir``:

* ``model.pt``: ``torch.save(state_dict)`` (tensors only; load with ``torch.load(..., weights_only=True)``).
* ``config.json``: plain JSON that rebuilds the network without pickle: the zoo model name, ``width``,
  ``num_classes``, ``in_channels``, ``image_size`` and, for every Conv2d / BatchNorm / Linear module, its
  ``in`` / ``out`` channel counts (and ``groups`` for convs, so depthwise convs stay depthwise). ``load_exported``
  builds the zoo model, swaps each of those modules for a fresh one with the recorded channel counts (kernel,
  stride, padding, dilation and bias from the zoo module) and loads the weights with ``strict=True``. It also
  records the env id / kwargs and the kept channel indices of every group (indices into the unpruned network).
* ``model.onnx``: ``torch.onnx.export`` with opset 17 and a dynamic batch axis (input ``input``, output
  ``logits``), when ``onnx`` is importable (the ``export`` extra); checked against torch with onnxruntime when
  that is importable. The TorchScript exporter (``dynamo=False``) is used because the dynamo exporter needs
  ``onnxscript``, which the project does not depend on.
* ``report.json``: reward-split accuracy of the exported model (reloaded from the files) and the env's own
  accuracy for the plan, test accuracy, MACs and parameters of the exported and unpruned networks (``envs.cost``;
  the FLOPs reduction factor is unpruned / exported MACs), CPU latency at batch 1 and 64 (``latency``:
  ``envs.cost.compare_latency``, timed by ``torch.utils.benchmark.Timer``; the best of 3 alternating rounds, as
  other processes inflate single medians) of both and the speed-up, and the fine-tuning applied
  (``envs.finetune``). When the env's device is a GPU, the same on the GPU (``latency_device``). Each latency
  block and the report itself name their machine (``envs.machine.backend(device).machine``): ``machine`` is the
  env's device (evaluation, fine-tune), ``latency.machine`` the CPU and threads that timed the CPU latency.

Only static pruning is exported physically: runtime gates choose channels per input, which a fixed-shape network
cannot express. For a runtime-mode env the statically pruned network (every kept channel computed) is exported;
the report says so and keeps the env's gated accuracy and effective-FLOPs ratio next to the static network's.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .cost import compare_latency, count_macs, count_params
from .episodes import actions_of_ratios, run_actions, unwrap
from .finetune import finetune
from .machine import backend
from .models import build_model

FORMAT = "channelprune-export/1"
CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE, REPORT_FILE = "config.json", "model.pt", "model.onnx", "report.json"
LATENCY_BATCHES = (1, 64)
LATENCY_ROUNDS = 3
_BN_TYPES = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}


# ---------------------------------------------------------------------------------------------- config / rebuild
def channel_config(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"type", "in", "out"[, "groups"]}}`` for every Conv2d, BatchNorm and Linear of ``model``."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"type": "Conv2d", "in": int(m.in_channels), "out": int(m.out_channels),
                         "groups": int(m.groups)}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"type": type(m).__name__, "in": int(m.num_features), "out": int(m.num_features)}
        elif isinstance(m, nn.Linear):
            out[name] = {"type": "Linear", "in": int(m.in_features), "out": int(m.out_features)}
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _resized(name: str, old: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """A fresh module like ``old`` with the channel counts of ``spec``."""
    kind = spec.get("type")
    try:
        c_in, c_out = int(spec["in"]), int(spec["out"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"config module {name!r}: {spec!r} needs integer 'in' and 'out' channel counts") from exc
    if c_in < 1 or c_out < 1:
        raise ValueError(f"config module {name!r}: channel counts in={c_in}, out={c_out} must be >= 1")
    if kind == "Conv2d" and isinstance(old, nn.Conv2d):
        groups = int(spec.get("groups", 1))
        if groups < 1 or c_in % groups or c_out % groups:
            raise ValueError(f"config module {name!r}: groups={groups} must divide in={c_in} and out={c_out}")
        return nn.Conv2d(c_in, c_out, old.kernel_size, old.stride, old.padding, old.dilation, groups,
                         bias=old.bias is not None, padding_mode=old.padding_mode)
    if kind in _BN_TYPES and isinstance(old, _BN_TYPES[kind]):
        if c_in != c_out:
            raise ValueError(f"config module {name!r}: a BatchNorm has in == out; got in={c_in}, out={c_out}")
        return _BN_TYPES[kind](c_out, eps=old.eps, momentum=old.momentum, affine=old.affine,
                               track_running_stats=old.track_running_stats)
    if kind == "Linear" and isinstance(old, nn.Linear):
        return nn.Linear(c_in, c_out, bias=old.bias is not None)
    raise ValueError(f"config module {name!r} has type {kind!r} but the zoo model's module is "
                     f"{type(old).__name__}; allowed types: Conv2d, {', '.join(_BN_TYPES)}, Linear")


def rebuild(config: dict[str, Any]) -> nn.Module:
    """The pruned network's skeleton (random weights) from a ``config.json`` dict, without pickle."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"config format {got!r} is not supported; expected {FORMAT!r}")
    for key in ("model", "width", "num_classes", "in_channels", "modules"):
        if key not in config:
            raise ValueError(f"config is missing {key!r}; it needs model, width, num_classes, in_channels and "
                             "modules")
    model = build_model(config["model"], int(config["num_classes"]), int(config["in_channels"]),
                        float(config["width"]))
    fresh = dict(model.named_modules())
    specs: dict[str, dict] = config["modules"]
    expected = set(channel_config(model))
    if set(specs) != expected:
        extra, missing = sorted(set(specs) - expected), sorted(expected - set(specs))
        raise ValueError(f"config modules do not match {config['model']!r}: unknown {extra[:5]}, missing "
                         f"{missing[:5]}")
    for name, spec in specs.items():
        _set_module(model, name, _resized(name, fresh[name], spec))
    return model


def load_exported(out_dir: str | Path) -> nn.Module:
    """Rebuild the exported network from ``config.json`` + ``model.pt`` (``weights_only=True``), in eval mode."""
    out_dir = Path(out_dir)
    cfg_path, w_path = out_dir / CONFIG_FILE, out_dir / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} does not exist; out_dir={str(out_dir)!r} must hold {CONFIG_FILE} "
                                    f"and {WEIGHTS_FILE} written by envs.export (export_pruned / export_policy)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON: {exc}") from exc
    model = rebuild(config)
    state = torch.load(w_path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights {str(w_path)!r} do not fit the network of {str(cfg_path)!r}: "
                         f"{str(exc).splitlines()[-1].strip()[:300]}") from exc
    return model.eval()


# ---------------------------------------------------------------------------------------------- plans
def _check_counts(env, kept_counts: Sequence[int]) -> list[int]:
    try:
        kept = [int(k) for k in kept_counts]
        whole = all(float(k) == float(k0) for k, k0 in zip(kept, kept_counts))
    except (TypeError, ValueError):
        kept, whole = [], False
    if len(kept) != env.n_groups or not whole:
        raise ValueError(f"kept_counts={kept_counts!r} must be {env.n_groups} integers (one per group)")
    for g, k in zip(env.groups, kept):
        if not 1 <= k <= g.num_channels:
            raise ValueError(f"kept_counts[{g.index}]={k} for group {g.name!r} must be in [1, {g.num_channels}]")
    return kept


def _check_ratios(env, name: str, ratios: Sequence[float] | None) -> np.ndarray | None:
    if ratios is None:
        return None
    try:
        r = np.asarray(ratios, dtype=np.float64)
    except (TypeError, ValueError):
        r = np.full(0, np.nan)
    if r.shape != (env.n_groups,) or not np.all(np.isfinite(r)) or np.any(r <= 0) or np.any(r > 1 + 1e-9):
        shown = ratios.tolist() if isinstance(ratios, np.ndarray) else ratios
        raise ValueError(f"{name}={shown!r} must be {env.n_groups} finite ratios in (0, 1] (one per group)")
    return r


def replay(env, keep_ratios: Sequence[float], runtime_ratios: Sequence[float] | None = None,
           seed: int = 0) -> dict:
    """Run one episode whose actions map to ``keep_ratios`` (and ``runtime_ratios``); the env's final info.

    The env applies its rounding and budget wall exactly as for an agent, so ``info["kept_counts"]`` is the plan
    the env itself would prune with and ``info["accuracy"]`` what it reports for it.
    """
    env = unwrap(env)
    r = _check_ratios(env, "keep_ratios", keep_ratios)
    rr = _check_ratios(env, "runtime_ratios", runtime_ratios)
    run_actions(env, actions_of_ratios(r, rr, env.min_keep, env.mode == "runtime"), seed)
    return dict(env.last_info)


def replay_counts(env, kept_counts: Sequence[int], runtime_ratios: Sequence[float] | None = None,
                  seed: int = 0) -> dict:
    """``replay`` for exact channel counts; ValueError if the env's budget wall would change them."""
    env = unwrap(env)
    kept = _check_counts(env, kept_counts)
    info = replay(env, [k / g.num_channels for k, g in zip(kept, env.groups)], runtime_ratios, seed)
    if list(info["kept_counts"]) != kept:
        raise ValueError(f"kept_counts={kept} is not a plan this env produces: it applies {info['kept_counts']} "
                         f"(budget={env.budget} on {env.target}, budget_mode={env.budget_mode!r}, "
                         f"round_to={env.round_to}, min_keep={env.min_keep}); use the env the plan came from"
                         + ("; in runtime mode pass the plan's runtime_ratios too"
                            if env.mode == "runtime" and runtime_ratios is None else ""))
    return info


def static_pruned(env, kept_counts: Sequence[int]) -> nn.Module:
    """The env's statically pruned network for ``kept_counts`` (no runtime gates), BN recalibrated, eval mode."""
    env = unwrap(env)
    kept = _check_counts(env, kept_counts)
    pruned = env.problem.build_pruned(kept, gates=False)
    env.recalibrate_bn(pruned)
    return pruned.eval()


# ---------------------------------------------------------------------------------------------- export
def export_latency(exported: nn.Module, base: nn.Module, shape: tuple[int, ...], repeats: int,
                   batches: Sequence[int] = LATENCY_BATCHES, threads: int | None = None,
                   device: str | torch.device = "cpu") -> dict[str, Any]:
    """Seconds per forward pass of ``exported`` and ``base`` at each batch size, measured alternately on ``device``
    (``envs.cost.compare_latency``: the best of up to ``LATENCY_ROUNDS`` rounds of ``repeats`` passes in all), with
    the speed-up and the machine that was timed."""
    be = backend(device)
    rounds = min(LATENCY_ROUNDS, repeats)
    per_round = math.ceil(repeats / rounds)
    lat: dict[str, Any] = {"device": str(be.device), "machine": be.machine, "repeats": per_round * rounds,
                           "statistic": f"seconds per forward pass (torch.utils.benchmark.Timer): the smallest of "
                                        f"{rounds} medians of about {per_round} passes, exported and unpruned "
                                        "measured alternately"}
    if be.device.type == "cpu":
        lat["threads"] = int(threads or torch.get_num_threads())
    for b in batches:
        t_exp, t_base = compare_latency(exported, base, shape, b, threads, rounds, per_round, device=be.device)
        lat[f"batch{b}"] = {"exported_s": t_exp, "base_s": t_base, "speedup": t_base / t_exp}
    return lat


def jsonable_kwargs(d: dict) -> dict:
    """Env kwargs as JSON: plain values kept, anything else (a module, data splits, a scorer) as <TypeName>."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        else:
            out[k] = f"<{type(v).__name__}>"  # a module, data splits, a scorer object: not reproducible as JSON
    return out


def env_arch(env) -> dict[str, Any]:
    """Zoo name, width and data shape of an env built from a zoo model name (what ``config.json`` needs)."""
    env = unwrap(env)
    name = env.kwargs.get("model")
    if not isinstance(name, str):
        raise ValueError(f"the env's model is a {type(name).__name__}, not a zoo name; physical export rebuilds "
                         "zoo models only: pass arch={'model': <zoo name>, 'width': ...}")
    return {"model": name, "width": float(env.kwargs.get("width", 1.0))}


def _onnx_export(model: nn.Module, example: torch.Tensor, path: Path, check_x: torch.Tensor) -> dict[str, Any]:
    try:
        import onnx  # noqa: F401 - the export extra
    except ImportError:
        return {"file": None, "skipped": "onnx is not installed (pip install 'channelprune-gym[export]')"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), str(path), opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    out: dict[str, Any] = {"file": path.name, "opset": 17, "dynamic_batch": True}
    try:
        import onnxruntime as ort
    except ImportError:
        out["checked"] = "onnxruntime is not installed; not checked"
        return out
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(check_x).numpy()
    got = sess.run(None, {"input": check_x.numpy()})[0]
    out["max_abs_diff_vs_torch"] = float(np.abs(got - ref).max())
    out["check_batch"] = int(check_x.shape[0])
    return out


def export_pruned(
    env,
    kept_counts: Sequence[int],
    out_dir: str | Path,
    finetune_steps: int = 0,
    *,
    runtime_ratios: Sequence[float] | None = None,
    env_info: dict | None = None,
    arch: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    test_accuracy: bool = True,
    latency_repeats: int = 20,
    latency_batches: Sequence[int] = LATENCY_BATCHES,
    threads: int | None = None,
    onnx: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Export the statically pruned network of ``env`` for ``kept_counts`` to ``out_dir``; returns the report.

    ``env_info``: the env's final info for this plan (e.g. from an episode just run); default: replayed here
    (``replay_counts``). ``arch``: ``{"model": zoo name, "width": w}`` when the env was built from a module (a
    baseline's fine-tuned copy). ``finetune_steps`` > 0 fine-tunes the pruned network with ``envs.finetune``
    after the BN recalibration. ``latency_repeats=0`` skips the latency measurement.
    """
    env = unwrap(env)
    kept = _check_counts(env, kept_counts)
    if not (isinstance(finetune_steps, int) and finetune_steps >= 0):
        raise ValueError(f"finetune_steps={finetune_steps!r} must be an integer >= 0")
    if not (isinstance(latency_repeats, int) and latency_repeats >= 0):
        raise ValueError(f"latency_repeats={latency_repeats!r} must be an integer >= 0 (0 skips latency)")
    arch = dict(arch) if arch is not None else env_arch(env)
    if "model" not in arch:
        raise ValueError(f"arch={arch!r} must name the zoo 'model' (and its 'width')")
    if env_info is None:
        env_info = replay_counts(env, kept, runtime_ratios, seed)
    elif list(env_info.get("kept_counts", kept)) != kept:
        raise ValueError(f"env_info kept_counts {env_info.get('kept_counts')} differ from kept_counts={kept}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = env.data

    # --- the network, exactly as the env evaluates it (static part)
    pruned = static_pruned(env, kept)
    acc_pruned, loss_pruned = env.evaluate(pruned, "reward")
    ft: dict[str, Any] = {"steps": finetune_steps}
    if finetune_steps:
        pruned = finetune(pruned, data, finetune_steps, seed=seed, progress=progress, device=env.device)
        ft["reward_accuracy_before"], ft["reward_accuracy_after"] = acc_pruned, env.evaluate(pruned, "reward")[0]
        ft["recipe"] = ("envs.finetune defaults: SGD Nesterov lr 0.01 cosine, batch 64, wd 5e-4, "
                        "label smoothing 0.1")

    # --- files: weights, config; then reload from them (the report measures the reloaded model)
    groups = [{"index": g.index, "name": g.name, "kind": g.kind, "channels": g.num_channels, "kept": k,
               "kept_channels": [int(c) for c in idx]}
              for g, k, idx in zip(env.groups, kept, env.kept_channels(kept))]
    config = {
        "format": FORMAT, "model": arch["model"], "width": float(arch.get("width", 1.0)),
        "num_classes": int(data.num_classes), "in_channels": int(data.in_channels),
        "image_size": int(data.image_size), "dataset": data.name, "mean": list(data.mean), "std": list(data.std),
        "modules": channel_config(pruned), "kept_counts": kept, "groups": groups,
        "source": source or {}, "env_kwargs": jsonable_kwargs(env.kwargs),
    }
    state = {k: v.detach().clone().contiguous() for k, v in pruned.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    exported = load_exported(out_dir)
    check_x = data.reward.x[:16]
    with torch.no_grad():
        roundtrip_diff = float((exported(check_x) - pruned(check_x)).abs().max())

    # --- accuracy, cost, latency of the exported vs the unpruned network
    acc, loss = env.evaluate(exported, "reward")
    env_acc = env_info.get("accuracy")
    report: dict[str, Any] = {
        "format": FORMAT, "source": source or {}, "model": arch["model"], "width": config["width"],
        "device": str(env.device), "machine": backend(env.device).machine,
        "mode": env.mode, "kept_counts": kept,
        "keep_ratios": [k / g.num_channels for k, g in zip(kept, env.groups)],
        "reward_accuracy": acc, "reward_loss": loss,
        "env_accuracy": env_acc,
        "pruned_reward_accuracy": acc_pruned,  # before fine-tuning; equals env_accuracy in static mode
        # the env's number for the plan is reproduced by the pruned network and, unless fine-tuned, by the files
        "accuracy_matches_env": (env.mode == "static" and env_acc is not None and acc_pruned == env_acc
                                 and (finetune_steps > 0 or acc == env_acc)),
        "roundtrip_max_abs_diff": roundtrip_diff,
        "base_reward_accuracy": env.evaluate(env.base_model, "reward")[0],
        "finetune": ft,
    }
    if env.mode == "runtime":
        report["note"] = ("runtime mode: the statically pruned network is exported (every kept channel computed); "
                          "runtime gates choose channels per input and are not part of a fixed-shape network. "
                          "env_accuracy and env_effective_flops_ratio are the gated network's.")
        report["env_effective_flops_ratio"] = env_info.get("effective_flops_ratio")
        report["runtime_ratios"] = env_info.get("runtime_ratios")
    else:
        report["note"] = "static mode: the exported network is the env's pruned network (BN recalibrated)"
    if test_accuracy:
        report["test_accuracy"] = env.evaluate(exported, "test")[0]
        report["base_test_accuracy"] = env.evaluate(env.base_model, "test")[0]
    example = data.example_input(1)
    macs, base_macs = count_macs(exported, example), count_macs(env.base_model, example)
    params, base_params = count_params(exported), count_params(env.base_model)
    report.update({
        "macs": macs, "base_macs": base_macs, "flops_ratio": macs / base_macs,
        "flops_reduction": base_macs / macs, "env_flops_ratio": env_info.get("flops_ratio"),
        "macs_match_env_cost_model": macs == env.graph.macs(kept),
        "params": params, "base_params": base_params, "params_ratio": params / base_params,
        "params_reduction": base_params / params,
    })
    if latency_repeats:
        shape = tuple(example.shape[1:])
        report["latency"] = export_latency(exported, env.base_model, shape, latency_repeats, latency_batches,
                                           threads, "cpu")
        if env.device.type == "cuda":
            report["latency_device"] = export_latency(exported, env.base_model, shape, latency_repeats,
                                                      latency_batches, threads, env.device)
    onnx_info: dict[str, Any] = {"file": None, "skipped": "onnx=False"}
    if onnx:
        onnx_info = _onnx_export(exported, example, out_dir / ONNX_FILE, data.reward.x[:8])
    report["onnx"] = onnx_info
    report["files"] = sorted(p.name for p in out_dir.iterdir() if p.is_file()) + [REPORT_FILE]
    report["files"] = sorted(set(report["files"]))
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1, allow_nan=False))
    if env.mode == "static" and not report["accuracy_matches_env"]:
        print(f"warning: exported accuracy {acc_pruned} differs from the env's {env_acc}", file=sys.stderr)
    return report


# ---------------------------------------------------------------------------------------------- policies
def load_policy(path: str | Path) -> dict[str, Any]:
    """Read and check a policy file (a run's ``best.json``): env_id, env_kwargs, keep_ratios / kept_counts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy file {str(path)!r} does not exist")
    try:
        policy = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"policy file {str(path)!r} is not valid JSON: {exc}") from exc
    check_policy(policy, str(path))
    return policy


def check_policy(policy: Any, where: str = "policy") -> None:
    if not isinstance(policy, dict):
        raise ValueError(f"{where} must be a JSON object; got {type(policy).__name__}")
    if not isinstance(policy.get("env_id"), str):
        raise ValueError(f"{where} needs a string 'env_id' (e.g. 'ChannelPrune-ResNet18-v0'); got "
                         f"{policy.get('env_id')!r}")
    if not isinstance(policy.get("env_kwargs", {}), dict):
        raise ValueError(f"{where}: 'env_kwargs' must be an object; got {policy.get('env_kwargs')!r}")
    if policy.get("kept_counts") is None and policy.get("keep_ratios") is None:
        raise ValueError(f"{where} needs 'kept_counts' or 'keep_ratios' (one entry per group)")


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None):
    """``gym.make(env_id, **env_kwargs).unwrapped`` with a clear error for an unknown id."""
    import gymnasium as gym

    import envs  # noqa: F401 - registers the ids

    try:
        return gym.make(env_id, **(env_kwargs or {})).unwrapped
    except gym.error.Error as exc:
        known = sorted(k for k in gym.registry if k.startswith("ChannelPrune"))
        raise ValueError(f"env_id={env_id!r} cannot be made ({exc}); registered: {', '.join(known)}") from exc


def _split_ratios(policy: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    kr = policy.get("keep_ratios")
    rr = policy.get("runtime_ratios")
    if kr is not None:
        kr = np.asarray(kr, dtype=np.float64)
        if kr.ndim == 2 and kr.shape[1] == 2:  # (n_groups, 2): static and runtime ratios
            kr, rr = kr[:, 0], (kr[:, 1] if rr is None else rr)
    return kr, rr


def export_policy(policy: dict[str, Any] | str | Path, out_dir: str | Path, env=None,
                  env_overrides: dict[str, Any] | None = None, **kwargs) -> dict:
    """Export a policy (a dict or a ``best.json`` path); ``env``: use this env instead of making ``env_id``."""
    source: dict[str, Any] = {"kind": "policy"}
    if not isinstance(policy, dict):
        source["file"] = str(policy)
        policy = load_policy(policy)
    check_policy(policy)
    env_kwargs = dict(policy.get("env_kwargs") or {})
    env_kwargs.update(env_overrides or {})
    if policy.get("min_keep") is not None:
        if "min_keep" in env_kwargs and not math.isclose(float(env_kwargs["min_keep"]), float(policy["min_keep"])):
            raise ValueError(f"policy min_keep={policy['min_keep']!r} differs from env_kwargs min_keep="
                             f"{env_kwargs['min_keep']!r}")
        env_kwargs["min_keep"] = float(policy["min_keep"])
    source.update(env_id=policy["env_id"], env_kwargs=jsonable_kwargs(env_kwargs))
    env = unwrap(env) if env is not None else make_env(policy["env_id"], env_kwargs)
    kr, rr = _split_ratios(policy)
    if policy.get("kept_counts") is not None:
        kept = policy["kept_counts"]
        info = replay_counts(env, kept, rr, kwargs.get("seed", 0))
    else:
        info = replay(env, kr, rr, kwargs.get("seed", 0))
        kept = info["kept_counts"]
    return export_pruned(env, kept, out_dir, env_info=info, source=source, **kwargs)
