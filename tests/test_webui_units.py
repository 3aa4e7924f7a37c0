"""The WebUI extension's framework-free parts (no WebUI needed): settings, infotext, the lockstep
evaluation, LoRA files, best-of-N, the install plan, the device-following LoRA and the LDM name map.

The WebUI glue itself (``extension/webui_*.py`` importing ``modules.*``) runs in
``tests/test_webui_integration.py`` against a real WebUI.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from extension import best_of, install_plan, lora_files, text_encoder_lora, webui_harness, webui_lockstep
from extension import settings as hs
from hgdpo.models.ldm_names import clip_text_kohya_names
from hgdpo.models.lora_runtime import FollowingLoRA
from hgdpo.inference.infotext import (
    BEST_OF_KEY,
    LAN_KEY,
    LORA_HASH_KEY,
    LORA_KEY,
    SCORE_KEY,
    WEIGHT_KEY,
    format_parameters,
    parse_parameters,
)
from hgdpo.inference.lan import latent_adaptive_normalization
from hgdpo.models.ldm_names import diffusers_to_ldm_prefixes, ldm_to_diffusers_names, ldm_unet_kohya_names
from hgdpo.models.families import SD15, SDXL
from hgdpo.models.lora_runtime import FunctionalLoRA, LoRAArchitectureError, read_lora, unet_kohya_modules
from hgdpo.feedback.scorers import FunctionScorer, ScorerWeightsError
from tests import sd15_factory

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- layout


def test_framework_free_modules_import_without_the_webui():
    """CI imports these; the WebUI glue must stay out of them (no ``modules``, no gradio)."""
    code = (
        "import sys; import extension.settings, extension.webui_lockstep, extension.lora_files, extension.best_of, "
        "extension.install_plan, extension.webui_harness, extension.text_encoder_lora, hgdpo.models.ldm_names; "
        "bad = [m for m in ('modules', 'gradio', 'k_diffusion', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_webui_glue_is_not_imported_by_the_test_collection():
    for name in ("extension.webui_backend", "extension.webui_samplers", "extension.webui_script"):
        assert name not in sys.modules
        with pytest.raises(ModuleNotFoundError, match="modules|k_diffusion"):
            importlib.import_module(name)


def test_webui_scripts_compile():
    for path in [*(REPO / "scripts").glob("*.py"), REPO / "install.py", *(REPO / "extension").glob("webui_*.py")]:
        compile(path.read_text(), str(path), "exec")


# --------------------------------------------------------------------------- settings


def test_args_list_dict_and_defaults():
    assert hs.from_args([]) == hs.Settings()
    assert hs.from_args(["hgdpo_v1", 0.3]) == hs.Settings(lora="hgdpo_v1", weight=0.3)
    full = hs.from_args(["people/x", "0.7", 0.5, 4.0, " models/ps ", "true"])
    assert full == hs.Settings("people/x", 0.7, 0.5, 4, "models/ps", True)
    assert hs.from_args([{"lora": "x", "best_of": 2}]) == hs.Settings(lora="x", best_of=2)
    assert hs.from_args([hs.NO_LORA, None, None]).has_lora is False
    assert hs.from_args([None, None, 0.0]).lan_strength == 0.0
    assert hs.from_args([{"__type__": "update", "value": "x"}, 0.4]) == hs.Settings(lora="x", weight=0.4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x", 3.0], r"weight must lie in \[0.0, 2.0\]"),
        (["x", "heavy"], "weight must be a number"),
        (["x", 0.5, 1.5], r"LAN strength must lie in \[0, 1\]"),
        (["x", 0.5, 1.0, 0], r"best-of N must lie in \[1, 32\]"),
        (["x", 0.5, 1.0, 2.5], "whole number"),
        (["x", float("nan")], "finite"),
        ([{"wieght": 0.5}], r"Unknown HG-DPO argument\(s\) \['wieght'\]"),
    ],
)
def test_bad_arguments_name_the_value_and_the_range(args, message):
    with pytest.raises(hs.SettingsError, match=message):
        hs.from_args(args)


def test_xyz_overrides_win_and_are_checked():
    base = hs.from_args(["x", 0.5])
    assert hs.with_overrides(base, {"weight": 0.9}).weight == 0.9
    assert hs.with_overrides(base, None) is base
    with pytest.raises(hs.SettingsError):
        hs.with_overrides(base, {"weight": 9})
    with pytest.raises(hs.SettingsError, match="Unknown"):
        hs.with_overrides(base, {"colour": 1})


def test_raw_best_of_reads_malformed_arguments():
    assert hs.raw_best_of(["x", "bad", 1, 4]) == 4
    assert hs.raw_best_of([{"best_of": "3"}]) == 3
    assert hs.raw_best_of(["x"]) == 1
    assert hs.raw_best_of(["x", 1, 1, "many"]) == 1


def test_sampler_names():
    name = hs.lan_sampler_name("DPM++ 2M")
    assert name == "DPM++ 2M (HG-DPO LAN)"
    assert hs.is_lan_sampler(name) and not hs.is_lan_sampler("DPM++ 2M") and not hs.is_lan_sampler(None)
    assert hs.base_sampler_name(name) == "DPM++ 2M"
    assert set(hs.LAN_BASE_SAMPLERS) >= {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE"}


def test_infotext_round_trip_through_the_shared_format():
    settings = hs.from_args(["people/hgdpo_v1", 0.30000000000000004, 0.8, 4])
    fields = hs.infotext_fields(settings, "people/hgdpo_v1", "b15b8965cdb0", lan=True)
    assert fields == {LORA_KEY: "people/hgdpo_v1", LORA_HASH_KEY: "b15b8965cdb0", WEIGHT_KEY: "0.3", LAN_KEY: "0.8",
                      BEST_OF_KEY: 4}
    text = format_parameters("a woman, smiling", "blurry", {"Steps": 20, "Sampler": "DPM++ 2M (HG-DPO LAN)", **fields,
                                                             SCORE_KEY: hs.format_score(21.23456)})
    _, _, params = parse_parameters(text)
    assert params[SCORE_KEY] == "21.2346"
    assert hs.from_infotext(params) == {"lora": "people/hgdpo_v1", "lora_hash": "b15b8965cdb0", "weight": 0.3,
                                        "lan_strength": 0.8, "best_of": 4}
    assert hs.infotext_fields(settings, None, None, lan=False) == {BEST_OF_KEY: 4}
    assert hs.from_infotext({WEIGHT_KEY: "lots", "Steps": "20"}) == {}


def test_model_family_problem():
    sd1, sdxl = SimpleNamespace(is_sd1=True), SimpleNamespace(is_sd1=False, is_sdxl=True)
    assert hs.model_family_problem(sd1) is None and hs.model_family(sd1) is SD15
    assert hs.model_family_problem(sdxl, "ponyXL.safetensors", 2048) is None and hs.model_family(sdxl) is SDXL
    assert hs.model_family_problem(sdxl) is None  # (no UNet width known: the flag decides)
    refiner = hs.model_family_problem(sdxl, "sd_xl_refiner_1.0.safetensors", 1280)
    assert "sd_xl_refiner_1.0.safetensors is an SDXL refiner" in refiner and "(HG-DPO LAN)" in refiner
    ssd = SimpleNamespace(is_sd1=False, is_sdxl=True, is_ssd=True)  # A1111 flags SSD-1B both ways
    assert "SSD-1B" in hs.model_family_problem(ssd, context_width=2048)
    assert "SD2.x" in hs.model_family_problem(SimpleNamespace(is_sd1=False, is_sd2=True))
    assert "SD3" in hs.model_family_problem(SimpleNamespace(is_sd1=False, is_sd3=True))
    flux = hs.model_family_problem(SimpleNamespace(is_sd1=False))  # Forge's Flux engine sets no flag
    assert "not an SD1.x or SDXL model" in flux and hs.model_family(SimpleNamespace()) is None
    assert "No checkpoint" in hs.model_family_problem(None)


# --------------------------------------------------------------------------- lockstep


class ToyDenoiser(nn.Module):
    """A per-channel nonlinear 'model' whose DPO variant differs; ``calls`` counts (rows, dpo) per call."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(1, 4, 1, 1, generator=generator)
        self.b = torch.randn(1, 4, 1, 1, generator=generator)
        self.calls = []

    def __call__(self, x, sigma, dpo):
        self.calls.append((x.shape[0], dpo))
        shift = 0.7 * self.b if dpo else 0.0
        return torch.tanh(x * self.a + shift) * (1.0 + 0.1 * sigma.reshape(-1, 1, 1, 1))


