"""Inference: sampling, the LoRA at a weight, LAN (Eq. 7) in lockstep, best-of-N, infotext."""
