"""Models: loading SD checkpoints (single files, diffusers folders, hub ids), the LoRA and its files."""
