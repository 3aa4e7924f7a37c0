"""The HG-DPO training objective (paper Eq. 3, 8 and 9), one function per equation.

Batches are stacked pairs: the first half of every tensor holds the winners (w), the second half
the losers (l) of the same prompts, with the same noise and timestep for both images of a pair and
for the policy and the reference model.

**The beta convention.** Eq. 3 is written here as
``loss = -log sigmoid(-beta * ((mse_pol_w - mse_ref_w) - (mse_pol_l - mse_ref_l)))`` with
``beta = 2500`` (the paper's value). Salesforce's original Diffusion-DPO code (and the first version of
diffusers' ``train_diffusion_dpo.py``) write the same loss as ``-0.5 * beta_dpo * (...)`` with
``beta_dpo = 5000`` for SD1.5: our ``beta = 2500`` equals their ``beta_dpo = 5000``. diffusers' current
script dropped the 0.5, so its ``beta_dpo`` is our ``beta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_BETA = 2500.0
DEFAULT_LAMBDA_STAT = 10000.0


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses in every loss here: the noise, or the velocity for a v-prediction scheduler."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, averaged over (C, H, W), computed in fp32."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    return error.mean(dim=tuple(range(1, error.ndim)))


@dataclass
class DPOTerms:
    """Per-sample quantities of Eq. 3 (shape ``[B]`` for B pairs)."""

    loss: torch.Tensor
    reward_margin: torch.Tensor  # r(x_w) - r(x_l) with r(x) = -beta (mse_pol(x) - mse_ref(x))
    policy_mse_w: torch.Tensor
    policy_mse_l: torch.Tensor
    reference_mse_w: torch.Tensor
    reference_mse_l: torch.Tensor

    @property
    def implicit_accuracy(self) -> torch.Tensor:
        """Share of pairs whose winner the policy prefers more than the reference does (ties count half)."""
        return ((self.reward_margin > 0).float() + 0.5 * (self.reward_margin == 0).float()).mean()


def diffusion_dpo_loss(
    policy_prediction: torch.Tensor,
    reference_prediction: torch.Tensor,
    target: torch.Tensor,
    beta: float = DEFAULT_BETA,
) -> DPOTerms:
    """Diffusion-DPO, paper Eq. 3.

    ``L_DPO = -log sigmoid(-beta * ((mse_pol_w - mse_ref_w) - (mse_pol_l - mse_ref_l)))``

    Args:
        policy_prediction: ``[2B, C, H, W]`` UNet output of the trained model, winners first.
        reference_prediction: the same for the frozen reference (no gradient needed).
        target: the regression target (the added noise for epsilon models).
        beta: KL strength (see the module docstring for the 0.5 * beta convention of other code).
    """
    policy_mse_w, policy_mse_l = per_sample_mse(policy_prediction, target).chunk(2)
    reference_mse_w, reference_mse_l = per_sample_mse(reference_prediction.detach(), target).chunk(2)
    reward_margin = -beta * ((policy_mse_w - reference_mse_w) - (policy_mse_l - reference_mse_l))
    return DPOTerms(
        loss=-F.logsigmoid(reward_margin),
        reward_margin=reward_margin,
        policy_mse_w=policy_mse_w,
        policy_mse_l=policy_mse_l,
        reference_mse_w=reference_mse_w,
        reference_mse_l=reference_mse_l,
    )


def ddpm_previous_sample(
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    step_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDPM ancestral step ``x_t -> x_{t-1}`` with per-sample timesteps.

    The same arithmetic as diffusers' ``DDPMScheduler.step`` with all 1000 training steps
    (``variance_type="fixed_small"``), vectorised over a batch of different timesteps. The random
    part ``sigma_t * z`` is added only when ``step_noise`` is given: it is the same for the policy and
    the reference in Eq. 8, so it cancels exactly in their difference of channel means.
    """
    alphas_cumprod = alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    shape = (-1,) + (1,) * (sample.ndim - 1)
    alpha_prod_t = alphas_cumprod[timesteps].view(shape)
    alpha_prod_prev = torch.where(
        timesteps > 0, alphas_cumprod[(timesteps - 1).clamp(min=0)], torch.ones_like(alphas_cumprod[timesteps])
    ).view(shape)
    beta_prod_t = 1 - alpha_prod_t
    current_alpha = alpha_prod_t / alpha_prod_prev
    current_beta = 1 - current_alpha
    sample, model_output = sample.float(), model_output.float()
    if prediction_type == "epsilon":
        predicted_original = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
    elif prediction_type == "v_prediction":
        predicted_original = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction).")
    if clip_sample_range is not None:
        predicted_original = predicted_original.clamp(-clip_sample_range, clip_sample_range)
    original_coefficient = alpha_prod_prev.sqrt() * current_beta / beta_prod_t
    sample_coefficient = current_alpha.sqrt() * (1 - alpha_prod_prev) / beta_prod_t
    previous = original_coefficient * predicted_original + sample_coefficient * sample
    if step_noise is not None:
        variance = ((1 - alpha_prod_prev) / beta_prod_t * current_beta).clamp(min=1e-20)
        nonzero = (timesteps > 0).float().view(shape)
        previous = previous + nonzero * variance.sqrt() * step_noise.float()
    return previous


