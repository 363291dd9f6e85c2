"""The flow-matching objective: each sample's timestep, and the loss.

Flow matching as in Wan: ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``,
model timestep ``t * 1000``, MSE loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slotsmith.train import TrainSettings
from slotsmith.training.conditioning import Conditioning


def sample_t(settings: TrainSettings, generator: torch.Generator, t_range: tuple[float, float]) -> float:
    """One flow-matching time in ``t_range`` (fractions of 1000) for one sample.

    Args:
        settings: Sampling method and parameters.
        generator: The sample's own generator.
        t_range: ``(low, high)`` in [0, 1].

    Returns:
        ``t`` in ``[low, high]``.
    """
    method = settings.timestep_sampling
    if method == "uniform":
        t = torch.rand((), generator=generator).item()
    else:
        z = torch.randn((), generator=generator).item()
        if method == "logit_normal":
            t = 1 / (1 + math.exp(-(settings.logit_mean + settings.logit_std * z)))
        else:
            t = 1 / (1 + math.exp(-settings.sigmoid_scale * z))
            if method == "shift":
                s = settings.flow_shift
                t = s * t / (1 + (s - 1) * t)
    low, high = t_range
    return low + (high - low) * t


def flow_loss(
    model: nn.Module,
    latents: torch.Tensor,
    context: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    input_dtype: torch.dtype,
    cond: Conditioning | None = None,
) -> torch.Tensor:
    """Per-sample flow-matching MSE.

    Args:
        model: The Wan model.
        latents: ``[B, C, F, H, W]`` clean latents (x0).
        context: ``[B, 512, text_dim]`` text embeddings.
        t: ``[B]`` times in [0, 1].
        noise: Like ``latents``.
        input_dtype: The dtype the model's inputs must have.
        cond: Image conditioning (image-to-video bases), or None; see
            `slotsmith.training.conditioning`.

    Returns:
        ``[B]`` losses in float32.
    """
    tb = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tb) * latents + tb * noise
    hidden, timestep, frames = x_t, t * 1000, slice(None)
    extra = {}
    if cond is not None:
        hidden, timestep = cond.model_inputs(x_t, timestep, model.config.patch_size)
        frames = cond.loss_frames()
        if cond.image_embeds is not None:
            extra["encoder_hidden_states_image"] = cond.image_embeds.to(input_dtype)
    pred = model(
        hidden_states=hidden.to(input_dtype),
        timestep=timestep,
        encoder_hidden_states=context.to(input_dtype),
        return_dict=False,
        **extra,
    )[0]
    target = noise - latents
    return ((pred.float() - target) ** 2)[:, :, frames].flatten(1).mean(1)
