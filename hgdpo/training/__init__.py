"""Training (paper Section 3.2): Diffusion-DPO plus statistic matching on a LoRA.

``config`` the options · ``losses`` Eq. 3 (DPO) and Eq. 8-9 (statistic matching) · ``loop`` the run
and its optimizer step · ``latent_cache`` encoded pairs · ``checkpoint`` resumable checkpoints ·
``validation`` images at fixed seeds.
"""
