"""ChannelPrune: a Gymnasium environment for reinforcement-learning channel pruning.

Importing this package registers the environment ids (``gym.make`` also accepts each without ``-v0``: Gymnasium
then picks the latest version)::

    ChannelPrune-v0              any model: pass model= (a zoo name or an nn.Module with data= and example_input=)
    ChannelPrune-ResNet18-v0     CIFAR-style ResNet-18 on Fashion-MNIST (12 groups)
    ChannelPrune-ResNet20-v0     ResNet-20 (12 groups)
    ChannelPrune-ResNet56-v0     ResNet-56 (30 groups)
    ChannelPrune-VGG16-v0        VGG-16-BN (13 groups)
    ChannelPrune-MobileNetV2-v0  MobileNetV2 with CIFAR strides (25 groups)

All take the keyword arguments of :class:`envs.channel_prune.ChannelPruneEnv`. No id has a ``TimeLimit``: an
episode lasts one step per channel group of whatever model it prunes.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from .channel_prune import ChannelPruneEnv
from .problem import PruningProblem

ZOO_IDS = {
    "ChannelPrune-ResNet18-v0": "resnet18",
    "ChannelPrune-ResNet20-v0": "resnet20",
    "ChannelPrune-ResNet56-v0": "resnet56",
    "ChannelPrune-VGG16-v0": "vgg16_bn",
    "ChannelPrune-MobileNetV2-v0": "mobilenetv2",
}
GENERIC_ID = "ChannelPrune-v0"
# every registered id -> its default kwargs
ENV_IDS: dict[str, dict] = {GENERIC_ID: {},
                             **{i: {"model": m, "dataset": "fashion-mnist"} for i, m in ZOO_IDS.items()}}

for _env_id, _kwargs in ENV_IDS.items():
    if _env_id not in registry:
        register(id=_env_id, entry_point="envs.channel_prune:ChannelPruneEnv", kwargs=dict(_kwargs),
                 max_episode_steps=None)


def resolve_env_id(env_id: str) -> str:
    """The registered id for ``env_id`` (an unversioned name means its latest version); ValueError otherwise."""
    versioned = env_id if env_id in ENV_IDS else f"{env_id}-v0"
    if versioned not in ENV_IDS:
        raise ValueError(f"env_id={env_id!r} is not a ChannelPrune environment; allowed: {', '.join(ENV_IDS)} "
                         "(or any of them without -v0)")
    return versioned


__all__ = ["resolve_env_id", "ChannelPruneEnv", "PruningProblem", "ENV_IDS", "GENERIC_ID", "ZOO_IDS"]