def euler(model, x, sigmas, noise=None):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if noise is not None:
            x = x + noise.randn_like(x) * 0.1
    return x


def dpmpp_2m(model, x, sigmas):
    t_fn, sigma_fn, old = (lambda s: s.log().neg()), (lambda t: t.neg().exp()), None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - old / (2 * r))
        old = denoised
    return x


def reference_euler(toy, x, sigmas, strength, draw=None):
    """The paper's procedure written out for Euler: two chains, LAN on the DPO latent after every step."""
    x_sft, x_dpo = x.clone(), x.clone()
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i] * x.new_ones(x.shape[0])
        d_sft, d_dpo = toy(x_sft, sigma, False), toy(x_dpo, sigma, True)
        x_sft = x_sft + (x_sft - d_sft) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        x_dpo = x_dpo + (x_dpo - d_dpo) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if draw is not None:
            noise = draw()
            x_sft, x_dpo = x_sft + noise * 0.1, x_dpo + noise * 0.1
        x_dpo = latent_adaptive_normalization(x_dpo, x_sft, strength)
    return x_dpo


def reference_dpmpp_2m(toy, x, sigmas, strength):
    """The same for DPM++ 2M: each chain keeps its own multistep history."""
    t_fn, sigma_fn = (lambda s: s.log().neg()), (lambda t: t.neg().exp())
    chains = {False: [x.clone(), None], True: [x.clone(), None]}
    for i in range(len(sigmas) - 1):
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        for dpo, chain in chains.items():
            latent, old = chain
            denoised = toy(latent, sigmas[i] * x.new_ones(x.shape[0]), dpo)
            if old is None or sigmas[i + 1] == 0:
                latent = (sigma_fn(t_next) / sigma_fn(t)) * latent - (-h).expm1() * denoised
            else:
                r = (t - t_fn(sigmas[i - 1])) / h
                latent = (sigma_fn(t_next) / sigma_fn(t)) * latent - (-h).expm1() * (
                    (1 + 1 / (2 * r)) * denoised - old / (2 * r)
                )
            chain[:] = [latent, denoised]
        chains[True][0] = latent_adaptive_normalization(chains[True][0], chains[False][0], strength)
    return chains[True][0]