def statistic_matching_loss(policy_previous: torch.Tensor, reference_previous: torch.Tensor) -> torch.Tensor:
    """Statistic matching, paper Eq. 8, per sample.

    ``L_stat = || mean_c(x_{t-1}^policy) - mean_c(x_{t-1}^ref) ||_2^2`` where ``mean_c`` is the
    channel-wise mean over (H, W) and the squared norm sums over channels.
    """
    reduce_dims = tuple(range(2, policy_previous.ndim))
    difference = policy_previous.mean(dim=reduce_dims) - reference_previous.mean(dim=reduce_dims)
    return difference.pow(2).sum(dim=1)


@dataclass
class HGDPOLoss:
    """Eq. 9 and its parts; ``loss`` is the scalar to back-propagate."""

    loss: torch.Tensor
    dpo: DPOTerms
    statistic: torch.Tensor  # per pair, Eq. 8
    lambda_stat: float

    def scalars(self) -> dict[str, float]:
        """Detached figures for logging (one device-to-host copy, so one GPU sync per call)."""
        dpo = self.dpo
        values = torch.stack([
            dpo.loss.mean(), self.statistic.mean(), dpo.implicit_accuracy, dpo.reward_margin.mean(),
            dpo.policy_mse_w.mean(), dpo.policy_mse_l.mean(), dpo.reference_mse_w.mean(), dpo.reference_mse_l.mean(),
        ]).detach().float().tolist()
        dpo_loss, statistic, accuracy, margin, policy_w, policy_l, reference_w, reference_l = values
        weighted_stat = self.lambda_stat * statistic
        total = dpo_loss + weighted_stat
        return {
            "loss/total": total,
            "loss/dpo": dpo_loss,
            "loss/stat": statistic,
            "loss/stat_weighted": weighted_stat,
            "loss/stat_share": weighted_stat / total if total else 0.0,
            "dpo/implicit_accuracy": accuracy,
            "dpo/reward_margin": margin,
            "mse/policy_win": policy_w,
            "mse/policy_lose": policy_l,
            "mse/reference_win": reference_w,
            "mse/reference_lose": reference_l,
        }


def hgdpo_loss(
    policy_prediction: torch.Tensor,
    reference_prediction: torch.Tensor,
    target: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    beta: float = DEFAULT_BETA,
    lambda_stat: float = DEFAULT_LAMBDA_STAT,
    clip_sample_range: float | None = None,
) -> HGDPOLoss:
    """The HG-DPO objective, paper Eq. 9: ``L = L_DPO + lambda_stat * L_stat``.

    The statistic term reuses the UNet outputs of the DPO term: x_{t-1} of the winners is one
    DDPM step from the same x_t with the policy's and the reference's predictions, so it costs no
    extra UNet evaluation. With ``lambda_stat = 0`` it is skipped.
    """
    dpo = diffusion_dpo_loss(policy_prediction, reference_prediction, target, beta)
    if lambda_stat:
        winners = slice(0, noisy_latents.shape[0] // 2)
        step = dict(
            timesteps=timesteps[winners],
            sample=noisy_latents[winners],
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            clip_sample_range=clip_sample_range,
        )
        statistic = statistic_matching_loss(
            ddpm_previous_sample(policy_prediction[winners], **step),
            ddpm_previous_sample(reference_prediction[winners].detach(), **step),  # frozen reference
        )
    else:
        statistic = torch.zeros_like(dpo.loss)
    return HGDPOLoss(
        loss=(dpo.loss + lambda_stat * statistic).mean(),
        dpo=dpo,
        statistic=statistic,
        lambda_stat=lambda_stat,
    )


def sft_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain noise-prediction loss on the winners only: the paper's SFT baseline."""
    return per_sample_mse(prediction, target).mean()
