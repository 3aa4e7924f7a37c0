"""Inference (paper Section 3.3): one generation path for every image the toolkit makes.

``sampling`` the seed-to-noise rule, the sampling loop, the LoRA at a weight, LAN in lockstep and
best-of-N · ``lan`` LAN itself (Eq. 7) · ``lockstep_batch`` SFT and DPO chains as one batch for host
samplers · ``generate`` the ``trainer/sample.py`` job · ``infotext`` WebUI-style PNG parameters.
"""