@pytest.mark.parametrize(("sampler", "reference"), [(euler, reference_euler), (dpmpp_2m, reference_dpmpp_2m)])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lockstep_equals_two_chains_with_lan_after_every_step(sampler, reference, strength):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=generator) * 3.0
    sigmas = torch.tensor([3.0, 1.5, 0.7, 0.2, 0.0])
    toy = ToyDenoiser()
    expected = reference(toy, x, sigmas, strength)

    toy.calls.clear()
    def denoiser(pair, sigma):
        return webui_lockstep.evaluate(pair, sigma, 2, strength, toy)
    samples = sampler(denoiser, webui_lockstep.paired(x), sigmas)
    result = webui_lockstep.dpo_result(samples, 2, strength)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
    # two evaluations per step, each on one chain, SFT first
    assert toy.calls == [(2, False), (2, True)] * (len(sigmas) - 1)


def test_lockstep_without_lan_is_the_dpo_model_alone():
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([2.0, 1.0, 0.3, 0.0])
    toy = ToyDenoiser()
    alone = euler(lambda x, sigma: toy(x, sigma, True), x.clone(), sigmas)
    pair = euler(lambda p, s: webui_lockstep.evaluate(p, s, 1, 0.0, toy), webui_lockstep.paired(x), sigmas)
    torch.testing.assert_close(webui_lockstep.dpo_result(pair, 1, 0.0), alone, rtol=0, atol=0)


def test_ancestral_noise_is_shared_by_both_chains():
    """PairedRandn draws one chain's noise from the WebUI's seeded generator and gives it to both."""
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    sigmas = torch.tensor([2.0, 1.0, 0.3, 0.0])
    toy = ToyDenoiser()

    def draws():
        generator = torch.Generator().manual_seed(9)
        return lambda: torch.randn(2, 4, 5, 5, generator=generator)

    expected = reference_euler(toy, x, sigmas, 1.0, draws())
    paired_randn = webui_lockstep.PairedRandn(draws(), torch)
    samples = euler(lambda p, s: webui_lockstep.evaluate(p, s, 2, 1.0, toy), webui_lockstep.paired(x), sigmas,
                    paired_randn)
    torch.testing.assert_close(webui_lockstep.dpo_result(samples, 2, 1.0), expected, rtol=0, atol=1e-6)
    assert paired_randn.float32 is torch.float32  # everything else comes from the fallback


def test_paired_noise_sampler_and_interrupted_results():
    sampler = webui_lockstep.PairedNoiseSampler(lambda s, t: torch.full((2, 1), float(s)))
    assert sampler(3, 1).tolist() == [[3.0]] * 4
    preview = torch.randn(2, 4, 3, 3)
    assert webui_lockstep.dpo_result(preview, 2, 1.0) is preview  # interrupted: the WebUI's single-chain latent


def test_random_numbers_drawn_inside_the_model_are_the_same_for_both_halves():
    x = torch.zeros(4, 1, 2, 2)
    out = webui_lockstep.evaluate(x, torch.ones(4), 2, 1.0, lambda h, s, dpo: h + torch.randn_like(h))
    torch.testing.assert_close(out[:2], out[2:], rtol=0, atol=0)


