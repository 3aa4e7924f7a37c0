"""The "HG-DPO" accordion (an always-visible script) in txt2img and img2img, its settings, X/Y/Z axes and
API route. Imports ``modules.*`` and gradio (3.41 in A1111 1.10, 4.x in Forge).

The WebUI runs an always-visible script's hooks inside ``process_images`` and only logs what they raise;
a problem the user must see (no LoRA chosen, an SD3 or Flux checkpoint with a LAN sampler, missing PickScore
weights) therefore replaces ``p.sample`` with a function raising :class:`HGDPOError`, so generation stops
with that message in the UI's error box and in the API's error body, before any sampling. Generations
that use neither a LAN sampler nor best-of-N are never touched.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import numpy as np
import torch
from modules import devices, script_callbacks, scripts, shared
from PIL import Image

from hgdpo.inference.infotext import BEST_OF_KEY, LAN_KEY, LORA_HASH_KEY, LORA_KEY, SCORE_KEY, WEIGHT_KEY

from . import best_of, lora_files, webui_samplers
from . import settings as hs
from . import webui_backend as backend
from .webui_samplers import SETTINGS_ATTRIBUTE, HGDPOError

logger = logging.getLogger("hgdpo")

LAN_SAMPLERS = webui_samplers.register()
JOB_ATTRIBUTE = "hgdpo_job"
SCORER_OPTION = "hgdpo_scorer_dir"


def _lora_choices() -> list[str]:
    return [hs.NO_LORA, *(entry.name for entry in lora_files.list_loras(backend.lora_folder()))]


def _default_lora_choice() -> str:
    default = webui_samplers.default_lora()
    return default if default in _lora_choices() else hs.NO_LORA


def _intro() -> str:
    samplers = ", ".join(f"**{name}**" for name in LAN_SAMPLERS) or "none (this WebUI lacks the base samplers)"
    notes = [
        (f"LAN samplers: {samplers}. With one of them selected, each step runs the model without (SFT) and with "
         "(DPO) the HG-DPO LoRA from the same noise and renormalises the DPO latent (LAN); other samplers ignore "
         "the LoRA settings here (use `<lora:...>` in the prompt for plain LoRA sampling)."),
        "Best-of-N works with every sampler: N candidates per image, ranked by PickScore; the best is kept.",
    ]
    if backend.IS_FORGE:
        notes.append("Forge: LAN and best-of-N run on Forge's samplers; SD1.5- and SDXL-family checkpoints "
                     "(not SD2, SD3 or Flux) work with the LAN samplers.")
    return "\n\n".join(notes)


class KeptImage(NamedTuple):
    """What the WebUI lists for one image best-of-N kept (its infotext and "reuse seed" read these)."""

    prompt: str
    negative_prompt: str
    seed: int
    subseed: int


class _Job:
    """What the script resolved for one ``process_images`` call."""

    def __init__(self, settings: hs.Settings):
        self.settings = settings
        self.lan = False
        self.original_batch_size = None
        self.scores: dict[tuple[int, int], float] = {}
        self.kept: list[KeptImage] = []


def _fail(p, error: BaseException) -> None:
    """Stop this generation with ``error``'s message, before sampling (see the module docstring)."""
    message = str(error)
    logger.error("HG-DPO: %s", message)

    def sample(*_args, **_kwargs):
        raise HGDPOError(message)

    p.sample = sample


def _uses_lan(p) -> bool:
    names = [p.sampler_name]
    if getattr(p, "enable_hr", False):
        names.append(getattr(p, "hr_sampler_name", None))
    return any(hs.is_lan_sampler(name) for name in names if name)


def _to_pil(tensor: torch.Tensor) -> Image.Image:
    """A decoded batch row ([3, H, W] in [0, 1]) as the WebUI turns it into an image."""
    array = 255.0 * np.moveaxis(tensor.detach().float().cpu().numpy(), 0, 2)
    return Image.fromarray(array.astype(np.uint8))


def _scorer(settings: hs.Settings):
    device = devices.device
    dtype = torch.float16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    folder = backend.scorer_folder(settings.scorer_dir)
    try:
        return best_of.cached_scorer(folder, str(device), dtype)
    except AttributeError as error:  # the WebUI's torch.load guard returns None for files it distrusts
        if "NoneType" not in str(error):
            raise
        raise HGDPOError(
            f"The WebUI's safe unpickler refused PickScore's pytorch_model.bin in {folder}. Use its model.safetensors "
            "(download it with the commands of the missing-weights message), or start the WebUI with "
            "--disable-safe-unpickle if you trust the file."
        ) from error


