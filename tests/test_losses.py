"""The HG-DPO objective against explicit formulas and against diffusers' own DDPM step."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from hgdpo.models.loading import SD15_CONFIG_DIR
from hgdpo.training.losses import (
    ddpm_previous_sample,
    diffusion_dpo_loss,
    hgdpo_loss,
    per_sample_mse,
    sft_loss,
    statistic_matching_loss,
)


def _scheduler(**overrides) -> DDPMScheduler:
    """DDPM with the bundled SD1.5 noise schedule."""
    config = DDPMScheduler.load_config(SD15_CONFIG_DIR, subfolder="scheduler")
    return DDPMScheduler.from_config(config, **overrides)


def test_dpo_loss_matches_equation_3_written_out():
    torch.manual_seed(0)
    target = torch.randn(4, 4, 8, 8)  # 2 pairs: rows 0-1 winners, 2-3 losers
    policy, reference = torch.randn_like(target), torch.randn_like(target)
    beta = 2500.0
    terms = diffusion_dpo_loss(policy, reference, target, beta=beta)
    for pair in range(2):
        w, l = pair, pair + 2
        mse = lambda a, b: ((a - b) ** 2).mean().item()  # noqa: E731
        inside = -beta * ((mse(policy[w], target[w]) - mse(reference[w], target[w]))
                          - (mse(policy[l], target[l]) - mse(reference[l], target[l])))
        expected = -math.log(1 / (1 + math.exp(-inside))) if inside > -30 else -inside
        assert terms.loss[pair].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert terms.reward_margin[pair].item() == pytest.approx(inside, rel=1e-4, abs=1e-3)


def test_dpo_conventions_and_reporting():
    target = torch.zeros(2, 1, 2, 2)
    reference = torch.ones_like(target) * 0.1  # mse 0.01 for both
    # policy better on the winner, worse on the loser -> positive margin, accuracy 1
    policy = torch.cat([torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2) * 0.2])
    terms = diffusion_dpo_loss(policy, reference, target, beta=1.0)
    assert terms.reward_margin.item() == pytest.approx(0.01 + 0.03)
    assert terms.implicit_accuracy.item() == 1.0
    # identical policy and reference: margin 0, loss log 2, a tie counts half (as in diffusers' script)
    tie = diffusion_dpo_loss(reference, reference, target)
    assert tie.loss.item() == pytest.approx(math.log(2))
    assert tie.implicit_accuracy.item() == 0.5
    # "0.5 * beta_dpo" convention of diffusers / Salesforce: beta_dpo = 2 * beta gives the same loss
    other = -torch.nn.functional.logsigmoid(-0.5 * 5000 * (
        (per_sample_mse(policy[:1], target[:1]) - per_sample_mse(reference[:1], target[:1]))
        - (per_sample_mse(policy[1:], target[1:]) - per_sample_mse(reference[1:], target[1:]))))
    assert diffusion_dpo_loss(policy, reference, target, beta=2500).loss.item() == pytest.approx(other.item())


def _tiny_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return unet.eval()


@pytest.mark.parametrize(("prediction_type", "zero_snr"),
                         [("epsilon", False), ("v_prediction", False), ("v_prediction", True)])  # True: NoobAI V-Pred
def test_statistic_loss_equals_explicit_two_model_ddpm_step(prediction_type, zero_snr):
    """Eq. 8 from the DPO term's predictions == two models each stepped by DDPMScheduler.step."""
    scheduler = _scheduler(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    policy_unet, reference_unet = _tiny_unet(1), _tiny_unet(2)
    generator = torch.Generator().manual_seed(0)
    pairs = 3
    latents = torch.randn(2 * pairs, 4, 8, 8, generator=generator)
    text = torch.randn(pairs, 77, 32, generator=generator).repeat(2, 1, 1)
    timesteps = torch.tensor([0, 421, 999]).repeat(2)
    noise = torch.randn(pairs, 4, 8, 8, generator=generator).repeat(2, 1, 1, 1)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        policy = policy_unet(noisy, timesteps, text).sample
        reference = reference_unet(noisy, timesteps, text).sample
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    ours = hgdpo_loss(policy, reference, target, noisy, timesteps, scheduler.alphas_cumprod,
                      prediction_type=prediction_type, lambda_stat=10000.0)

    expected = []
    for i in range(pairs):  # winners only, diffusers' scalar-timestep step, same step noise for both
        t = int(timesteps[i])
        step_noise_seed = 100 + i
        previous = [
            scheduler.step(prediction[i : i + 1], t, noisy[i : i + 1],
                           generator=torch.Generator().manual_seed(step_noise_seed)).prev_sample
            for prediction in (policy, reference)
        ]
        expected.append(((previous[0].mean(dim=(2, 3)) - previous[1].mean(dim=(2, 3))) ** 2).sum())
    expected = torch.stack(expected)
    torch.testing.assert_close(ours.statistic, expected, rtol=1e-4, atol=1e-10)
    assert (expected > 0).all()  # different models: the check is not vacuous
    dpo_only = diffusion_dpo_loss(policy, reference, target).loss
    torch.testing.assert_close(ours.loss, (dpo_only + 10000.0 * expected).mean(), rtol=1e-4, atol=1e-6)


def test_vectorised_ddpm_step_matches_diffusers_including_noise():
    scheduler = _scheduler()
    sample, output = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    timesteps = torch.tensor([0, 1, 700])
    noise = torch.randn(3, 4, 4, 4)
    ours = ddpm_previous_sample(output, timesteps, sample, scheduler.alphas_cumprod, step_noise=noise)
    for i, t in enumerate(timesteps.tolist()):
        # diffusers draws its variance noise with randn_tensor(generator): replay the same draw
        generator = torch.Generator().manual_seed(i)
        drawn = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(i))
        theirs = scheduler.step(output[i : i + 1], t, sample[i : i + 1], generator=generator).prev_sample
        mine = ddpm_previous_sample(output[i : i + 1], timesteps[i : i + 1], sample[i : i + 1],
                                    scheduler.alphas_cumprod, step_noise=drawn)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[2], ddpm_previous_sample(output, timesteps, sample, scheduler.alphas_cumprod)[2])


