"""The toy world's AI feedback: a small learned, prompt-aware, imperfect scorer (PickScore's role).

A CNN reads the image and predicts whether the figure is well formed and which pose, shirt colour and
background it shows; the score of (prompt, image) is the log-probability that the image is a well-formed
figure with the prompt's pose, colour and background. It is trained on *renders* only (not on the SFT
model's samples), and it never sees an extra limb: like PickScore with fingers, it is blind to some
failures. Plug it into any command with ``--scorer hgdpo.toyworld.scorer:WorldScorer`` (``--scorer-model``
takes another weights file; the default is the shipped one).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL.Image import Image
from safetensors.torch import load_file, save_file
from torch import nn

from hgdpo.toyworld import world

logger = logging.getLogger("hgdpo.toyworld")

SHIPPED = Path(__file__).resolve().parent / "shipped"  # the built world that ships with the package
HEADS = {"pose": tuple(world.POSES), "colour": tuple(world.COLOURS), "background": tuple(world.BACKGROUNDS)}
SCORER_KINDS = ("missing_limb", "broken_limb", "wrong_pose", "wrong_colour", "melted")  # no extra_limb


class FigureNet(nn.Module):
    """32 px image -> one form logit and the logits of each attribute head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 3, padding=1), nn.SiLU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(48, 48, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(48 * 8 * 8, 96), nn.SiLU(),
        )
        self.form = nn.Linear(96, 1)
        self.heads = nn.ModuleDict({name: nn.Linear(96, len(values)) for name, values in HEADS.items()})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.features(images)
        return self.form(hidden).squeeze(-1), {name: head(hidden) for name, head in self.heads.items()}


def to_tensor(images: Sequence[Image]) -> torch.Tensor:
    """PIL images (resized to 32 px when needed) -> (N, 3, 32, 32) in [-1, 1]."""
    size = (world.SIZE, world.SIZE)
    arrays = [np.asarray(image.convert("RGB").resize(size) if image.size != size else image.convert("RGB"),
                         np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _targets(scenes: Sequence[world.Scene]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(scene, name)) for scene in scenes])
            for name, values in HEADS.items()}


class WorldScorer:
    """``score(prompts, images)``: log P(well formed) + log P(prompt's pose, colour and background)."""

    def __init__(self, model: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        path = Path(model) if model is not None else SHIPPED / "scorer.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"Toy-world scorer weights {path} not found: pass --scorer-model FILE or "
                                    "rebuild the world with 'python -m hgdpo.toyworld build OUT'.")
        self.name = "toyworld-scorer"
        self.device = torch.device(device)
        self.net = FigureNet()
        self.net.load_state_dict(load_file(str(path)))
        self.net.to(self.device).eval()

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Image]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image.")
        if not images:
            return torch.empty(0)
        form, heads = self.net(to_tensor(images).to(self.device))
        scores = nn.functional.logsigmoid(form)
        for name, index in _targets([world.parse_prompt(prompt) for prompt in prompts]).items():
            log_probs = heads[name].log_softmax(-1)
            scores = scores + log_probs.gather(1, index.to(self.device)[:, None]).squeeze(1)
        return scores.float().cpu()


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A little blur and noise, so that the scorer accepts the SFT model's soft samples."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :]) / 16
    blurred = nn.functional.conv2d(nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"),
                                   kernel.expand(3, 1, 3, 3), groups=3)
    amount = torch.rand(len(images), 1, 1, 1, generator=generator)
    noise = 0.04 * torch.randn(images.shape, generator=generator)
    return images + amount * (blurred - images) + noise


def train_scorer(path: str | Path, seed: int = 0, steps: int = 1500, num_images: int = 8000,
                 batch_size: int = 64) -> Path:
    """Train :class:`FigureNet` on renders (half of them malformed, never with an extra limb); save it."""
    torch.manual_seed(seed)
    stream = world.training_examples(seed + 10, 0.5, SCORER_KINDS)
    examples = [next(stream) for _ in range(num_images)]
    images = to_tensor([example.image for example in examples])
    well_formed = torch.tensor([example.kind in (None, "wrong_pose", "wrong_colour") for example in examples])
    targets = _targets([example.drawn for example in examples])
    net = FigureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed + 11)
    for step in range(steps):
        index = torch.randint(0, num_images, (batch_size,), generator=generator)
        form, heads = net(_augment(images[index], generator))
        loss = nn.functional.binary_cross_entropy_with_logits(form, well_formed[index].float())
        for name, logits in heads.items():
            loss = loss + nn.functional.cross_entropy(logits, targets[name][index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            logger.info("scorer step %d/%d: loss %.4f", step + 1, steps, loss.item())
    save_file({key: value.contiguous() for key, value in net.state_dict().items()}, str(path))
    return Path(path)
