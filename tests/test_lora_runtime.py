"""Reading LoRA files and applying them functionally (forward hooks, per-sample scale)."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hgdpo.models.families import SD15, SDXL
from hgdpo.models.lora_runtime import (
    FollowingLoRA,
    FunctionalLoRA,
    LoRAArchitectureError,
    LoRAModule,
    attach_lora,
    unet_kohya_modules,
    lora_from_state_dict,
    read_lora,
)
from tests.sd15_factory import save_fake_sdxl_checkpoint, save_random_lora


def unet_inputs(unet, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([500] * batch), context


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs, return_dict=False)[0]


def merged_copy(unet, lora_file, weight: float):
    """An independent reference: the LoRA merged into a copy's weights, W + w * (alpha/rank) * up @ down."""
    merged = copy.deepcopy(unet)
    modules = unet_kohya_modules(merged, SD15)
    with torch.no_grad():
        for name, module in lora_file.unet.items():
            modules[name].weight += weight * module.multiplier * (module.up @ module.down)
    return merged


def test_reads_hgdpo_lora_and_matches_merged_weights(tiny_models, tiny_lora):
    _, models = tiny_models
    unet = copy.deepcopy(models["unet"])
    lora = read_lora(tiny_lora)
    attention_linears = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    assert len(lora.unet) == len(attention_linears) and not lora.text_encoder
    assert lora.metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    inputs = unet_inputs(unet)
    base = run(unet, inputs)
    hooks, text_hooks = attach_lora(unet, (), lora, scale=0.5)
    assert text_hooks is None and len(hooks) == len(lora.unet)
    with_lora = run(unet, inputs)
    torch.testing.assert_close(with_lora, run(merged_copy(models["unet"], lora, 0.5), inputs), rtol=1e-4, atol=1e-5)
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA has an effect
    hooks.remove()
    assert torch.equal(run(unet, inputs), base)  # detached: exactly the base model again


def test_per_sample_scale_evaluates_base_and_lora_rows_in_one_forward(tiny_models, tiny_lora):
    _, models = tiny_models
    unet = copy.deepcopy(models["unet"])
    hooks, _ = attach_lora(unet, (), read_lora(tiny_lora), scale=0.0)
    inputs = unet_inputs(unet)
    base = run(unet, inputs)
    hooks.scale = 0.8
    full = run(unet, inputs)
    hooks.scale = torch.tensor([0.0, 0.8])
    mixed = run(unet, inputs)
    torch.testing.assert_close(mixed[0], base[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], full[1], rtol=1e-5, atol=1e-6)


def test_peft_layout_reads_the_same_modules(tiny_models, tiny_lora):
    _, models = tiny_models
    kohya = read_lora(tiny_lora)
    dotted = {name.replace(".", "_"): name for name, _ in models["unet"].named_modules()}
    peft_state = {}
    for name, module in kohya.unet.items():  # diffusers' peft naming: unet.<dotted path>.lora_A/B.weight
        peft_state[f"unet.{dotted[name]}.lora_A.weight"] = module.down
        peft_state[f"unet.{dotted[name]}.lora_B.weight"] = module.up
    converted = lora_from_state_dict(peft_state)
    assert set(converted.unet) == set(kohya.unet)
    name = next(iter(kohya.unet))
    assert torch.equal(converted.unet[name].up, kohya.unet[name].up)
    assert converted.unet[name].multiplier == 1.0  # no alpha in the file: alpha = rank
    unprefixed = lora_from_state_dict({key.removeprefix("unet."): value for key, value in peft_state.items()})
    assert set(unprefixed.unet) == set(kohya.unet)  # hgdpo's training checkpoints


def test_text_encoder_part_is_hooked_onto_the_text_encoder(tiny_models, tmp_path):
    _, models = tiny_models
    path = save_random_lora(models["unet"], tmp_path / "te.safetensors", text_encoder=models["text_encoder"], std=0.2)
    lora = read_lora(path)
    assert lora.text_encoder
    text_encoder = copy.deepcopy(models["text_encoder"])
    ids = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = text_encoder(ids)[0]
        _, text_hooks = attach_lora(copy.deepcopy(models["unet"]), (text_encoder,), lora, scale=1.0)
        after = text_encoder(ids)[0]
    assert text_hooks is not None and (after - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="text encoder"):
        attach_lora(copy.deepcopy(models["unet"]), (), lora)