def test_statistic_loss_is_channel_mean_distance_and_gradients_reach_policy_only():
    policy = torch.zeros(1, 4, 2, 2, requires_grad=True)
    reference = torch.zeros(1, 4, 2, 2)
    reference[0, 1] = 1.0  # channel 1 mean differs by 1, others equal
    assert statistic_matching_loss(policy, reference).item() == pytest.approx(1.0)
    # per-pixel changes that keep channel means equal cost nothing: only statistics are matched
    shuffled = torch.tensor([[[[1.0, -1.0], [0.5, -0.5]]] * 4])
    assert statistic_matching_loss(shuffled, torch.zeros_like(shuffled)).item() == pytest.approx(0.0)

    target = torch.randn(2, 4, 4, 4)
    policy_prediction = torch.randn(2, 4, 4, 4, requires_grad=True)
    reference_prediction = torch.randn(2, 4, 4, 4, requires_grad=True)
    result = hgdpo_loss(policy_prediction, reference_prediction, target, torch.randn(2, 4, 4, 4),
                        torch.tensor([500, 500]), _scheduler().alphas_cumprod)
    result.loss.backward()
    assert policy_prediction.grad.abs().sum() > 0
    assert reference_prediction.grad is None  # the reference is frozen in both terms
    scalars = result.scalars()
    assert scalars["loss/total"] == pytest.approx(result.loss.item(), rel=1e-5)
    weighted = 10000.0 * result.statistic.mean().item()
    assert scalars["loss/stat_share"] == pytest.approx(weighted / (result.dpo.loss.mean().item() + weighted))


def test_lambda_zero_is_plain_dpo_and_sft_is_winner_mse():
    target = torch.randn(2, 4, 4, 4)
    policy, reference = torch.randn_like(target), torch.randn_like(target)
    alphas = _scheduler().alphas_cumprod
    result = hgdpo_loss(policy, reference, target, torch.randn_like(target), torch.tensor([10, 10]), alphas,
                        lambda_stat=0.0)
    assert result.loss.item() == pytest.approx(diffusion_dpo_loss(policy, reference, target).loss.item())
    assert sft_loss(policy[:1], target[:1]).item() == pytest.approx(((policy[0] - target[0]) ** 2).mean().item())
