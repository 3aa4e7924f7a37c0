"""PickScore best-of-N: ``PickScore Loader`` and ``PickScore Best-of-N``.

PickScore lives in the ``models/pickscore`` folder (registered with ComfyUI's folder paths, so
``extra_model_paths.yaml`` can add more with the key ``pickscore``)::

    models/pickscore/PickScore_v1/                       config.json + model.safetensors
    models/pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K/    preprocessor_config.json + tokenizer files

or comes from the hub when ComfyUI is online. The loaded model is handed to ComfyUI's model management
(a ModelPatcher), which moves it to the GPU to score and offloads it under memory pressure. Scores are
:class:`hgdpo.feedback.scorers.PickScoreScorer`'s raw PickScore values (``logit_scale * cos``, never softmaxed over
the batch), so they compare across runs; the ranking is :func:`hgdpo.feedback.selection.rank_candidates`.
"""

from __future__ import annotations

import os

import folder_paths

from hgdpo.feedback.scorers import PICKSCORE_WEIGHTS
from hgdpo.inference.infotext import format_score

from .comfy_internals import io, load_fully, managed_model, require, scorer_devices, ui

CATEGORY = "HG-DPO"
FOLDER = "pickscore"
MODEL_HUB_ID = PICKSCORE_WEIGHTS.model_repo
PROCESSOR_HUB_ID = PICKSCORE_WEIGHTS.processor_repo
MODEL_FOLDER = os.path.basename(PICKSCORE_WEIGHTS.model_dir)
PROCESSOR_FOLDER = os.path.basename(PICKSCORE_WEIGHTS.processor_dir)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

# models/pickscore, after any folder extra_model_paths.yaml gave for "pickscore"
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))

PickScoreModel = io.Custom("HGDPO_PICKSCORE")


def pickscore_folders() -> list[str]:
    """The ``models/pickscore`` folders (all of them, also the ones of extra_model_paths.yaml)."""
    return list(folder_paths.get_folder_paths(FOLDER))


def local_choices() -> list[str]:
    """Sub-folders of the pickscore folders, by name."""
    names = set()
    for root in pickscore_folders():
        if os.path.isdir(root):
            names.update(entry.name for entry in os.scandir(root) if entry.is_dir())
    return sorted(names)


def resolve(choice: str) -> str:
    """A sub-folder name to its path. A hub id resolves to a local folder named like the repository
    (``yuvalkirstain/PickScore_v1`` -> ``models/pickscore/PickScore_v1``) when there is one, else stays a hub id."""
    for name in (choice, choice.rsplit("/", 1)[-1]):
        for root in pickscore_folders():
            candidate = os.path.join(root, name)
            if os.path.isdir(candidate):
                return candidate
    return choice


def _choices(hub_id: str) -> list[str]:
    """The hub id (first: the default, using the local copy when there is one), then the local folders."""
    return [hub_id] + [name for name in local_choices() if name != hub_id]


def missing_weights_message(error: Exception) -> str:
    """The scorer's complaint (first line) plus where ComfyUI looks and how to fetch the files."""
    folder = pickscore_folders()[0]
    problem = str(error).splitlines()[0]
    return "\n".join([
        problem,
        "",
        f"ComfyUI looks for PickScore in its models/pickscore folder: {folder}",
        "Fetch the model and its processor once, on a machine with internet access:",
        PICKSCORE_WEIGHTS.under(folder).fetch_commands(),
        "then run the workflow again: the loader's default hub ids use these folders when they exist.",
    ])


class ManagedPickScore:
    """A PickScore scorer whose CLIP model ComfyUI's model management loads and offloads."""

    def __init__(self, scorer, patcher):
        self.scorer = scorer
        self.patcher = patcher

    def score(self, prompts, images):
        load_fully(self.patcher)
        self.scorer.device = self.patcher.load_device
        return self.scorer.score(prompts, images)


class PickScoreLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGDPOPickScoreLoader",
            display_name="PickScore Loader (HG-DPO)",
            category=CATEGORY,
            description="Loads PickScore (the AI feedback of HG-DPO) from models/pickscore, or from the hub when "
                        "online.",
            inputs=[
                io.Combo.Input("model", options=_choices(MODEL_HUB_ID), default=MODEL_HUB_ID,
                               tooltip=f"The hub id (uses models/pickscore/{MODEL_FOLDER} when it is there, else "
                                       "downloads when online) or a folder in models/pickscore."),
                io.Combo.Input("processor", options=_choices(PROCESSOR_HUB_ID), default=PROCESSOR_HUB_ID,
                               tooltip=f"The CLIP-H processor: the hub id (uses models/pickscore/{PROCESSOR_FOLDER} "
                                       "when it is there) or a folder in models/pickscore."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="auto: fp16 where ComfyUI runs models in fp16, else fp32."),
            ],
            outputs=[PickScoreModel.Output(display_name="PICKSCORE")],
        )

    @classmethod
    def execute(cls, model, processor, precision) -> io.NodeOutput:
        import torch

        from hgdpo.feedback.scorers import PickScoreScorer, ScorerWeightsError

        require("PickScore")
        load_device, offload_device, fp16 = scorer_devices()
        if precision == "auto":
            dtype = torch.float16 if fp16 else torch.float32
        else:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        try:
            scorer = PickScoreScorer(model=resolve(model), processor=resolve(processor), device=offload_device,
                                     dtype=dtype)
        except ScorerWeightsError as error:
            raise ScorerWeightsError(missing_weights_message(error)) from error
        holder = torch.nn.Module()  # ModelPatcher sets attributes (device...) that a transformers model forbids
        holder.pickscore = scorer.model
        patcher = managed_model(holder, load_device, offload_device)
        return io.NodeOutput(ManagedPickScore(scorer, patcher))


class PickScoreBestOfN(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGDPOPickScoreBestOfN",
            display_name="PickScore Best-of-N (HG-DPO)",
            category=CATEGORY,
            description="Scores every image of a batch against the prompt with PickScore and returns the best one, "
                        "the batch sorted best first, and the raw scores (comparable across runs).",
            inputs=[
                PickScoreModel.Input("pickscore"),
                io.Image.Input("images"),
                io.String.Input("prompt", multiline=True, tooltip="The prompt the images were generated for."),
            ],
            outputs=[
                io.Image.Output("best", display_name="best"),
                io.Image.Output("ranked", display_name="ranked"),
                io.Float.Output("scores", display_name="scores", is_output_list=True),
            ],
        )

    @classmethod
    def execute(cls, pickscore, images, prompt) -> io.NodeOutput:
        import numpy as np
        from PIL import Image

        from hgdpo.feedback.selection import rank_candidates

        pixels = (images.clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
        ranked = rank_candidates(pickscore, prompt, [Image.fromarray(frame) for frame in pixels])
        order = [candidate.index for candidate in ranked]
        scores = [candidate.score for candidate in ranked]
        report = "\n".join(f"#{rank + 1}: image {candidate.index} PickScore {format_score(candidate.score)}"
                           for rank, candidate in enumerate(ranked))
        return io.NodeOutput(images[order[0]: order[0] + 1], images[order], scores, ui=ui.PreviewText(report))
