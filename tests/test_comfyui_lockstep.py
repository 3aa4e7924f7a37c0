"""The framework-free lockstep pieces behind the ComfyUI LAN sampler (:mod:`hgdpo.inference.lockstep_batch`); no ComfyUI needed."""

from __future__ import annotations

import pytest
import torch

from hgdpo.inference import lockstep_batch
from hgdpo.inference.lan import latent_adaptive_normalization


def euler(model, x, sigmas, noise_sampler=None):
    """A k-diffusion-style sampler: it hands its own state to the model, then steps (ancestral with noise)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if noise_sampler is not None and sigmas[i + 1] > 0:
            x = x + 0.1 * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def toy_model(x, sigma):
    """Rows differ (a per-row gain and shift), so the SFT and DPO chains drift apart."""
    gain = torch.linspace(0.5, 0.9, x.shape[0]).reshape(-1, 1, 1, 1)
    return gain * x + torch.arange(x.shape[1], dtype=x.dtype).reshape(1, -1, 1, 1) * gain


def test_denoiser_in_place_lan_equals_lan_after_every_step():
    batch, sigmas = 2, torch.tensor([10.0, 5.0, 2.0, 0.5, 0.0])
    noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    denoiser = lockstep_batch.InPlaceLANDenoiser(toy_model, batch)
    result = lockstep_batch.finish(euler(denoiser, lockstep_batch.paired(noise), sigmas), batch)

    x = lockstep_batch.paired(noise)  # the reference: LAN written out after every step
    for i in range(len(sigmas) - 1):
        x = euler(toy_model, x, sigmas[i: i + 2])
        x = torch.cat([x[:batch], latent_adaptive_normalization(x[batch:], x[:batch])])
    torch.testing.assert_close(result, x, rtol=1e-5, atol=1e-5)
    assert denoiser.evaluations == len(sigmas) - 1
    stats = [t.mean(dim=(2, 3)) for t in result.chunk(2)]
    torch.testing.assert_close(stats[0], stats[1], rtol=1e-4, atol=1e-4)


def test_paired_noise_gives_both_chains_the_single_chain_draw():
    draws = iter(torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    sampler = lockstep_batch.PairedNoiseSampler(lambda sigma, sigma_next: next(draws))
    noise = sampler(torch.tensor(1.0), torch.tensor(0.5))
    assert noise.shape[0] == 4
    torch.testing.assert_close(noise[:2], noise[2:])


def test_strength_zero_and_identical_chains_change_nothing():
    x = lockstep_batch.paired(torch.randn(1, 4, 8, 8))
    before = x.clone()
    lockstep_batch.normalize_in_place(x, 1)
    assert torch.equal(x, before)  # identical chains come back bit-identical
    y = torch.randn(2, 4, 8, 8)
    z = y.clone()
    lockstep_batch.normalize_in_place(z, 1, strength=0.0)
    assert torch.equal(y, z)
    passthrough = lockstep_batch.InPlaceLANDenoiser(lambda x, sigma: x, 3)
    odd = torch.randn(2, 4, 8, 8)
    assert torch.equal(passthrough(odd.clone(), torch.ones(2)), odd)  # not a lockstep batch: untouched


def test_row_scales_and_half_rows_follow_stacked_lockstep_chunks():
    scales = lockstep_batch.row_scales(8, 2, 0.5)
    assert scales.tolist() == [0, 0, 0.5, 0.5, 0, 0, 0.5, 0.5]
    sft, dpo = lockstep_batch.half_rows(12, 2)
    assert sft.tolist() == [0, 1, 4, 5, 8, 9] and dpo.tolist() == [2, 3, 6, 7, 10, 11]
    with pytest.raises(ValueError, match="not made of lockstep batches"):
        lockstep_batch.row_scales(6, 2)
    with pytest.raises(ValueError, match="must hold the SFT and the DPO chain"):
        lockstep_batch.finish(torch.zeros(3, 4, 2, 2), 2)
