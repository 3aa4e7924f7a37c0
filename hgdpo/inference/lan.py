"""Latent adaptive normalization (LAN), HG-DPO Eq. 7.

The SFT model and the DPO model sample in lockstep from the same noise; after every sampler step the
DPO latent is renormalised, per sample and channel, to the SFT latent's mean and standard deviation
over (H, W)::

    x_dpo <- (x_dpo - mean(x_dpo)) / std(x_dpo) * std(x_sft) + mean(x_sft)

This keeps the DPO model's structure (pose, anatomy) and the SFT model's colour statistics, which
removes the colour shift of DPO training at inference time. Every frontend (diffusers, ComfyUI,
WebUI) calls :func:`latent_adaptive_normalization`; this module imports nothing but torch.
"""

from __future__ import annotations

import torch

DEFAULT_EPS = 1e-5


def channel_statistics(latent: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel population mean and variance (+ ``eps``) over the spatial dims.

    ``latent`` is ``[B, C, *spatial]``; both results are ``[B, C, 1, ...]`` so they broadcast back.
    Computed in float32 whatever the latent's dtype.
    """
    if latent.dim() < 3:
        raise ValueError(f"LAN expects latents shaped [batch, channels, *spatial], got {tuple(latent.shape)}.")
    dims = tuple(range(2, latent.dim()))
    values = latent.float()
    mean = values.mean(dim=dims, keepdim=True)
    variance = values.var(dim=dims, keepdim=True, unbiased=False) + eps
    return mean, variance


def latent_adaptive_normalization(
    dpo_latent: torch.Tensor,
    sft_latent: torch.Tensor,
    strength: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Eq. 7: the DPO latent renormalised to the SFT latent's per-channel mean and std.

    ``strength`` in [0, 1] blends the raw (0) and the normalised (1, the paper) latent. The update is
    written as a correction added to ``dpo_latent``, so identical latents come back bit-identical.
    Returns a tensor of ``dpo_latent``'s dtype.
    """
    if dpo_latent.shape != sft_latent.shape:
        raise ValueError(
            f"LAN needs SFT and DPO latents of the same shape, got {tuple(sft_latent.shape)} "
            f"and {tuple(dpo_latent.shape)} (the two models must share the latent space)."
        )
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"LAN strength must lie in [0, 1], got {strength}.")
    if strength == 0.0:
        return dpo_latent
    dpo_mean, dpo_variance = channel_statistics(dpo_latent, eps)
    sft_mean, sft_variance = channel_statistics(sft_latent, eps)
    scale = torch.sqrt(sft_variance / dpo_variance)
    values = dpo_latent.float()
    correction = (values - dpo_mean) * (scale - 1.0) + (sft_mean - dpo_mean)
    return (values + strength * correction).to(dpo_latent.dtype)


def normalize_stacked(latents: torch.Tensor, strength: float = 1.0, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """LAN on a lockstep batch ``[x_sft; x_dpo]`` (SFT half first): the DPO half renormalised."""
    if latents.shape[0] % 2:
        raise ValueError(
            f"A lockstep batch stacks SFT and DPO latents, so its size must be even, got {latents.shape[0]}."
        )
    sft, dpo = latents.chunk(2)
    return torch.cat([sft, latent_adaptive_normalization(dpo, sft, strength, eps)])
