"""Training: the configuration, Diffusion-DPO + statistic-matching losses, the loop, latents cache, checkpoints."""
