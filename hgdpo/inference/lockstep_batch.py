"""The lockstep batch of LAN sampling inside a frontend's own sampler (ComfyUI, the WebUI).

A frontend runs its k-diffusion-style sampler once on the doubled batch ``[x_sft; x_dpo]`` (SFT rows
first) that starts from the same latent twice. Then

* multistep samplers keep their history per row, so each chain has its own;
* stochastic samplers draw their noise for one chain and give it to both (:class:`PairedNoiseSampler`),
  so the chains see the same noise, as in the paper;
* :class:`InPlaceLANDenoiser` wraps the denoiser the sampler calls: before every evaluation it renormalises
  the DPO half of the latent the sampler passed **in place** (Eq. 7). k-diffusion samplers pass their
  own state tensor, so the step they are about to take continues from the normalised latent, exactly
  as if LAN had run right after the previous step (their step callback comes after the evaluation,
  too late for that). :func:`finish` normalises the final latent once more.

The model evaluates both halves in one batched forward. Its batch may stack several chunks of the
lockstep batch (conditional and unconditional rows for CFG, say): :func:`row_scales` gives the
per-row LoRA scale of such a batch (0 on SFT rows, the weight on DPO rows: the shared-weights fast path
of :class:`hgdpo.models.lora_runtime.FunctionalLoRA`), and :func:`half_rows` the row indices of each chain
when two distinct models must share the rows out.

Framework-free: torch and :mod:`hgdpo.inference.lan` only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hgdpo.inference.lan import DEFAULT_EPS, latent_adaptive_normalization


def paired(x: torch.Tensor) -> torch.Tensor:
    """``[x; x]``: both chains start from (or are given) the same tensor."""
    return torch.cat([x, x])


def _check_pair(x: torch.Tensor, batch: int) -> None:
    if x.shape[0] != 2 * batch:
        raise ValueError(
            f"The LAN lockstep batch must hold the SFT and the DPO chain ({2 * batch} rows), got {x.shape[0]}."
        )


def normalize_in_place(x: torch.Tensor, batch: int, strength: float = 1.0, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Set ``x[batch:]`` (the DPO chain) to its LAN-normalised value against ``x[:batch]``; returns ``x``."""
    _check_pair(x, batch)
    if strength > 0.0:
        x[batch:] = latent_adaptive_normalization(x[batch:], x[:batch], strength, eps)
    return x


def finish(samples: torch.Tensor, batch: int, strength: float = 1.0, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The final lockstep latent with its DPO half normalised once more (a new tensor, SFT half first)."""
    _check_pair(samples, batch)
    return torch.cat([samples[:batch], latent_adaptive_normalization(samples[batch:], samples[:batch], strength, eps)])


class InPlaceLANDenoiser:
    """A sampler's denoiser ``model(x, sigma, **kwargs)`` with LAN applied to ``x`` before each evaluation.

    Attribute access falls through to the wrapped model (samplers read e.g. ``model.inner_model``).
    An ``x`` that is not the lockstep batch (``2 * batch`` rows) is passed on unchanged.
    """

    def __init__(self, model: Callable[..., torch.Tensor], batch: int, strength: float = 1.0):
        self.model = model
        self.batch = batch
        self.strength = strength
        self.evaluations = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.shape[0] == 2 * self.batch:
            normalize_in_place(x, self.batch, self.strength)
        self.evaluations += 1
        return self.model(x, sigma, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


class PairedNoiseSampler:
    """Wraps a noise sampler ``(sigma, sigma_next) -> noise`` made for one chain: both chains get its draw."""

    def __init__(self, inner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.inner = inner

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return paired(self.inner(sigma, sigma_next))


def _chunks(rows: int, batch: int) -> int:
    if batch < 1 or rows % (2 * batch):
        raise ValueError(
            f"A model batch of {rows} rows is not made of lockstep batches of {2 * batch} rows (SFT and DPO chains)."
        )
    return rows // (2 * batch)


def row_scales(rows: int, batch: int, scale: float = 1.0, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row LoRA scale of a model batch made of ``rows / (2 * batch)`` stacked lockstep batches.

    Each chunk is ``[0] * batch + [scale] * batch``: the SFT rows run the base model, the DPO rows the LoRA.
    """
    chunk = torch.cat([torch.zeros(batch, dtype=dtype), torch.full((batch,), float(scale), dtype=dtype)])
    return chunk.repeat(_chunks(rows, batch)).to(device)


def half_rows(rows: int, batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(sft, dpo)`` of a model batch made of stacked lockstep batches, in batch order."""
    chunks = _chunks(rows, batch)
    starts = torch.arange(chunks) * 2 * batch
    offsets = torch.arange(batch)
    sft = (starts[:, None] + offsets[None, :]).reshape(-1)
    return sft.to(device), (sft + batch).to(device)
