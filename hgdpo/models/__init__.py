"""Models: loading SD checkpoints (single files, diffusers folders, hub ids) and the LoRA.

``loading`` checkpoints and precisions · ``ldm_names`` LDM/kohya key names · ``lora`` the trainable
LoRA and its kohya file · ``lora_runtime`` reading LoRA files and attaching them at run time
(fp8/offload policy) · ``tiny`` random-weight models for the demo and tests · ``configs/`` bundled
model configs (no hub access needed).
"""
