"""Generation parameters as text, in the WebUI's ``parameters`` convention (PNG text chunk).

The layout AUTOMATIC1111/Forge write and read back (PNG Info, "send to txt2img")::

    a woman singing on the stage
    Negative prompt: blurry
    Steps: 50, Sampler: DPM++ 2M, CFG scale: 5.0, Seed: 7, Size: 512x512, HG-DPO weight: 0.5, HG-DPO LAN: 1.0

The ``HG-DPO ...`` keys are shared by the command line and the WebUI extension, so an image made by
either is read back by both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

PARAMETERS_KEY = "parameters"
LORA_KEY = "HG-DPO LoRA"
LORA_HASH_KEY = "HG-DPO LoRA hash"
WEIGHT_KEY = "HG-DPO weight"
LAN_KEY = "HG-DPO LAN"
BEST_OF_KEY = "HG-DPO best-of"
SCORE_KEY = "HG-DPO score"
NEGATIVE_PREFIX = "Negative prompt: "
_FIELD = re.compile(r'\s*([\w \-/+.()]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: object) -> str:
    """A value as the WebUI writes it: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(char in text for char in ',:\n"') else text


def format_score(score: float) -> str:
    """A scorer's value as the ``HG-DPO score`` field (and every report of a best-of-N pick) writes it."""
    return f"{score:.4f}"


def format_parameters(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """The ``parameters`` text: prompt, negative prompt line (when set), then ``Key: value`` pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE_PREFIX + negative_prompt)
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) from a ``parameters`` text; the inverse of :func:`format_parameters`."""
    *head, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:  # the WebUI's rule: a field line has at least three fields
        head, last = [*head, last], ""
    prompt_lines, negative_lines = [], []
    for line in head:
        if line.startswith(NEGATIVE_PREFIX) or negative_lines:
            negative_lines.append(line.removeprefix(NEGATIVE_PREFIX))
        else:
            prompt_lines.append(line)
    fields = {}
    for key, value in _FIELD.findall(last):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return "\n".join(prompt_lines), "\n".join(negative_lines), fields


def save_png(image: Image, path: str | Path, parameters: str) -> Path:
    """Write ``image`` as PNG with ``parameters`` in its text chunk, atomically."""
    from PIL.PngImagePlugin import PngInfo

    from hgdpo.fileio import atomic_path

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG file, or None."""
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get(PARAMETERS_KEY)