# --------------------------------------------------------------------------- LoRA files


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Lora")
    (folder / "people").mkdir()
    unet = nn.ModuleDict({"down_blocks": nn.ModuleList([nn.ModuleDict({"to_q": nn.Linear(8, 8)})])})
    sd15_factory.save_random_lora(unet, folder / "people" / "hgdpo_v1.safetensors", rank=2)
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)},
              str(folder / "xl_style.safetensors"))
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)},
              str(folder / "te_only.safetensors"))
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


def test_list_resolve_and_hash(lora_folder):
    names = [entry.name for entry in lora_files.list_loras(lora_folder)]
    assert names == ["people/hgdpo_v1", "te_only", "xl_style"]
    assert lora_files.list_loras(lora_folder / "missing") == []
    entry = lora_files.resolve("people/hgdpo_v1", lora_folder)
    assert lora_files.resolve("hgdpo_v1", lora_folder) == entry  # by file name alone
    assert lora_files.resolve("hgdpo_v1.safetensors", lora_folder) == entry
    digest = lora_files.short_hash(entry.path)
    assert len(digest) == 12 and digest == lora_files.short_hash(entry.path)
    assert lora_files.resolve("renamed_since", lora_folder, lora_hash=digest) == entry  # found by hash
    with pytest.raises(FileNotFoundError, match=r"'nope' not found in .*Available: people/hgdpo_v1, te_only, xl_style"):
        lora_files.resolve("nope", lora_folder)
    with pytest.raises(FileNotFoundError, match="No HG-DPO LoRA chosen"):
        lora_files.resolve("", lora_folder)


@pytest.mark.parametrize("name", ["{outside}/hgdpo_v1.safetensors", "{outside}/secret.safetensors",
                                  "{inside}/people/hgdpo_v1.safetensors", "../outside/hgdpo_v1",
                                  "people/../../outside/x", "~/x", "C:\\loras\\x", "people\\..\\..\\x"])
