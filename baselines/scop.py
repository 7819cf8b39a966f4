"""SCOP (Tang, Wang, Xu, Xu, Xu, Tao, Xu, "SCOP: Scientific Control for Reliable Neural Network Pruning",
NeurIPS 2020).

A channel is kept when the network prefers it to a *knockoff* of itself: a feature computed from knockoff inputs
that share the data's distribution but carry no information about the label beyond it (the scientific
control). With the network weights frozen, a mixing factor per channel is learned at every group's BN outputs:

    fit a knockoff generator to the data; x~ <- knockoffs of a batch x
    for each step:
        forward x and x~ together; at every group's BN output
            feature_real = beta * f(x) + (1 - beta) * f(x~),  feature_knockoff = f(x~)
        minimize the cross-entropy of the real branch w.r.t. beta = sigmoid(theta) only
    score_j = |gamma_j| * (beta_j - (1 - beta_j)) = |gamma_j| (2 beta_j - 1)
    keep the channels of largest score

Details and deviations:

* Knockoffs: Gaussian model-X knockoffs stand in for the paper's deep generator. The mean and covariance of the
  calibration images are fitted after average pooling (by the smallest factor that leaves at most ``max_dim``
  numbers per image, e.g. 2 for 28x28x1: 196), and knockoffs are **independent** samples of N(mu, Sigma),
  upsampled (nearest) to the image size. The equicorrelated construction (``x~ | x``) is not used: for images the
  smallest eigenvalue of the pixel correlation matrix is ~0, so its ``s = 2 lambda_min`` is ~0 and the knockoffs
  would copy their inputs. Independent samples have the data's first two moments (at the modelled resolution)
  and no dependence on the label, which is what the control needs here.
* beta starts at 0.5 (theta = 0), so a channel's score is 0 until the loss says which side it prefers. A
  residual stream shares one beta per channel across all of its BNs (its channels are coupled); a group without
  BN mixes at its producers' outputs with |gamma| = 1. BN runs in inference mode (running statistics) so the
  frozen network is exactly the base network.
* A small step budget instead of the paper's epochs: ``steps`` (default 150) batches of 32 real + 32 knockoff
  images from the training split, Adam with lr 0.05, sized so ResNet-18 stays within ~3 minutes on 2 cores;
  ``steps=`` runs longer. The betas are cached per checkpoint, steps and settings (``<checkpoint>.scop-....pt``,
  loaded with ``weights_only=True``), or in memory (keyed by a hash of the weights) without a checkpoint file.
* Ratios: by default the paper's, one keep ratio for every layer (``allocation="uniform"``, fitted to the
  budget), the SCOP scores choosing which channels each layer keeps. ``allocation="global"`` instead puts one
  global threshold on the scores (Network-Slimming style: per group, the fraction of channels above it, at least
  ``min_keep``), lowered as far as the budget allows, then ``fit_to_budget`` scales the plan to the budget: the
  scores then also decide the per-layer ratios (a deviation; the default before 2026-11-25).
* Device: the mixing factors are learned on the env's device (a copy of the network and the batches are moved
  there); batch indices and knockoffs are drawn on the CPU from the seeded generator, so the batches are the same
  on every device; the betas come back as CPU tensors.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from envs.budget import largest_on_grid
from envs.channel_prune import ChannelPruneEnv
from envs.data import Split
from envs.groups import GroupGraph
from envs.machine import resolve_device
from envs.paths import atomic_save

from .base import Baseline, cost_of_ratios, fit_to_budget, on_device, register

_MEMORY_CACHE: dict[tuple, list[torch.Tensor]] = {}


class GaussianKnockoffs:
    """N(mu, Sigma) fitted to (average-pooled) images; ``sample`` draws independent knockoff images."""

    def __init__(self, images: torch.Tensor, max_dim: int = 256, ridge: float = 1e-4):
        if images.ndim != 4 or len(images) < 2:
            raise ValueError(f"images has shape {tuple(images.shape)}; expected (N >= 2, C, H, W)")
        if not (isinstance(max_dim, int) and max_dim >= 1):
            raise ValueError(f"max_dim={max_dim!r} must be a positive integer")
        _, c, h, w = images.shape
        self.shape = (c, h, w)
        self.pool = 1
        while c * math.ceil(h / self.pool) * math.ceil(w / self.pool) > max_dim and self.pool < max(h, w):
            self.pool += 1
        z = self.reduce(images).double()
        self.mean = z.mean(0)
        zc = z - self.mean
        self.cov = zc.T @ zc / (len(z) - 1)
        d = self.cov.shape[0]
        # a little ridge keeps the factor real when the sample covariance is singular (N <= dim, constant pixels)
        jitter = ridge * float(torch.diagonal(self.cov).mean()) * torch.eye(d, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(self.cov + jitter)
        self.factor = evecs * evals.clamp_min(0).sqrt()  # Sigma = factor @ factor.T

    @property
    def reduced_shape(self) -> tuple[int, int, int]:
        c, h, w = self.shape
        return c, math.ceil(h / self.pool), math.ceil(w / self.pool)

    def reduce(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the modelled vectors (N, dim): average-pooled by ``pool`` and flattened."""
        if self.pool > 1:
            images = F.avg_pool2d(images, self.pool, self.pool, ceil_mode=True)
        return images.flatten(1)

    def sample_reduced(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, dim) draws of N(mu, Sigma)."""
        eps = torch.randn(n, self.factor.shape[1], generator=generator, dtype=torch.float64)
        return self.mean + eps @ self.factor.T

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W) float32 knockoff images."""
        z = self.sample_reduced(n, generator).float().view(n, *self.reduced_shape)
        if self.pool > 1:
            z = F.interpolate(z, scale_factor=self.pool, mode="nearest")[..., : self.shape[1], : self.shape[2]]
        return z.contiguous()


