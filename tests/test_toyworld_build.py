"""``python -m hgdpo.toyworld build``: the three phases at a tiny size, resuming after a finished phase, refusals."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from hgdpo.toyworld.__main__ import main
from hgdpo.models.loading import load_sd15
from hgdpo.toyworld.build import RECORD, BuildSettings, build_world, training_noise

TINY = BuildSettings(num_images=64, vae_steps=2, unet_steps=2, batch_size=4, offset_steps=2, offset_images=32,
                     v_steps=2, v_images=32, scorer_steps=2)
UNET = "sft/unet/diffusion_pytorch_model.safetensors"


def _unet(folder, name: str = UNET) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world") / "out", TINY)


def test_build_writes_the_three_phases_and_the_record(built):
    record = json.loads((built / "world.json").read_text())
    assert record["settings"]["offset_noise"] == TINY.offset_noise == 0.25
    assert set(record["seconds"]) == {"base", "offset", "v_prediction", "scorer"}
    assert all(seconds > 0 for seconds in record["seconds"].values())
    assert (built / "scorer.safetensors").is_file() and (built / "sft" / "model_index.json").is_file()
    # phases 2 and 3 save a model loaded from a folder: its configs must not record that local folder
    assert "_name_or_path" not in (built / "sft" / "unet" / "config.json").read_text()
    weights = {folder: _unet(built, f"{folder}/unet/diffusion_pytorch_model.safetensors")
               for folder in ("base", "offset", "sft")}
    for before, after in (("base", "offset"), ("offset", "sft")):
        assert weights[before].keys() == weights[after].keys()
        assert any(not torch.equal(weights[before][key], weights[after][key]) for key in weights[before]), after
    # every command loads the SFT model as v-prediction on a zero-terminal-SNR schedule
    scheduler = load_sd15(built / "sft").noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.alphas_cumprod[-1] == 0
    assert load_sd15(built / "offset").noise_scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("finished", [("base",), ("base", "offset"), ("offset",)])
def test_build_resumes_after_a_finished_phase_with_the_same_result(built, tmp_path, finished):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for folder in finished:
        shutil.copytree(built / folder, resumed / folder)
    build_world(resumed, TINY)
    first, second = _unet(built), _unet(resumed)
    assert all(torch.equal(first[key], second[key]) for key in first)
    seconds = json.loads((resumed / "world.json").read_text())["seconds"]
    assert all(seconds[folder] == json.loads((built / folder / RECORD).read_text())["seconds"] for folder in finished)


def test_build_refuses_a_finished_world_and_a_phase_of_other_settings(built, tmp_path, capsys):
    before = _unet(built)
    with pytest.raises(FileExistsError, match="choose a new output folder"):
        build_world(built, TINY)
    assert all(torch.equal(before[key], value) for key, value in _unet(built).items())
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(built / "base", other / "base")
    shutil.copytree(built / "offset", other / "offset")
    with pytest.raises(ValueError, match="offset_steps 2 there, 3 asked"):
        build_world(other, replace(TINY, offset_steps=3))
    with pytest.raises(ValueError, match="unet_steps 2 there, 3 asked"):
        build_world(other, replace(TINY, unet_steps=3))
    assert not (other / "sft").exists()
    (other / "base" / RECORD).unlink()
    with pytest.raises(SystemExit) as stopped:
        main(["build", str(other)])
    assert stopped.value.code == 2 and "not a phase this build wrote" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, says", [
    ("--offset-steps", "-5", "--offset-steps -5: out of range; give an integer >= 1"),
    ("--malformed-share", "1.5", "--malformed-share 1.5: out of range"),
    ("--ema-decay", "1", "--ema-decay 1.0: out of range"),
    ("--learning-rate", "nan", "--learning-rate nan: give a finite number"),
])
def test_bad_settings_stop_before_anything_is_written(tmp_path, capsys, flag, value, says):
    out = tmp_path / "world"
    with pytest.raises(SystemExit) as stopped:
        main(["build", str(out), flag, value])
    assert stopped.value.code == 2 and says in capsys.readouterr().err
    assert not out.exists()


def test_an_output_that_is_a_file_stops_before_anything_is_rendered(tmp_path, capsys):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        main(["build", str(user_file)])
    assert stopped.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert user_file.read_text() == "mine" and sorted(tmp_path.iterdir()) == [user_file]


def test_offset_noise_adds_one_constant_per_image_and_channel():
    generator = torch.Generator().manual_seed(0)
    plain = training_noise(torch.Size((256, 4, 16, 16)), 0.0, generator)
    offset = training_noise(torch.Size((256, 4, 16, 16)), 0.25, generator)
    # the channel means of 16x16 plain noise spread 1/16; the offset adds 0.25 in quadrature
    assert plain.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 16, rel=0.1)
    assert offset.mean(dim=(2, 3)).std().item() == pytest.approx((0.25**2 + 1 / 256) ** 0.5, rel=0.1)
