"""Inference with diffusers: plain sampling, LAN lockstep sampling, the fast path, best-of-N, the CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hgdpo.inference.infotext import parse_parameters, read_png_parameters
from hgdpo.inference.lan import channel_statistics
from hgdpo.models.loading import load_sd15
from hgdpo.inference.sampling import ImageGenerator, SamplingConfig, best_of_n, make_scheduler
from hgdpo.feedback.scorers import FunctionScorer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a woman singing on the stage", "two men shaking hands"]
SEEDS = [3, 11]


def config(**overrides) -> SamplingConfig:
    return SamplingConfig(**{"steps": 4, "width": 64, "height": 64, **overrides})


@pytest.fixture(scope="module")
def generator(tiny_components, tiny_lora):
    return ImageGenerator(tiny_components, lora=tiny_lora, device="cpu")


@pytest.fixture(scope="module")
def base_generator(tiny_components):
    return ImageGenerator(tiny_components, device="cpu")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a", "dpmpp_2m_sde"])
def test_after_every_step_the_dpo_latent_has_the_sft_channel_statistics(generator, sampler):
    seen = []

    def check(step, timestep, dpo, sft):
        dpo_mean, dpo_var = channel_statistics(dpo)
        sft_mean, sft_var = channel_statistics(sft)
        torch.testing.assert_close(dpo_mean, sft_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dpo_var.sqrt(), sft_var.sqrt(), rtol=1e-4, atol=1e-5)
        seen.append((step, (dpo - sft).abs().max().item()))

    generator.generate(PROMPTS, SEEDS, config(lan_strength=1.0, sampler=sampler), callback=check)
    assert [step for step, _ in seen] == [0, 1, 2, 3]
    assert seen[-1][1] > 1e-4  # the trajectories do differ: LAN matched statistics, not the latents


def test_without_lan_the_callback_sees_only_the_dpo_latent(generator):
    seen = []
    generator.generate(PROMPTS[:1], SEEDS[:1], config(), callback=lambda i, t, dpo, sft: seen.append(sft))
    assert seen == [None] * 4


def test_plain_sampling_equals_the_diffusers_pipeline(tiny_components, base_generator):
    ours = base_generator.generate(PROMPTS, SEEDS, config(lora_weight=0.0))
    pipeline = tiny_components.pipeline(scheduler=make_scheduler(tiny_components.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    reference = pipeline(PROMPTS, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                         generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="latent").images
    torch.testing.assert_close(ours.latents, reference, rtol=0, atol=0)


def test_lora_sampling_matches_diffusers_own_kohya_loader(tiny_model_dir, tiny_lora, generator):
    """Our functional LoRA at weight 0.5 against diffusers' load_lora_weights of the same file."""
    components = load_sd15(tiny_model_dir)
    pipeline = components.pipeline(scheduler=make_scheduler(components.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(tiny_lora))
    pipeline.set_adapters(pipeline.get_active_adapters(), adapter_weights=[0.5])
    reference = pipeline(PROMPTS, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                         generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="latent").images
    ours = generator.generate(PROMPTS, SEEDS, config(lora_weight=0.5)).latents
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    without = generator.generate(PROMPTS, SEEDS, config(lora_weight=0.0)).latents
    assert (ours - without).abs().max() > 1e-3


@pytest.mark.parametrize("shared_forward", [False, True])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_lan_with_lora_weight_zero_equals_plain_sft_sampling(generator, base_generator, shared_forward, sampler):
    plain = base_generator.generate(PROMPTS, SEEDS, config(sampler=sampler))
    lan = generator.generate(PROMPTS, SEEDS, config(sampler=sampler, lan_strength=1.0, lora_weight=0.0),
                             shared_forward=shared_forward)
    assert torch.equal(lan.sft_latents, lan.latents)  # stochastic samplers: both halves got the same noise
    if shared_forward:  # one batched forward of twice the rows: equal up to the kernels' batch-size rounding
        torch.testing.assert_close(lan.latents, plain.latents, rtol=1e-4, atol=1e-4)  # batched vs unbatched float sums
    else:
        assert torch.equal(lan.latents, plain.latents)


def test_fast_path_equals_two_forwards_and_two_unets(generator, tiny_model_dir, tiny_components, tiny_lora):
    settings = config(lan_strength=1.0, lora_weight=0.5)
    fast = generator.generate(PROMPTS, SEEDS, settings, return_sft=True)
    two_forwards = generator.generate(PROMPTS, SEEDS, settings, shared_forward=False)
    two_unets = ImageGenerator(tiny_components, lora=tiny_lora, dpo_components=load_sd15(tiny_model_dir)).generate(
        PROMPTS, SEEDS, settings)
    assert not generator.generate(PROMPTS, SEEDS, settings).latents.equal(fast.sft_latents)
    for other in (two_forwards, two_unets):
        torch.testing.assert_close(fast.latents, other.latents, rtol=1e-4, atol=1e-4)  # batched vs unbatched float sums
        torch.testing.assert_close(fast.sft_latents, other.sft_latents, rtol=1e-4, atol=1e-4)
    assert len(fast.sft_images) == len(fast.images) == 2


def test_lan_strength_and_bad_settings(generator, base_generator):
    weak = generator.generate(PROMPTS[:1], SEEDS[:1], config(lan_strength=0.3))
    full = generator.generate(PROMPTS[:1], SEEDS[:1], config(lan_strength=1.0))
    raw = generator.generate(PROMPTS[:1], SEEDS[:1], config())
    assert not torch.equal(weak.latents, full.latents) and not torch.equal(weak.latents, raw.latents)
    with pytest.raises(ValueError, match="LoRA or a separate DPO"):
        base_generator.generate(PROMPTS, SEEDS, config(lan_strength=1.0))
    with pytest.raises(ValueError, match="Unknown sampler"):
        generator.generate(PROMPTS, SEEDS, config(sampler="nope"))
    with pytest.raises(ValueError, match="no Karras"):
        generator.generate(PROMPTS, SEEDS, config(sampler="ddim", schedule="karras"))
    with pytest.raises(ValueError, match="2 prompts for 1 seeds"):
        generator.generate(PROMPTS, SEEDS[:1], config())


def brightness(prompts, images):
    return [float(np.asarray(image.convert("L"), dtype=np.float32).mean()) for image in images]


def test_best_of_n_returns_the_argmax_with_all_candidates_sorted(generator):
    scorer = FunctionScorer(brightness, name="brightness")
    ranked = best_of_n(generator, PROMPTS[0], seed=5, count=5, scorer=scorer, config=config(), batch_size=2)
    singles = [generator.generate(PROMPTS[:1], [5 + k], config()).images[0] for k in range(5)]
    expected = brightness(None, singles)
    assert [c.index for c in ranked] == sorted(range(5), key=lambda k: -expected[k])
    assert ranked[0].score == pytest.approx(max(expected), abs=0.5)
    assert np.array_equal(np.asarray(ranked[0].image), np.asarray(singles[int(np.argmax(expected))]))


def run_sample(*args, check=True):
    result = subprocess.run([sys.executable, str(ROOT / "trainer" / "sample.py"), *map(str, args), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_lora_lan_best_of_writes_pngs_with_parameters(tmp_path, tiny_single_file, tiny_model_dir, tiny_lora,
                                                         tiny_clip_dirs):
    out = tmp_path / "out"
    run_sample("--model", tiny_single_file, "--model-config-dir", tiny_model_dir, "--lora", tiny_lora, "--lan",
               "--best-of", 3, "--batch-size", 2, "--steps", 2, "--width", 64, "--height", 64, "--seed", 10,
               "--scorer-model", tiny_clip_dirs["model"], "--scorer-processor", tiny_clip_dirs["processor"],
               "--save-candidates", "--output-dir", out, "a woman singing on the stage")
    best = sorted(out.glob("*.png"))
    candidates = sorted((out / "candidates").glob("*.png"))
    assert len(best) == 1 and len(candidates) == 3
    prompt, negative, fields = parse_parameters(read_png_parameters(best[0]))
    assert prompt == "a woman singing on the stage" and negative == ""
    assert fields["Sampler"] == "DPM++ 2M" and fields["Steps"] == "2" and fields["Size"] == "64x64"
    assert fields["HG-DPO LoRA"] == "hgdpo" and fields["HG-DPO weight"] == "0.5" and fields["HG-DPO LAN"] == "1.0"
    assert fields["HG-DPO best-of"] == "3" and len(fields["Model hash"]) == 10
    assert int(fields["Seed"]) in range(10, 13) and best[0].name.endswith(f"-{fields['Seed']}.png")
    top = parse_parameters(read_png_parameters(candidates[0]))[2]  # rank01 is the winner
    assert top["Seed"] == fields["Seed"] and top["HG-DPO score"] == fields["HG-DPO score"]
    scores = [float(parse_parameters(read_png_parameters(p))[2]["HG-DPO score"]) for p in candidates]
    assert scores == sorted(scores, reverse=True)


def test_cli_writes_sft_image_and_reports_bad_input(tmp_path, tiny_model_dir, tiny_lora):
    out = tmp_path / "plain"
    run_sample("--model", tiny_model_dir, "--lora", tiny_lora, "--lan", "0.5", "--save-sft", "--steps", 2,
               "--width", 64, "--height", 64, "--prompt", "a", "--prompt", "b", "--output-dir", out)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000-0-sft.png", "00000-0.png", "00001-1-sft.png", "00001-1.png"]
    sft_fields = parse_parameters(read_png_parameters(out / "00000-0-sft.png"))[2]
    assert "HG-DPO LoRA" not in sft_fields and "HG-DPO LAN" not in sft_fields
    wrong = tmp_path / "xl.safetensors"
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(tiny_lora)), str(wrong), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    result = run_sample("--model", tiny_model_dir, "--lora", wrong, "x", "--output-dir", out, check=False)
    assert result.returncode == 1 and "is an SDXL LoRA, but the model is an SD1.5 model" in result.stderr
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr  # refused before loading
    result = run_sample("--model", tiny_model_dir, "--output-dir", out, check=False)
    assert result.returncode == 1 and "No prompt" in result.stderr
    result = run_sample("--model", tiny_model_dir, "--best-of", 2, "--scorer-model", tmp_path / "nowhere", "x",
                        "--output-dir", out, check=False)
    assert result.returncode == 1 and "download" in result.stderr