def _mix_sites(graph: GroupGraph) -> list[list[str]]:
    """Per group: the modules whose outputs are mixed (its BNs, or its producers when it has none)."""
    return [list(g.bns) if g.bns else list(g.producers) for g in graph.groups]


def gamma_magnitudes(model: nn.Module, graph: GroupGraph) -> list[np.ndarray]:
    """Per group: mean |gamma| over its BNs (1 for a group without BN)."""
    mods = dict(model.named_modules())
    out = []
    for g in graph.groups:
        bns = [mods[n] for n in g.bns if getattr(mods[n], "weight", None) is not None]
        if not bns:
            out.append(np.ones(g.num_channels))
        else:
            out.append((sum(m.weight.detach().abs() for m in bns) / len(bns)).double().cpu().numpy())
    return out


def learn_betas(
    model: nn.Module,
    graph: GroupGraph,
    data: Split,
    knockoffs: GaussianKnockoffs,
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Learn the mixing factors beta (one per channel of every group) with the network frozen.

    Runs on ``device`` (a copy of ``model`` is moved there unless it is there already); returns CPU tensors.
    """
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    gen = torch.Generator().manual_seed(int(seed))
    dev = resolve_device(device)
    model = on_device(model, dev)
    mods = dict(model.named_modules())
    thetas = [torch.zeros(g.num_channels, device=dev, requires_grad=True) for g in graph.groups]
    sites = _mix_sites(graph)
    half = {"n": 0}

    def make_hook(gi: int):
        def hook(_m, _inp, out):
            n = half["n"]
            beta = torch.sigmoid(thetas[gi]).view(1, -1, *([1] * (out.ndim - 2)))
            return torch.cat([beta * out[:n] + (1 - beta) * out[n:], out[n:]], 0)
        return hook

    hooks = [mods[name].register_forward_hook(make_hook(gi)) for gi, names in enumerate(sites) for name in names]
    was = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()  # BN with running statistics: the frozen network is the base network
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(thetas, lr=lr)
    try:
        for _ in tqdm(range(steps), desc="SCOP mixing factors", disable=not progress, mininterval=2.0):
            idx = torch.randint(len(data), (batch_size,), generator=gen)
            x, y = data.x[idx], data.y[idx].to(dev)
            half["n"] = len(x)
            out = model(torch.cat([x, knockoffs.sample(len(x), gen)], 0).to(dev))
            loss = F.cross_entropy(out[: len(x)], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was)
    return [torch.sigmoid(t.detach()).cpu() for t in thetas]


def scop_scores(betas: list[torch.Tensor], gammas: list[np.ndarray]) -> list[np.ndarray]:
    """score = |gamma| * (2 beta - 1): positive when the real feature beats its knockoff."""
    return [np.asarray(gm, dtype=np.float64) * (2.0 * b.double().cpu().numpy() - 1.0)
            for b, gm in zip(betas, gammas)]


def _structure_key(graph: GroupGraph) -> str:
    h = hashlib.sha1()
    for g in graph.groups:
        h.update(f"{g.name}:{g.num_channels}:{','.join(g.bns or g.producers)}|".encode())
    return h.hexdigest()[:10]


def _weights_fingerprint(model: nn.Module) -> str:
    """A hash of the model's weights: the in-memory cache key when there is no checkpoint file."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class SCOPScorer:
    """Learns (or loads) the betas for the context's model and returns the SCOP scores."""

    name = "scop"

    def __init__(self, checkpoint: str | Path | None, steps: int = 150, batch_size: int = 32, lr: float = 0.05,
                 seed: int = 0, max_dim: int = 256, progress: bool = True):
        self.checkpoint, self.steps, self.batch_size, self.lr = checkpoint, steps, batch_size, lr
        self.seed, self.max_dim, self.progress = seed, max_dim, progress
        self.betas: list[torch.Tensor] | None = None

    def _key(self, ctx) -> str:
        return (f"scop-{_structure_key(ctx.graph)}-s{self.steps}-b{self.batch_size}-lr{self.lr:g}-seed{self.seed}"
                f"-d{self.max_dim}-c{len(ctx.calib)}")

    def scores(self, ctx) -> list[np.ndarray]:
        if self.betas is None:
            self.betas = self._load_or_learn(ctx)
        return scop_scores(self.betas, gamma_magnitudes(ctx.model, ctx.graph))

    def _load_or_learn(self, ctx) -> list[torch.Tensor]:
        key = self._key(ctx)
        path = None if self.checkpoint is None else Path(f"{self.checkpoint}.{key}.pt")
        mem_key = (_weights_fingerprint(ctx.model), key)
        if path is not None and path.exists():
            try:
                return list(torch.load(path, map_location="cpu", weights_only=True)["betas"])
            except Exception as exc:  # noqa: BLE001 - a damaged cache is recomputed, not fatal
                print(f"recomputing unreadable SCOP cache {path}: {exc}", file=sys.stderr)
        elif path is None and mem_key in _MEMORY_CACHE:
            return _MEMORY_CACHE[mem_key]
        knock = GaussianKnockoffs(ctx.calib.x, max_dim=self.max_dim)
        data = ctx.train if ctx.train is not None else ctx.calib
        betas = learn_betas(ctx.model, ctx.graph, data, knock, self.steps, self.batch_size, self.lr, self.seed,
                            self.progress, device=ctx.device)
        if path is None:
            _MEMORY_CACHE[mem_key] = betas
        else:
            atomic_save({"betas": betas}, path)
        return betas


def threshold_plan(env: ChannelPruneEnv, scores: list[np.ndarray], budget: float | None = None) -> np.ndarray:
    """Per-group keep ratios from the lowest global score threshold whose plan still meets the budget."""
    budget = env.budget if budget is None else budget

    def plan(tau: float) -> np.ndarray:
        return np.array([max(env.min_keep, float(np.mean(s > tau))) for s in scores])

    if cost_of_ratios(env, np.ones(len(scores))) <= budget:
        return np.ones(len(scores))
    cuts = np.unique(np.concatenate(scores))  # keeping "> cuts[k]" for k = 0.. removes more and more
    # plan(cuts[-1]) keeps min_keep everywhere (fits: the env checked reachability); the cost falls with k, so the
    # smallest fitting k is the largest fitting v = last - k on the grid search the action wall uses
    last = len(cuts) - 1
    v = largest_on_grid(0, last, lambda v: cost_of_ratios(env, plan(cuts[last - v])) <= budget)
    return plan(cuts[last - v])


@register("scop")
class SCOP(Baseline):
    """Options: ``steps`` (150), ``batch_size`` (32), ``lr`` (0.05), ``max_dim`` (256), ``progress`` (True),
    ``allocation`` ("uniform": the paper's one rate for every layer; "global": one threshold on the scores)."""

    def prepare(self) -> ChannelPruneEnv:
        o = self.options
        self.scorer = SCOPScorer(self.env.problem.checkpoint_file, steps=int(o.get("steps", 150)),
                                 batch_size=int(o.get("batch_size", 32)), lr=float(o.get("lr", 0.05)),
                                 seed=self.seed, max_dim=int(o.get("max_dim", 256)),
                                 progress=bool(o.get("progress", True)))
        return self.env.derive(scorer=self.scorer)

    def plan(self) -> np.ndarray:
        env = self.eval_env
        allocation = self.options.get("allocation", "uniform")
        if allocation == "uniform":
            return fit_to_budget(env, np.ones(env.n_groups))
        if allocation == "global":
            return fit_to_budget(env, threshold_plan(env, env.static_scores))
        raise ValueError(f"allocation={allocation!r} is not allowed; allowed: uniform, global")