def _score_text(p=None, index=0, all_seeds=None, all_subseeds=None, **_kwargs):
    """Infotext value of ``HG-DPO score`` for one image (called by the WebUI's create_infotext)."""
    job = getattr(p, JOB_ATTRIBUTE, None)
    if job is None or all_seeds is None or all_subseeds is None or index >= len(all_seeds):
        return None
    score = job.scores.get((all_seeds[index], all_subseeds[index]))
    return None if score is None else hs.format_score(score)


class HGDPOScript(scripts.Script):
    """The HG-DPO accordion: LoRA file, weight slider, LAN strength, best-of-N, scorer weights folder."""

    sorting_priority = 20

    def title(self):
        return hs.SCRIPT_TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from modules.ui_common import create_refresh_button

        with gr.Accordion(hs.SCRIPT_TITLE, open=False, elem_id=self.elem_id("accordion")):
            gr.Markdown(_intro())
            with gr.Row():
                lora = gr.Dropdown(label="HG-DPO LoRA (from the Lora folder)", choices=_lora_choices(),
                                   value=_default_lora_choice(), elem_id=self.elem_id("lora"))
                create_refresh_button(
                    lora, lambda: None, lambda: {"choices": _lora_choices()}, self.elem_id("lora_refresh")
                )
            weight = gr.Slider(
                label="HG-DPO LoRA weight",
                minimum=hs.WEIGHT_RANGE[0],
                maximum=hs.WEIGHT_RANGE[1],
                step=0.05,
                value=hs.DEFAULT_WEIGHT,
                elem_id=self.elem_id("weight"),
            )
            lan_strength = gr.Slider(label="LAN strength (1 = the paper's latent adaptive normalization, 0 = off)",
                                     minimum=0.0, maximum=1.0, step=0.05, value=hs.DEFAULT_LAN_STRENGTH,
                                     elem_id=self.elem_id("lan_strength"))
            with gr.Row():
                best = gr.Slider(label="Best-of-N with PickScore (1 = off)", minimum=1, maximum=hs.MAX_BEST_OF, step=1,
                                 value=1, elem_id=self.elem_id("best_of"))
                show_candidates = gr.Checkbox(label="Also return the other candidates, best first", value=False,
                                              elem_id=self.elem_id("show_candidates"))
            scorer_dir = gr.Textbox(label="PickScore weights folder", value="",
                                    placeholder=str(backend.scorer_folder("")), elem_id=self.elem_id("scorer_dir"))

        self.infotext_fields = [
            (lora, self._paste_lora),
            (weight, WEIGHT_KEY),
            (lan_strength, LAN_KEY),
            (best, BEST_OF_KEY),
        ]
        self.paste_field_names = [LORA_KEY, LORA_HASH_KEY, WEIGHT_KEY, LAN_KEY, BEST_OF_KEY]
        return [lora, weight, lan_strength, best, scorer_dir, show_candidates]

    @staticmethod
    def _paste_lora(params):
        """The dropdown value for a pasted infotext: the file by name, else by hash; None (unchanged) if unknown.

        A plain value, not ``gr.update``: the WebUI's API reader of ``infotext`` unwraps gradio 3's updates
        only, and both WebUIs' paste code turn a plain value into the update themselves.
        """
        values = hs.from_infotext(params)
        if "lora" not in values:
            return None
        try:
            entry = lora_files.resolve(values["lora"], backend.lora_folder(), values.get("lora_hash"))
        except FileNotFoundError:
            logger.warning("HG-DPO: pasted LoRA %r is not in %s", values["lora"], backend.lora_folder())
            return None
        return entry.name

    # ------------------------------------------------------------------ processing hooks

    def before_process(self, p, *args):
        p.extra_generation_params = dict(p.extra_generation_params)
        for key in hs.ALL_KEYS:
            p.extra_generation_params.pop(key, None)
        try:
            settings = hs.with_overrides(hs.from_args(args), getattr(p, hs.XYZ_OVERRIDES, None))
        except hs.SettingsError as error:
            setattr(p, JOB_ATTRIBUTE, None)
            if _uses_lan(p) or hs.raw_best_of(args) > 1:
                _fail(p, error)
            else:  # the accordion is unused by this generation: never stop it
                logger.warning("HG-DPO: ignored (%s)", error)
            return
        job = _Job(settings)
        setattr(p, JOB_ATTRIBUTE, job)
        setattr(p, SETTINGS_ATTRIBUTE, settings)
        if settings.best_of > 1:
            init_images = getattr(p, "init_images", None)
            if init_images is not None and len(init_images) > 1:
                _fail(p, HGDPOError("HG-DPO best-of-N in img2img works with one init image (the batch holds its N "
                                    f"candidates); got {len(init_images)} images."))
                return
            job.original_batch_size = p.batch_size
            p.batch_size = p.batch_size * settings.best_of

    def process(self, p, *args):
        job: _Job | None = getattr(p, JOB_ATTRIBUTE, None)
        if job is None:
            return
        settings = job.settings
        job.lan = _uses_lan(p)
        try:
            if job.lan:
                family = webui_samplers.check_model(shared.sd_model)
                if getattr(p, "refiner_checkpoint_info", None) is not None:
                    raise HGDPOError("The HG-DPO LAN samplers do not support the refiner (it swaps the model mid-way).")
                entry, _lora = webui_samplers.resolve_lora(webui_samplers.generation_settings(p), family)
                tag = re.compile(rf"<lora:{re.escape(entry.path.stem)}[:>]")
                if any(tag.search(prompt) for prompt in (p.all_prompts or [])):
                    raise HGDPOError(
                        f"Remove <lora:{entry.path.stem}:...> from the prompt: with a LAN sampler the HG-DPO "
                        "accordion applies this LoRA to the DPO model only (in the prompt it would change the SFT "
                        "model too)."
                    )
                fields = hs.infotext_fields(settings, entry.name, lora_files.short_hash(entry.path), True)
                p.extra_generation_params.update(fields)
            if settings.best_of > 1:
                _scorer(settings)  # load now: missing weights stop the job before sampling
                p.extra_generation_params[BEST_OF_KEY] = settings.best_of
                p.extra_generation_params[SCORE_KEY] = _score_text
        except Exception as error:  # noqa: BLE001 (every problem here is reported to the user, not only ours)
            _fail(p, error)

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        job: _Job | None = getattr(p, JOB_ATTRIBUTE, None)
        if job is None or job.settings.best_of <= 1:
            return
        count = len(pp.images)
        if count % job.settings.best_of:
            logger.warning("HG-DPO best-of-N: %d images do not split into groups of %d; kept all.",
                           count, job.settings.best_of)
            return
        images = [_to_pil(image) for image in pp.images]
        picks = best_of.select(_scorer(job.settings), list(p.prompts), images, job.settings.best_of,
                               job.settings.show_candidates)
        rows = [pick.row for pick in picks]
        pp.images = [pp.images[row] for row in rows]
        for name in ("prompts", "negative_prompts", "seeds", "subseeds"):
            values = getattr(p, name, None)
            if values is not None and len(values) == count:
                setattr(p, name, [values[row] for row in rows])
        for pick, seed, subseed in zip(picks, p.seeds, p.subseeds):
            job.scores[(seed, subseed)] = pick.score
        job.kept.extend(map(KeptImage, p.prompts, p.negative_prompts, p.seeds, p.subseeds))

    def postprocess(self, p, processed, *args):
        job: _Job | None = getattr(p, JOB_ATTRIBUTE, None)
        if job is None or job.original_batch_size is None:
            return
        p.batch_size = job.original_batch_size
        if job.kept:  # the job's lists follow the kept images, so "reuse seed" & co. point at the right one
            processed.all_prompts = [kept.prompt for kept in job.kept]
            processed.all_negative_prompts = [kept.negative_prompt for kept in job.kept]
            processed.all_seeds = [kept.seed for kept in job.kept]
            processed.all_subseeds = [kept.subseed for kept in job.kept]
            processed.batch_size = len(job.kept) // max(1, p.n_iter)