def test_resolve_takes_only_names_the_lora_folder_lists(tmp_path, lora_folder, name):
    """An API caller cannot make the WebUI open a file by path (the folder's own files included): refused before
    anything is read, and the message names the Lora folder, nothing of the file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hgdpo_v1.safetensors").write_bytes((lora_folder / "people" / "hgdpo_v1.safetensors").read_bytes())
    save_file({"private_tensor_name": torch.zeros(1)}, str(outside / "secret.safetensors"))
    text = name.format(outside=outside, inside=lora_folder)
    with pytest.raises(FileNotFoundError, match="is a path; give the name of a file in") as error:
        lora_files.resolve(text, lora_folder)
    assert str(lora_folder) in str(error.value) and "private_tensor_name" not in str(error.value)


def test_status_summaries_are_read_once_per_file_version(tmp_path, lora_folder):
    folder = tmp_path / "Lora"
    shutil.copytree(lora_folder, folder)
    entries = lora_files.list_loras(folder)
    first = lora_files.summaries(entries)
    assert [(item.problem is None, bool(item.hash)) for item in first] == [(True, True), (False, True), (False, True)]
    assert "no UNet weights" in first[2].problem and "no UNet weights" in first[1].problem  # SDXL files are read too
    again = lora_files.summaries(entries)
    assert all(a is b for a, b in zip(first, again))  # nothing read again
    path = folder / "people" / "hgdpo_v1.safetensors"
    unet = nn.ModuleDict({"down_blocks": nn.ModuleList([nn.ModuleDict({"to_q": nn.Linear(8, 8)})])})
    sd15_factory.save_random_lora(unet, path, rank=4, seed=5)  # a new version of the file
    changed = lora_files.summaries(entries)
    assert changed[0] is not first[0] and changed[0].hash != first[0].hash and changed[1:] == again[1:]
    path.unlink()
    assert "not found" in lora_files.summaries(entries)[0].problem


def test_load_caches_and_refuses_other_architectures(lora_folder):
    path = lora_folder / "people" / "hgdpo_v1.safetensors"
    lora = lora_files.load(path)
    assert lora is lora_files.load(path) and lora.unet
    assert lora_files.hgdpo_metadata(lora) == {"loss": "hgdpo"}
    with pytest.raises(LoRAArchitectureError, match="no UNet weights"):  # an SDXL file is read, then judged
        lora_files.load(lora_folder / "xl_style.safetensors")
    with pytest.raises(LoRAArchitectureError, match="no UNet weights"):
        lora_files.load(lora_folder / "te_only.safetensors")
    with pytest.raises(FileNotFoundError):
        lora_files.load(lora_folder / "gone.safetensors")


def test_a_lora_of_the_other_family_is_refused_with_one_message(lora_folder):
    sd15_lora, xl_lora = lora_folder / "people" / "hgdpo_v1.safetensors", lora_folder / "xl_style.safetensors"
    assert lora_files.load(sd15_lora, SD15).family is SD15
    with pytest.raises(LoRAArchitectureError, match="is an SD1.5 LoRA, but the model is an SDXL model"):
        lora_files.load(sd15_lora, SDXL)
    with pytest.raises(LoRAArchitectureError, match="is an SDXL LoRA, but the model is an SD1.5 model"):
        lora_files.load(xl_lora, SD15)
    entries = lora_files.list_loras(lora_folder)
    for_sd15, for_sdxl, for_any = (lora_files.summaries(entries, family) for family in (SD15, SDXL, None))
    assert for_sd15[0].problem is None and for_sd15[0].family == "SD1.5"
    assert "but the model is an SDXL model" in for_sdxl[0].problem and for_sdxl[0].family is None
    assert "is an SDXL LoRA" in for_sd15[2].problem and "no UNet weights" in for_sdxl[2].problem
    assert for_any[0].problem is None


# --------------------------------------------------------------------------- best-of-N


def test_pickscore_folder_layouts_and_the_missing_weights_message(tmp_path, tiny_clip_dirs):
    with pytest.raises(ScorerWeightsError) as error:
        best_of.pickscore_folders(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "PickScore_v1") in message and str(tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K") in message
    assert f"huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir {tmp_path / 'PickScore_v1'}" in message
    assert "hf download" in message
    (tmp_path / "PickScore_v1").symlink_to(tiny_clip_dirs["model"])
    (tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K").symlink_to(tiny_clip_dirs["processor"])
    assert best_of.pickscore_folders(tmp_path) == (
        tmp_path / "PickScore_v1",
        tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K",
    )
    assert best_of.pickscore_folders(tiny_clip_dirs["combined"]) == (tiny_clip_dirs["combined"],) * 2


def test_scorer_folder_must_lie_in_an_allowed_folder(tmp_path):
    models, setting = tmp_path / "models", tmp_path / "elsewhere" / "pickscore"
    assert best_of.check_scorer_folder(models / "pickscore", [models]) == models / "pickscore"
    assert best_of.check_scorer_folder(models, [models]) == models
    assert best_of.check_scorer_folder(setting / "v2", [models, setting]) == setting / "v2"
    for folder in (tmp_path / "elsewhere", models / ".." / "elsewhere" / "pickscore", Path("/"), tmp_path / "models2"):
        with pytest.raises(best_of.ScorerFolderError, match=r"outside the folders the WebUI allows for it \(.*models"):
            best_of.check_scorer_folder(folder, [models])


def test_cached_scorer_loads_pickscore_once(tmp_path, tiny_clip_dirs):
    calls = []

    def loader(spec, **kwargs):
        calls.append((spec, kwargs))
        return object()

    first = best_of.cached_scorer(tiny_clip_dirs["combined"], "cpu", torch.float32, loader)
    assert best_of.cached_scorer(tiny_clip_dirs["combined"], "cpu", torch.float32, loader) is first
    assert len(calls) == 1 and calls[0][0] == "pickscore" and calls[0][1]["device"] == "cpu"
    best_of.unload_scorers()


def test_select_keeps_the_best_of_each_group():
    from PIL import Image

    values = [0.1, 0.9, 0.5, 0.7, 0.7, 0.2]  # two groups of three; a tie in the second keeps generation order
    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(6)]
    scorer = FunctionScorer(lambda prompts, imgs: [values[img.getpixel((0, 0))[0]] for img in imgs])
    prompts = ["a", "a", "a", "b", "b", "b"]
    best = best_of.select(scorer, prompts, images, 3, keep_all=False)
    assert [(pick.row, pick.rank) for pick in best] == [(1, 0), (3, 0)]
    assert best[0].score == pytest.approx(0.9)
    everything = best_of.select(scorer, prompts, images, 3, keep_all=True)
    assert [pick.row for pick in everything] == [1, 2, 0, 3, 4, 5]
    with pytest.raises(ValueError, match="groups of 4"):
        best_of.select(scorer, prompts, images, 4, keep_all=False)


# --------------------------------------------------------------------------- install plan


def test_install_plan_installs_only_missing_and_never_the_webuis_pins():
    assert install_plan.plan(lambda name: True) == []
    missing = install_plan.plan(lambda name: False)
    assert [req.distribution for req in missing] == ["safetensors"]
    assert not {req.distribution.lower() for req in install_plan.REQUIREMENTS} & install_plan.PROTECTED
    assert {"torch", "gradio", "transformers"} <= install_plan.PROTECTED


def test_install_advisories():
    assert install_plan.advisories(lambda name: "4.30.2") == []
    assert "best-of-N (PickScore) needs >= 4.26" in install_plan.advisories(lambda name: "4.19.0")[0]
    assert "not installed" in install_plan.advisories(lambda name: None)[0]


def test_install_script_uses_the_webui_pip_helper(tmp_path):
    """install.py run as the WebUI runs it (a fake ``launch`` module records what it is asked)."""
    (tmp_path / "launch.py").write_text(
        "calls = []\nis_installed = lambda name: False\n"
        "def run_pip(command, desc=None):\n    print('PIP', command)\n"
    )
    result = subprocess.run([sys.executable, str(REPO / "install.py")], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, check=True)
    assert result.stdout.splitlines()[0] == 'PIP install "safetensors>=0.3.1"'
    assert "torch" not in result.stdout and "gradio" not in result.stdout


# --------------------------------------------------------------------------- LoRA hooks and LDM names


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    config = {key: value for key, value in sd15_factory.tiny_sd15_configs(layers_per_block=2)["unet"].items()
              if not key.startswith("_")}
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def _ldm_pairs(unet) -> dict[str, str]:
    """LDM module path -> diffusers module path from the tests' independent single-file converter."""
    converted = sd15_factory._convert(unet.state_dict(), diffusers_to_ldm_prefixes(unet), "unet")
    return {
        ldm[: -len(".weight")]: key[: -len(".weight")] for ldm, (key, _) in converted.items() if ldm.endswith(".weight")
    }


