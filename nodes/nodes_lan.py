"""LAN sampling (HG-DPO Eq. 7): ``LAN Guider`` for ``SamplerCustomAdvanced`` and the all-in-one ``LAN KSampler``.

The DPO model (``model``: the checkpoint plus the HG-DPO LoRA, or its own checkpoint) and the SFT model
(``sft_model``: the checkpoint the LoRA was trained on) sample in lockstep from the same noise; after every
step the DPO latent takes the SFT latent's per-channel mean and std. The sampling itself is
:class:`.lan_guider.LANGuider` on ComfyUI's samplers and schedulers.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io

CATEGORY = "HG-DPO"
UNSUPPORTED_SAMPLERS = ("uni_pc", "uni_pc_bh2")  # see lan_guider.UNSUPPORTED_SAMPLERS (not imported here: torch-free)


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
        import comfy.samplers

        samplers = [name for name in comfy.samplers.KSampler.SAMPLERS if name not in UNSUPPORTED_SAMPLERS]
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
                io.Combo.Input("sampler_name", options=samplers),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
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
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        guider = _guider(model, sft_model, positive, negative, cfg, lan_strength)
        # As nodes.common_ksampler does for the stock KSampler, with the guider in place of CFGGuider.
        latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(guider.model_patcher, steps=steps, device=guider.model_patcher.load_device,
                                         sampler=sampler_name, scheduler=scheduler, denoise=denoise,
                                         model_options=guider.model_patcher.model_options).sigmas
        callback = latent_preview.prepare_callback(guider.model_patcher, steps)
        samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=latent_image.get("noise_mask"), callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        device = comfy.model_management.intermediate_device()
        dpo, sft = latent_image.copy(), latent_image.copy()
        dpo["samples"], sft["samples"] = samples.to(device), guider.sft_samples.to(device)
        return io.NodeOutput(dpo, sft)
