"""Pictures of an episode for ``ChannelPruneEnv.render``: a text table ("ansi") and a bar chart ("rgb_array")."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def render_ansi(groups: Sequence, ratios: Sequence[float], runtime: Sequence[float], current: int,
                done_info: dict) -> str:
    """One line per group (name, kind, channels, keep and runtime ratio), ``>`` at the current step."""
    lines = [f"{'#':>3} {'group':<28} {'kind':<9} {'C':>5} {'keep':>6} {'runtime':>8}"]
    for i, g in enumerate(groups):
        mark = ">" if i == current else " "
        lines.append(f"{mark}{i:>2} {g.name:<28} {g.kind:<9} {g.num_channels:>5} {ratios[i]:>6.2f} "
                     f"{runtime[i]:>8.2f}")
    if done_info:
        d = done_info
        lines.append(f"accuracy {d['accuracy']:.4f}  flops {d['flops_ratio']:.3f}  params {d['params_ratio']:.3f}")
    return "\n".join(lines) + "\n"


def render_rgb(groups: Sequence, ratios: Sequence[float]) -> np.ndarray:
    """Keep ratio per group as bars (residual streams in orange), an (H, W, 3) uint8 image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    colors = ["C1" if g.kind == "residual" else "C0" for g in groups]
    ax.bar(range(len(groups)), np.nan_to_num(ratios), color=colors)
    ax.set_ylim(0, 1)
    ax.set_xlabel("group")
    ax.set_ylabel("keep ratio")
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img