def _ldm_tree(unet) -> nn.Module:
    """A module tree with LDM paths holding the diffusers UNet's own Linear/Conv2d objects."""
    root = nn.Module()
    modules = dict(unet.named_modules())
    for ldm, key in _ldm_pairs(unet).items():
        if not isinstance(modules[key], (nn.Linear, nn.Conv2d)):
            continue
        parent = root
        *path, leaf = ldm.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, modules[key])
    return root


def test_ldm_names_match_the_single_file_converter():
    unet = _tiny_unet()
    pairs = _ldm_pairs(unet)
    names = {".".join(path.split(".")[:i]) for path in pairs for i in range(1, path.count(".") + 2)}
    mapped = ldm_to_diffusers_names(sorted(names))
    layers = {name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    assert {ldm: key for ldm, key in pairs.items() if key in layers} == {
        ldm: key for ldm, key in mapped.items() if key in layers
    }


def test_kohya_names_of_an_ldm_unet_are_the_diffusers_layers():
    unet = _tiny_unet()
    on_ldm = ldm_unet_kohya_names(_ldm_tree(unet))
    on_diffusers = unet_kohya_modules(unet, SD15)
    # every Linear/Conv2d layer the single-file format has is found, under the name kohya gives it
    assert set(on_ldm) == {key.replace(".", "_") for key in _ldm_pairs(unet).values()} & set(on_diffusers)
    assert all(on_ldm[name] is on_diffusers[name] for name in on_ldm)
    attention = [
        name for name in on_diffusers if "attn1_to_q" in name or "attn2_to_out_0" in name or "ff_net_2" in name
    ]
    assert attention and set(attention) <= set(on_ldm)
    resnet = [name for name in on_diffusers if "resnets_0_conv1" in name or "upsamplers_0_conv" in name]
    assert resnet and set(resnet) <= set(on_ldm)


def test_following_lora_matches_functional_lora_and_follows_dtype(tmp_path):
    unet = _tiny_unet()
    path = sd15_factory.save_random_lora(unet, tmp_path / "l.safetensors", rank=4)
    lora = read_lora(path)
    modules = unet_kohya_modules(unet, SD15)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    run = lambda m, s=sample, c=context: m(s, torch.tensor([500, 500]), c, return_dict=False)[0]
    with torch.no_grad():
        base = run(unet)
        reference = FunctionalLoRA(modules, lora.unet, 0.7)
        expected = run(unet)
        reference.remove()
        following = FollowingLoRA(modules, lora.unet, 0.0)
        torch.testing.assert_close(run(unet), base, rtol=0, atol=0)  # scale 0: the base model
        following.scale = 0.7
        torch.testing.assert_close(run(unet), expected, rtol=0, atol=0)
        unet.double()  # the WebUI moved/cast the model: the hooks re-attach in the new dtype
        doubled = run(unet, sample.double(), context.double())
        assert doubled.dtype == torch.float64 and following.placement == (torch.device("cpu"), torch.float64)
        torch.testing.assert_close(doubled.float(), expected, rtol=1e-4, atol=1e-4)
        following.remove()
        assert len(following) == 0
        torch.testing.assert_close(run(unet, sample.double(), context.double()).float(), base, rtol=1e-4, atol=1e-4)


def test_clip_text_layers_get_kohyas_names_in_every_transformers_version():
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
        )
    names = clip_text_kohya_names(encoder)
    assert "text_model_encoder_layers_0_self_attn_q_proj" in names
    assert all(name.startswith("text_model_") for name in names)