# ---------------------------------------------------------------------- settings, X/Y/Z, API


def _on_ui_settings():
    section = ("hgdpo", "HG-DPO")
    shared.opts.add_option(webui_samplers.DEFAULT_LORA_OPTION, shared.OptionInfo(
        "", "Default HG-DPO LoRA (name in the Lora folder; used when the accordion or an API call names none)",
        section=section))
    shared.opts.add_option(SCORER_OPTION, shared.OptionInfo(
        "", f"PickScore weights folder for best-of-N (empty: {backend.default_scorer_folder()})", section=section))


def _xyz_module():
    for data in scripts.scripts_data:
        if Path(data.path).name == "xyz_grid.py" and hasattr(data.module, "AxisOption"):
            return data.module
    return None


def _override(field):
    def apply(p, value, _values):
        overrides = dict(getattr(p, hs.XYZ_OVERRIDES, None) or {})
        overrides[field] = value
        setattr(p, hs.XYZ_OVERRIDES, overrides)

    return apply


def _add_xyz_axes():
    xyz = _xyz_module()
    if xyz is None:
        return
    axes = [
        xyz.AxisOption("[HG-DPO] LoRA weight", float, _override("weight")),
        xyz.AxisOption("[HG-DPO] LAN strength", float, _override("lan_strength")),
        xyz.AxisOption("[HG-DPO] Best-of-N", int, _override("best_of")),
        xyz.AxisOption("[HG-DPO] LoRA", str, _override("lora"), choices=lambda: _lora_choices()[1:]),
    ]
    known = {axis.label for axis in xyz.axis_options}
    xyz.axis_options.extend(axis for axis in axes if axis.label not in known)


