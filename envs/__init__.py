"""ChannelPrune: a Gymnasium environment for reinforcement-learning channel pruning.

Importing this package registers the environment ids::

    ChannelPrune-ResNet18      CIFAR-style ResNet-18 on Fashion-MNIST (12 groups)
    ChannelPrune-ResNet20      ResNet-20 (12 groups)
    ChannelPrune-ResNet56      ResNet-56 (30 groups)
    ChannelPrune-VGG16         VGG-16-BN (13 groups)
    ChannelPrune-MobileNetV2   MobileNetV2 with CIFAR strides (25 groups)

All take the keyword arguments of :class:`envs.channel_prune.ChannelPruneEnv`.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from .channel_prune import ChannelPruneEnv

ENV_IDS = {
    "ChannelPrune-ResNet18": ("resnet18", 12),
    "ChannelPrune-ResNet20": ("resnet20", 12),
    "ChannelPrune-ResNet56": ("resnet56", 30),
    "ChannelPrune-VGG16": ("vgg16_bn", 13),
    "ChannelPrune-MobileNetV2": ("mobilenetv2", 25),
}

for _env_id, (_model, _steps) in ENV_IDS.items():
    if _env_id not in registry:
        register(
            id=_env_id,
            entry_point="envs.channel_prune:ChannelPruneEnv",
            kwargs={"model": _model, "dataset": "fashion-mnist"},
            max_episode_steps=_steps,
        )

__all__ = ["ChannelPruneEnv", "ENV_IDS"]