class ForgeLikeLinear(nn.Module):
    """A linear layer that is no ``nn.Linear`` (as Forge's ``ForgeOperations.Linear``), storing fp16 weights
    and computing in the input's dtype (Forge's manual cast)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().half(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().half(), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def test_following_lora_on_layers_of_another_class_and_storage_dtype(tmp_path):
    """Forge: its own Linear class, fp16 storage, fp32 compute: views carry the compute dtype."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    reference[0].weight.data = reference[0].weight.data.half().float()  # the values fp16 storage keeps
    reference[0].bias.data = reference[0].bias.data.half().float()
    forge = nn.Sequential(ForgeLikeLinear(reference[0]), nn.GELU(), reference[2])
    lora = {"0": SimpleNamespace(down=torch.randn(2, 6), up=torch.randn(8, 2), multiplier=0.5, rank=2)}
    x = torch.randn(3, 6)
    with torch.no_grad():
        hooked = FunctionalLoRA({"0": reference[0]}, lora, 0.8)
        expected = reference(x)
        hooked.remove()
        with pytest.raises(LoRAArchitectureError):  # what the core does with an unknown layer name
            FunctionalLoRA({}, lora, 0.8)
        following = FollowingLoRA({"0": forge[0]}, lora, 0.8)  # placed on fp16 storage, follows the fp32 input
        assert following.placement[1] == torch.float16
        torch.testing.assert_close(forge(x), expected, rtol=1e-5, atol=1e-5)
        assert following.placement[1] == torch.float32
        following.scale = 0.0
        torch.testing.assert_close(forge(x), reference(x), rtol=1e-5, atol=1e-5)
        following.remove()
    from hgdpo.models.ldm_names import layers

    assert set(layers(forge)) == {"0", "2"}  # the foreign Linear counts as a layer


# --------------------------------------------------------------------------- the integration harness


def test_harness_configuration_and_launch_command(tmp_path, monkeypatch):
    for name in (webui_harness.ENV_DIR, webui_harness.ENV_PYTHON, webui_harness.ENV_CKPT, webui_harness.ENV_ARGS):
        monkeypatch.delenv(name, raising=False)
    config, reason = webui_harness.config_from_environment()
    assert config is None and "HGDPO_WEBUI_DIR" in reason
    webui_dir, checkpoint = tmp_path / "webui", tmp_path / "sd15.safetensors"
    (webui_dir / "venv" / "bin").mkdir(parents=True)
    (webui_dir / "launch.py").write_text("")
    (webui_dir / "venv" / "bin" / "python").write_text("")
    monkeypatch.setenv(webui_harness.ENV_DIR, str(webui_dir))
    monkeypatch.setenv(webui_harness.ENV_CKPT, str(checkpoint))
    assert "HGDPO_WEBUI_CKPT" in webui_harness.config_from_environment()[1]
    checkpoint.write_bytes(b"")
    monkeypatch.setenv(webui_harness.ENV_ARGS, "--medvram")
    config, _ = webui_harness.config_from_environment()
    assert config.python == webui_dir / "venv" / "bin" / "python" and not config.is_forge
    data = webui_harness.prepare_data_dir(tmp_path / "data", checkpoint)
    assert (data / "extensions" / "hgdpo").resolve() == REPO
    command = webui_harness.WebUI(config, data).command()
    assert (
        command[1] == "launch.py" and "--nowebui" in command and "--use-cpu" in command and command[-1] == "--medvram"
    )
    assert command[command.index("--server-name") + 1] == "127.0.0.1"
    assert "--ckpt" not in command  # a tree whose parsers define no --ckpt
    (webui_dir / "modules_forge").mkdir()
    (webui_dir / "backend").mkdir()
    (webui_dir / "backend" / "args.py").write_text('parser.add_argument("--always-cpu", action="store_true")\n')
    (webui_dir / "modules").mkdir()
    (webui_dir / "modules" / "cmd_args.py").write_text("parser.add_argument(\n    '--ckpt', type=str)\n")
    forge = webui_harness.WebUI(config, data, ui=True, api_auth=("user", "pw")).command()
    assert "--always-cpu" in forge and "--nowebui" not in forge and "--use-cpu" not in forge
    assert forge[forge.index("--ckpt") + 1] == str(data / "models" / "Stable-diffusion" / checkpoint.name)
    assert forge[forge.index("--api-auth") + 1] == "user:pw"
    (webui_dir / "backend" / "args.py").write_text('vram.add_argument("--cpu", action="store_true")\n')  # Forge Neo
    assert webui_harness.host_flags(webui_dir) == {"--cpu", "--ckpt"}
    assert webui_harness.cpu_flags(webui_harness.host_flags(webui_dir)) == ["--cpu"]