def _xyz_axes() -> dict[str, dict[str, int]]:
    """The X/Y/Z plot's axis type indices per tab (what its API ``script_args`` take as x_type/y_type/z_type)."""
    xyz = _xyz_module()
    if xyz is None:
        return {}
    result = {}
    for tab, is_img2img in (("txt2img", False), ("img2img", True)):
        options = [axis for axis in xyz.axis_options if type(axis) is xyz.AxisOption or axis.is_img2img == is_img2img]
        result[tab] = {axis.label: index for index, axis in enumerate(options)}
    return result


def _xyz_arguments() -> list[str]:
    """The names of the X/Y/Z plot's arguments in the order its API ``script_args`` take them (they differ
    between WebUIs: Forge Neo adds ``row_count``)."""
    xyz = _xyz_module()
    run = getattr(getattr(xyz, "Script", None), "run", None)
    if run is None:
        return []
    return list(inspect.signature(run).parameters)[2:]  # after self and p


def _loaded_model():
    """The loaded checkpoint, or None (Forge loads the checkpoint at the first job)."""
    model = shared.sd_model
    return None if model is None or type(model).__name__ == "FakeInitialModel" else model


def _status() -> dict:
    folder = backend.lora_folder()
    entries = lora_files.list_loras(folder)
    model = _loaded_model()
    model_problem = None if model is None else backend.model_family_problem(model)
    family = None if model is None or model_problem else backend.model_family(model)
    loras = [{"name": entry.name, "hash": summary.hash, "hgdpo": summary.hgdpo, "problem": summary.problem,
              "family": summary.family}
             for entry, summary in zip(entries, lora_files.summaries(entries, family))]
    scorer_folder = backend.scorer_folder("")
    try:
        best_of.pickscore_folders(scorer_folder)
        scorer_problem = None
    except Exception as error:  # noqa: BLE001
        scorer_problem = str(error)
    return {"backend": backend.NAME, "lan_samplers": LAN_SAMPLERS, "lora_folder": str(folder), "loras": loras,
            "default_lora": webui_samplers.default_lora() or None, "scorer_folder": str(scorer_folder),
            "scorer_ready": scorer_problem is None, "scorer_problem": scorer_problem,
            "model_problem": model_problem, "model_family": None if family is None else family.label,
            "xyz_axes": _xyz_axes(), "xyz_arguments": _xyz_arguments()}


STATUS_ROUTE = "/hgdpo/v1/status"


def _on_app_started(_demo, app):
    """Mount the status route like the WebUI's own API routes: only with ``--api``, behind ``--api-auth``."""
    dependencies = backend.api_dependencies(app)
    if dependencies is None:
        logger.info("HG-DPO: the WebUI's API is off (no --api), so %s is not mounted.", STATUS_ROUTE)
        return
    app.add_api_route(STATUS_ROUTE, _status, methods=["GET"], dependencies=dependencies)


def register_callbacks() -> None:
    """Register the WebUI callbacks; called by the loader in scripts/ each time the WebUI (re)loads it, since
    "Reload UI" clears every callback while this package stays imported."""
    script_callbacks.on_ui_settings(_on_ui_settings)
    _add_xyz_axes()  # now: the API builds its default script arguments (X/Y/Z's axis list) before on_before_ui
    script_callbacks.on_before_ui(_add_xyz_axes)  # and again, in case X/Y/Z loads after this extension
    script_callbacks.on_app_started(_on_app_started)
