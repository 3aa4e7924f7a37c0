"""The WebUI's side of the SFT/DPO lockstep batch. Framework-free (torch only).

The lockstep batch itself is :mod:`hgdpo.inference.lockstep_batch` (shared with ComfyUI): a LAN sampler runs the
WebUI's k-diffusion function on ``[x_sft; x_dpo]``, which starts from one latent twice; stochastic
samplers give both chains the same noise; before every model evaluation the DPO half is renormalised in
place (Eq. 7); :func:`hgdpo.inference.lockstep_batch.finish` normalises the final latent once more.

What the WebUI adds:

* :func:`evaluate`: one lockstep evaluation as **two calls** of the WebUI's CFG denoiser, the SFT half
  with the HG-DPO LoRA's scale at 0, then the DPO half with the scale at the weight (the denoiser's
  fallback for prompts composed with AND; its fast path is one call with per-row LoRA scales,
  :func:`hgdpo.inference.lockstep_batch.row_scales`). The DPO half runs last, so what the WebUI keeps from the latest
  call (the live preview, the latent returned on interrupt) shows the DPO chain.
* :class:`PairedRandn`: ancestral samplers draw through the WebUI's seeded per-image generator
  (``k_diffusion.sampling.torch.randn_like``); both chains get the same draw.
* :func:`dpo_result`: the DPO half of the final latent (or the single-chain latent the WebUI returns
  when the user interrupts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from hgdpo.inference.lockstep_batch import PairedNoiseSampler, finish, normalize_in_place, paired

__all__ = ["PairedNoiseSampler", "PairedRandn", "dpo_result", "evaluate", "paired", "same_random_numbers"]


def evaluate(
    x: torch.Tensor,
    sigma: torch.Tensor,
    batch: int,
    strength: float,
    model: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
) -> torch.Tensor:
    """One lockstep evaluation: LAN on ``x`` in place, then ``model(x_half, sigma_half, dpo)`` per half.

    ``x`` is the sampler's own state tensor, so the step it is about to take continues from the
    normalised latent. Random numbers drawn inside ``model`` are the same for both halves.
    """
    normalize_in_place(x, batch, strength)
    with same_random_numbers(x.device) as rewind:
        sft = model(x[:batch], sigma[:batch], False)
        rewind()
        dpo = model(x[batch:], sigma[batch:], True)
    return torch.cat([sft, dpo])


def dpo_result(samples: torch.Tensor, batch: int, strength: float) -> torch.Tensor:
    """The DPO half of the final lockstep latent, normalised once more.

    An interrupted WebUI sampler hands back its last single-chain preview latent instead: returned as is.
    """
    if samples.shape[0] != 2 * batch:
        return samples
    return finish(samples, batch, strength)[batch:]


@contextmanager
def same_random_numbers(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yield ``rewind()``, which puts the CPU (and ``device``'s) random generator back to where it was."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    yield rewind


class PairedRandn:
    """A stand-in for the ``torch`` module k-diffusion draws ancestral noise from (``torch.randn_like``).

    ``draw()`` gives one chain's noise (the WebUI's seeded per-image generator); a request shaped like
    the lockstep batch gets it twice. Every other attribute comes from ``fallback`` (the WebUI's own
    stand-in, or ``torch``).
    """

    def __init__(self, draw: Callable[[], torch.Tensor], fallback):
        self._draw = draw
        self._fallback = fallback

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        noise = self._draw()
        if noise.shape[0] * 2 == x.shape[0]:
            noise = paired(noise)
        return noise.to(x)

    def __getattr__(self, item):
        return getattr(self._fallback, item)