def test_harness_client_sends_the_api_credentials():
    """Against a real local HTTP server: the basic-auth header only when the client has credentials."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = webui_harness.WebUIClient(url, ("user", "pw"))
        assert client.request("GET", "/x") == (200, {}) and client.request("GET", "/x", auth=False)[0] == 200
        webui_harness.WebUIClient(url).get("/x")
    finally:
        server.shutdown()
        thread.join()
    assert seen == ["Basic dXNlcjpwdw==", None, None]


# --------------------------------------------------------------------------- SDXL text encoders


def _tiny_bigg_pair():
    """SDXL's tiny OpenCLIP bigG as transformers builds it and the same weights in a real OpenCLIP text model
    (AUTOMATIC1111's layout: fused q/k/v ``in_proj_weight`` in ``nn.MultiheadAttention``)."""
    import open_clip

    from tests import sdxl_factory

    configs = sdxl_factory.tiny_sdxl_configs()
    encoder = sdxl_factory.build_models(configs)["text_encoder_2"].eval()
    config = configs["text_encoder_2"]
    text_cfg = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=config["vocab_size"],
                                           width=config["hidden_size"], heads=config["num_attention_heads"],
                                           layers=config["num_hidden_layers"], mlp_ratio=config["intermediate_size"] / config["hidden_size"])
    vision_cfg = open_clip.model.CLIPVisionCfg(layers=1, width=8, patch_size=8, image_size=16, head_width=8)
    model = open_clip.model.CLIP(embed_dim=config["projection_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    state = sdxl_factory.open_clip_to_ldm(encoder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(key.startswith(("visual.", "logit_")) for key in missing)
    return encoder, model


def _bigg_lora(encoder, rank=2):
    generator = torch.Generator().manual_seed(4)
    lora = {}
    for name, module in clip_text_kohya_names(encoder).items():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
            lora[name] = SimpleNamespace(down=torch.randn(rank, module.in_features, generator=generator) * 0.3,
                                         up=torch.randn(module.out_features, rank, generator=generator) * 0.3,
                                         multiplier=0.5, rank=rank)
    return lora


def test_open_clip_text_lora_equals_the_hooked_transformers_model_and_restores_every_bit():
    """The te2 part of an SDXL LoRA on A1111's OpenCLIP bigG (weights patched for the encoding) gives what the
    same LoRA hooked onto the transformers twin gives; afterwards every weight is the original tensor again."""
    encoder, model = _tiny_bigg_pair()
    lora = _bigg_lora(encoder)
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, *([0] * 72)]])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), encoder(ids).text_embeds, rtol=1e-4, atol=1e-4)
        with text_encoder_lora.applied([(encoder, text_encoder_lora.TRANSFORMERS)], [lora], 0.7, "test"):
            expected = encoder(ids).text_embeds
        with text_encoder_lora.applied([(model, text_encoder_lora.OPEN_CLIP)], [lora], 0.7, "test"):
            patched = model.encode_text(ids)
        assert (patched - model.encode_text(ids)).abs().max() > 1e-2  # the LoRA matters
        torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(encoder(ids).text_embeds, model.encode_text(ids), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_open_clip_text_lora_refuses_layers_it_does_not_have():
    encoder, model = _tiny_bigg_pair()
    lora = _bigg_lora(encoder)
    for name, message in (("text_model_encoder_layers_9_mlp_fc1", "does not exist"),
                          ("text_model_encoder_layers_0_self_attn_q_proj", "has shape")):
        bad = {name: SimpleNamespace(down=torch.zeros(2, 5), up=torch.zeros(7, 2), multiplier=1.0, rank=2)}
        before = model.transformer.resblocks[0].attn.in_proj_weight.clone()
        with pytest.raises(LoRAArchitectureError, match=message), \
                text_encoder_lora.applied([(model, text_encoder_lora.OPEN_CLIP)], [{**lora, **bad}], 1.0, "test"):
            pass
        assert torch.equal(model.transformer.resblocks[0].attn.in_proj_weight, before)
