"""LAN sampling (HG-DPO Eq. 7): ``LAN Guider`` for ``SamplerCustomAdvanced`` and the all-in-one ``LAN KSampler``.

The DPO model (``model``: the checkpoint plus the HG-DPO LoRA, or its own checkpoint) and the SFT model
(``sft_model``: the checkpoint the LoRA was trained on) sample in lockstep from the same noise; after every
step the DPO latent takes the SFT latent's per-channel mean and std. The sampling itself is
:class:`.lan_guider.LANGuider` on ComfyUI's samplers and schedulers.
"""

from __future__ import annotations

from .comfy_internals import intermediate_device, io, ksampler_inputs, lan_sampler_names, scheduler_names

CATEGORY = "HG-DPO"


def _lan_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The DPO model: the checkpoint with the HG-DPO LoRA (or a DPO checkpoint)."),
        io.Model.Input("sft_model", tooltip="The SFT model: the checkpoint the HG-DPO LoRA was trained on."),
    ]


def _strength_input():
    return io.Float.Input("lan_strength", default=1.0, min=0.0, max=1.0, step=0.05,
                          display_mode=io.NumberDisplay.slider,
                          tooltip="1 = the paper's LAN; 0 = plain DPO sampling (the SFT chain is still computed).")


def _guider(model, sft_model, positive, negative, cfg, lan_strength):
    from .lan_guider import LANGuider

    guider = LANGuider(model, sft_model, lan_strength)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


class LANGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGDPOLANGuider",
            display_name="LAN Guider (HG-DPO)",
            category=CATEGORY,
            description="CFG guider for SamplerCustomAdvanced that samples the DPO and the SFT model in lockstep "
                        "and renormalises the DPO latent to the SFT latent's channel statistics after every step "
                        "(latent adaptive normalization). Works with k-diffusion samplers (not uni_pc).",
            inputs=[
                *_lan_inputs(),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                _strength_input(),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, sft_model, positive, negative, cfg, lan_strength) -> io.NodeOutput:
        return io.NodeOutput(_guider(model, sft_model, positive, negative, cfg, lan_strength))


class LANKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGDPOLANKSampler",
            display_name="LAN KSampler (HG-DPO)",
            category=CATEGORY,
            description="KSampler with latent adaptive normalization: the DPO model and the SFT model sample in "
                        "lockstep from the same noise, and after every step the DPO latent takes the SFT latent's "
                        "per-channel mean and std (removes the colour shift of DPO). Outputs the DPO latent and "
                        "the SFT latent of the same run.",
            inputs=[
                *_lan_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=lan_sampler_names()),
                io.Combo.Input("scheduler", options=scheduler_names()),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                _strength_input(),
            ],
            outputs=[io.Latent.Output("LATENT", display_name="LATENT"),
                     io.Latent.Output("sft_latent", display_name="sft_latent")],
        )

    @classmethod
    def execute(cls, model, sft_model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, lan_strength) -> io.NodeOutput:
        guider = _guider(model, sft_model, positive, negative, cfg, lan_strength)
        # As nodes.common_ksampler does for the stock KSampler, with the guider in place of CFGGuider.
        inputs = ksampler_inputs(guider.model_patcher, latent_image, seed, steps, sampler_name, scheduler, denoise)
        samples = guider.sample(**inputs)
        device = intermediate_device()
        dpo, sft = latent_image.copy(), latent_image.copy()
        dpo["samples"], sft["samples"] = samples.to(device), guider.sft_samples.to(device)
        return io.NodeOutput(dpo, sft)
