"""LAN, Eq. 7: the DPO latent takes the SFT latent's per-sample, per-channel mean and std."""

import pytest
import torch

from hgdpo.inference.lan import channel_statistics, latent_adaptive_normalization, normalize_stacked


def latents(seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 6, generator=generator) * scale + shift


def test_output_takes_the_sft_channel_statistics_and_keeps_the_dpo_structure():
    sft, dpo = latents(0, 0.5, 2.0), latents(1, -1.0, 0.3)
    out = latent_adaptive_normalization(dpo, sft, eps=0.0)
    for axis_mean, axis_var in zip(channel_statistics(out), channel_statistics(sft)):
        torch.testing.assert_close(axis_mean, axis_var, rtol=1e-5, atol=1e-5)
    # the normalised DPO latent is an affine map of the raw one per channel: correlation 1
    for b in range(3):
        for c in range(4):
            pair = torch.stack([out[b, c].flatten(), dpo[b, c].flatten()])
            assert torch.corrcoef(pair)[0, 1] > 0.9999


def test_hand_computed_single_channel():
    sft = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 2)  # mean 2, std 1
    dpo = torch.tensor([10.0, 14.0]).reshape(1, 1, 1, 2)  # mean 12, std 2
    out = latent_adaptive_normalization(dpo, sft, eps=0.0)
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 3.0]))


def test_strength_blends_raw_and_normalised():
    sft, dpo = latents(2, 1.0), latents(3, -2.0, 3.0)
    full = latent_adaptive_normalization(dpo, sft)
    half = latent_adaptive_normalization(dpo, sft, strength=0.5)
    torch.testing.assert_close(half, 0.5 * dpo + 0.5 * full, rtol=1e-5, atol=1e-5)
    assert latent_adaptive_normalization(dpo, sft, strength=0.0) is dpo


def test_identical_latents_come_back_bit_identical_and_dtype_is_kept():
    x = latents(4).to(torch.bfloat16)
    out = latent_adaptive_normalization(x.clone(), x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, x)


def test_constant_channel_does_not_divide_by_zero():
    sft, dpo = latents(5), torch.zeros(3, 4, 8, 6)
    out = latent_adaptive_normalization(dpo, sft)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(channel_statistics(out)[0], channel_statistics(sft)[0])


def test_stacked_batch_normalises_only_the_dpo_half():
    sft, dpo = latents(6, 2.0), latents(7, -2.0)
    out = normalize_stacked(torch.cat([sft, dpo]))
    assert torch.equal(out[:3], sft)
    torch.testing.assert_close(out[3:], latent_adaptive_normalization(dpo, sft))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        latent_adaptive_normalization(latents(0), latents(1)[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        latent_adaptive_normalization(latents(0), latents(1), strength=1.5)
    with pytest.raises(ValueError, match="even"):
        normalize_stacked(latents(0))
    with pytest.raises(ValueError, match="channels"):
        latent_adaptive_normalization(torch.ones(4), torch.ones(4))