def _write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_other_architectures_and_formats_are_refused_with_the_reason(tiny_models, tiny_lora, tmp_path):
    _, models = tiny_models
    tensors = load_file(str(tiny_lora))
    sdxl_meta = _write(
        tmp_path / "xl.safetensors", tensors, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    )
    assert read_lora(sdxl_meta).family is SDXL  # the metadata names the family
    with pytest.raises(LoRAArchitectureError, match="is an SDXL LoRA, but the model is an SD1.5 model"):
        read_lora(sdxl_meta, family=SD15)
    refiner = _write(tmp_path / "refiner.safetensors", tensors,
                     {"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"})
    with pytest.raises(LoRAArchitectureError, match="stable-diffusion-xl-v1-refiner"):
        read_lora(refiner)
    te1 = _write(
        tmp_path / "te1.safetensors",
        {**tensors, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
         "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 4)},
    )
    assert read_lora(te1).family is SDXL  # kohya's SDXL text-encoder names
    with pytest.raises(LoRAArchitectureError, match="SDXL"):
        read_lora(te1, family=SD15)
    loha = _write(tmp_path / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)})
    with pytest.raises(LoRAArchitectureError, match="LoHa"):
        read_lora(loha)
    with pytest.raises(LoRAArchitectureError, match="no LoRA weights"):
        read_lora(save_fake_sdxl_checkpoint(tmp_path / "model.safetensors"))
    # an SD2-shaped LoRA: cross-attention keys/values read 1024-wide text features
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd2 = dict(tensors)
    sd2[f"{key}.lora_down.weight"] = torch.zeros(8, 1024)
    unet = copy.deepcopy(models["unet"])
    with pytest.raises(LoRAArchitectureError, match="SD2"):
        attach_lora(unet, (), read_lora(_write(tmp_path / "sd2.safetensors", sd2)))
    unknown = _write(
        tmp_path / "unknown.safetensors",
        {
            "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(8, 4),
            "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 8),
        },
    )
    with pytest.raises(LoRAArchitectureError, match="does not fit"):
        attach_lora(unet, (), read_lora(unknown))
    assert not any(module._forward_hooks for module in unet.modules())  # a refused LoRA leaves no hook behind


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_lora(tmp_path / "missing.safetensors")
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors files only"):
        read_lora(pickle)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable"):
        read_lora(corrupt)


def test_conv_lora_matches_a_merged_conv():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    generator = torch.Generator().manual_seed(0)
    state = {"lora_unet_conv.lora_down.weight": torch.randn(2, 4, 3, 3, generator=generator),
             "lora_unet_conv.lora_up.weight": torch.randn(6, 2, 1, 1, generator=generator),
             "lora_unet_conv.alpha": torch.tensor(1.0)}
    lora = lora_from_state_dict(state).unet
    x = torch.randn(1, 4, 5, 5, generator=generator)
    merged = copy.deepcopy(conv)
    with torch.no_grad():
        delta = torch.einsum("or,rikl->oikl", state["lora_unet_conv.lora_up.weight"][:, :, 0, 0],
                             state["lora_unet_conv.lora_down.weight"])
        merged.weight += 0.5 * delta
        FunctionalLoRA({"conv": conv}, lora, scale=1.0)
        torch.testing.assert_close(conv(x), merged(x), rtol=1e-4, atol=1e-5)


class _CastLinear(nn.Linear):
    """A layer stored in fp8 that computes in its input's dtype (what ComfyUI's and Forge's manual cast do)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def test_fp8_stored_layers_get_the_lora_in_their_compute_dtype():
    torch.manual_seed(0)
    layer = _CastLinear(8, 6)
    reference = copy.deepcopy(layer)
    layer.to(torch.float8_e4m3fn)
    reference.weight.data = layer.weight.data.float()  # the same fp8-rounded weights, computed in fp32
    reference.bias.data = layer.bias.data.float()
    lora = LoRAModule(down=torch.randn(2, 8), up=torch.randn(6, 2), alpha=1.0)
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="cannot compute a LoRA in torch.float8_e4m3fn"):
        FollowingLoRA({"fc": layer}, {"fc": lora}, 1.0)
    following = FollowingLoRA({"fc": layer}, {"fc": lora}, 0.5, compute_dtype=torch.float32)
    with torch.no_grad():
        expected = reference(x) + 0.5 * lora.multiplier * x @ lora.down.T @ lora.up.T
        torch.testing.assert_close(layer(x), expected)
    assert following.placement == (torch.device("cpu"), torch.float32)
    following.remove()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x))
