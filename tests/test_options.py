"""The shared option machinery (hgdpo/options.py): flags, help, TOML files and their precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from hgdpo.data.builder import BuildConfig
from hgdpo.evaluation.evaluate import EvaluationOptions
from hgdpo.inference.generate import GenerateJob
from hgdpo.options import config_parser, parse_config, save_config


def _parse(config_class, *argv):
    return parse_config(config_class, config_parser(config_class, "test"), [str(a) for a in argv])[0]


def test_builder_precedence_defaults_then_toml_then_flags(tmp_path):
    config_file = tmp_path / "build.toml"
    config_file.write_text('model = "m.safetensors"\nprompts = "p.txt"\noutput-dir = "out"\npool_size = 6\n'
                           "steps = 10\ncfg = 3.5\nkeep_pool = true\n")
    config = _parse(BuildConfig, "--config", config_file, "--pool-size", 8, "--no-keep-pool")
    assert (config.model, config.prompts, config.output_dir) == ("m.safetensors", "p.txt", "out")
    assert config.pool_size == 8 and config.keep_pool is False  # the flags win over the file
    assert config.steps == 10 and config.guidance_scale == 3.5  # the file wins over the defaults
    assert config.batch_size == BuildConfig.batch_size == 4 and config.scorer == "pickscore"  # the defaults


def test_unknown_toml_key_is_a_one_line_error(tmp_path):
    config_file = tmp_path / "build.toml"
    config_file.write_text('model = "m"\npool_sise = 6\n')
    with pytest.raises(SystemExit, match="unknown option.*pool_sise"):
        _parse(BuildConfig, "--config", config_file)


def test_missing_required_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(BuildConfig, "--model", "m", "--prompts", "p.txt")
    assert exit_info.value.code == 2 and "--output-dir is required" in capsys.readouterr().err


def test_help_shows_defaults_and_paper_values():
    text = " ".join(config_parser(BuildConfig, "test").format_help().split())
    assert "Images generated per prompt, N (paper: 20). (default: 20)" in text
    assert "'pickscore' (paper)" in text and "--config CONFIG" in text
    text = " ".join(config_parser(GenerateJob, "test").format_help().split())
    assert "LoRA weight (paper: 0.5). (default: 0.5)" in text and "--lan [STRENGTH]" in text
    assert "--model MODEL SD1.5- or SDXL-family model (the SFT model)" in text and "(required)" in text


def test_sample_job_round_trips_through_its_toml_file(tmp_path):
    job = _parse(GenerateJob, "--model", "m", "--prompt", "a", "--prompt", "b", "--lan", "--cfg", 7, "--two-forwards",
                 "--output-dir", tmp_path / "out")
    assert job.prompt == ["a", "b"] and job.config.lan_strength == 1.0 and job.config.guidance_scale == 7.0
    assert job.shared_forward is False and job.output_dir == tmp_path / "out"
    save_config(job, tmp_path / "sample.toml")
    again = _parse(GenerateJob, "--config", tmp_path / "sample.toml", "--steps", 12)
    assert again.config.steps == 12 and again.output_dir == job.output_dir
    assert again.config == type(job.config)(**{**job.config.__dict__, "steps": 12})
    assert again.prompt == job.prompt and again.two_forwards is True


def test_evaluation_options_keep_the_shared_defaults_and_flags(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person\nanother person\n")
    options = _parse(EvaluationOptions, "--baseline", "m", "--candidate-lora", "l.safetensors", "--prompts", prompts,
                     "--output-dir", tmp_path / "eval", "--candidate-lan", "--bootstrap", 50, "--metrics", "clip",
                     "--metric-model", "clip=models/clip", "--resolution", "64x128")
    config = options.to_config()
    assert config.resamples == 50 and config.seeds == [0] and config.prompts == ["a person", "another person"]
    assert config.candidate.lan_strength == 1.0 and config.candidate.lora == "l.safetensors"
    assert config.baseline.model == config.candidate.model == "m"
    assert (config.sampling.width, config.sampling.height, config.sampling.steps) == (64, 128, 50)
    assert config.metrics[0].model == "models/clip" and Path(config.output_dir) == tmp_path / "eval"
