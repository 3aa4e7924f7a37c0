"""End-to-end training through the real command line, on the tiny model and real files."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hgdpo.models.lora import DEFAULT_TARGETS
from hgdpo.models.loading import clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "trainer" / "train.py")]
FAST = ["--resolution", "64", "--effective-batch-size", "2", "--validation-steps", "0",
        "--validation-inference-steps", "2", "--save-precision", "fp32"]


def run_train(*args, check: bool = True, **popen) -> subprocess.CompletedProcess:
    result = subprocess.run(TRAIN + [str(a) for a in args], capture_output=True, text=True, env=os.environ.copy(),
                            timeout=600, **popen)
    if check and result.returncode:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def _model_args(tiny_single_file, tiny_model_dir):
    return ["--model", tiny_single_file, "--model-config-dir", tiny_model_dir]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_single_file, tiny_model_dir, triplet_dataset):
    """A short run from the single-file checkpoint, with a high learning rate so the LoRA moves."""
    out = tmp_path_factory.mktemp("run")
    run_train(*_model_args(tiny_single_file, tiny_model_dir), "--dataset", triplet_dataset, "--output-dir", out,
              "--max-steps", 4, "--learning-rate", 1e-3, "--checkpointing-steps", 2, "--validation-steps", 2,
              *FAST[:4], "--validation-inference-steps", 2, "--save-precision", "fp16")
    return out


def test_lora_file_is_kohya_format_with_metadata(trained, tiny_models):
    path = trained / "hgdpo_lora.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in keys}
    attention_linears = [name for name, _ in tiny_models[1]["unet"].named_modules()
                         if ".attn" in name and name.endswith(DEFAULT_TARGETS)]
    assert len(modules) == len(attention_linears) == 4 * 2 * 4  # 4 transformer blocks x attn1/attn2 x q,k,v,out
    for module in modules:
        assert module.startswith("lora_unet_") and "." not in module
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "8.0")
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_optimizer"] == "AdamW"  # what ran: 8-bit AdamW falls back on a CPU
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.resolution"] == "64x64"
    assert float(metadata["hgdpo.beta"]) == 2500 and float(metadata["hgdpo.lambda_stat"]) == 10000
    assert metadata["hgdpo.pool_size"] == "4" and metadata["hgdpo.dataset_size"] == "8"
    assert metadata["hgdpo.scorer"] == "synthetic warm-vs-cold" and metadata["hgdpo.steps"] == "4"
    assert len(metadata["hgdpo.base_model_hash"]) == 64
    tensors = load_file(str(path))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))  # it trained
    # the config that produced it, beside it, readable by --config
    config_text = (trained / "hgdpo_lora.toml").read_text()
    assert "beta = 2500.0" in config_text and "max_steps = 4" in config_text


def test_run_leaves_checkpoints_logs_and_validation_images(trained):
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["checkpoint-00000002", "checkpoint-00000004"]
    assert sorted(p.name for p in (trained / "validation").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    from PIL import Image

    grid = Image.open(trained / "validation" / "step-00000004.png")
    assert grid.size == (64 * 2 * 2, 64 * 2)  # 2 prompts x 2 seeds wide, LoRA weights 0 and 0.5 high
    events = list((trained / "logs").rglob("events.out.tfevents*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"loss/total", "loss/dpo", "loss/stat", "loss/stat_share", "dpo/implicit_accuracy",
            "dpo/reward_margin"} <= tags
    assert any(tag.startswith("dpo_loss_by_t/") for tag in tags)
    assert "Wrote" in (trained / "train.log").read_text()


def test_lora_loads_in_diffusers_and_changes_its_output(trained, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, tokenizer=clip_tokenizer(), safety_checker=None,
                                                   feature_extractor=None)
    options = dict(prompt="a portrait of a person", num_inference_steps=2, height=64, width=64, output_type="latent")
    before = pipe(**options, generator=torch.Generator().manual_seed(0)).images
    base_weight = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    pipe.load_lora_weights(str(trained / "hgdpo_lora.safetensors"), adapter_name="hgdpo")
    pipe.set_adapters(["hgdpo"], adapter_weights=[0.5])
    after = pipe(**options, generator=torch.Generator().manual_seed(0)).images
    assert (after - before).abs().max() > 1e-3  # the denoised latents move
    # the applied update is weight * (alpha / rank) * up @ down, exactly as kohya, ComfyUI and the WebUI apply it
    pipe.set_adapters(["hgdpo"], adapter_weights=[1.0])
    pipe.fuse_lora(lora_scale=0.5, adapter_names=["hgdpo"])
    fused = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight
    lora = load_file(str(trained / "hgdpo_lora.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
    expected = base_weight + 0.5 * (lora[f"{name}.alpha"].item() / down.shape[0]) * up @ down
    torch.testing.assert_close(fused.detach(), expected, rtol=1e-4, atol=1e-5)
    assert (expected - base_weight).abs().max() > 0


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {key: value for key, value in load_file(str(path)).items()}


def test_killed_run_resumes_to_the_same_lora(tmp_path, tiny_single_file, tiny_model_dir, triplet_dataset):
    common = [*_model_args(tiny_single_file, tiny_model_dir), "--dataset", triplet_dataset, *FAST,
              "--max-steps", 24, "--checkpointing-steps", 4, "--learning-rate", 1e-3]
    run_train(*common, "--output-dir", tmp_path / "straight")

    out = tmp_path / "killed"
    process = subprocess.Popen(TRAIN + [str(a) for a in common + ["--output-dir", out]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("checkpoint-0000000[48]")) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "hgdpo_lora.safetensors").exists()
    resumed = run_train(*common, "--output-dir", out, "--resume", "latest")
    assert "Resumed from" in resumed.stderr

    straight = _lora_tensors(tmp_path / "straight" / "hgdpo_lora.safetensors")
    again = _lora_tensors(out / "hgdpo_lora.safetensors")
    assert straight.keys() == again.keys()
    difference = max((straight[k] - again[k]).abs().max().item() for k in straight)
    assert difference <= 1e-5
    assert max(t.abs().max().item() for k, t in straight.items() if "lora_up" in k) > 1e-3


def test_resume_latest_without_checkpoint_starts_fresh_and_changed_options_are_refused(
    tmp_path, tiny_single_file, tiny_model_dir, triplet_dataset
):
    common = [*_model_args(tiny_single_file, tiny_model_dir), "--dataset", triplet_dataset, *FAST,
              "--output-dir", tmp_path, "--checkpointing-steps", 1]
    first = run_train(*common, "--max-steps", 2, "--resume", "latest")
    assert "starting a new run" in first.stderr
    refused = run_train(*common, "--max-steps", 3, "--resume", "latest", "--lora-rank", 4, check=False)
    assert refused.returncode == 1 and "lora_rank" in refused.stderr


def test_sft_and_bf16_dpo_modes_and_pickapic_input(tmp_path, tiny_single_file, tiny_model_dir, triplet_dataset):
    from hgdpo.data.pickapic import export_pickapic

    parquet = tmp_path / "pickapic.parquet"
    export_pickapic(triplet_dataset, parquet)
    for loss, precision in (("sft", "no"), ("dpo", "bf16")):
        out = tmp_path / loss
        run_train(*_model_args(tiny_single_file, tiny_model_dir), "--dataset", parquet, "--output-dir", out,
                  *FAST, "--max-steps", 1, "--loss", loss, "--mixed-precision", precision)
        with safe_open(str(out / "hgdpo_lora.safetensors"), framework="pt") as handle:
            metadata = handle.metadata()
        assert metadata["hgdpo.loss"] == loss and metadata["hgdpo.dataset_kind"] == "pickapic"


def test_corrupt_images_are_skipped_and_counted_or_stop_the_run(tmp_path, tiny_single_file, tiny_model_dir):
    from tests.conftest import write_triplets

    data = write_triplets(tmp_path / "data", num_pairs=4)
    (data / "images").rglob("*_win.png").__next__().write_bytes(b"not a png")
    common = [*_model_args(tiny_single_file, tiny_model_dir), "--dataset", data, *FAST, "--max-steps", 1]
    skipped = run_train(*common, "--output-dir", tmp_path / "skip")
    assert "1 pair(s) skipped" in skipped.stderr
    with safe_open(str(tmp_path / "skip" / "hgdpo_lora.safetensors"), framework="pt") as handle:
        assert handle.metadata()["hgdpo.dataset_size"] == "3"
    stopped = run_train(*common, "--output-dir", tmp_path / "stop", "--bad-images", "stop", check=False)
    assert stopped.returncode == 1 and "cannot load image" in stopped.stderr and "_win.png" in stopped.stderr


def test_nonfinite_loss_stops_after_a_few_steps_with_advice(tmp_path, tiny_single_file, tiny_model_dir,
                                                            triplet_dataset):
    result = run_train(*_model_args(tiny_single_file, tiny_model_dir), "--dataset", triplet_dataset,
                       "--output-dir", tmp_path, *FAST, "--max-steps", 20, "--learning-rate", 1e30,
                       "--max-nonfinite-steps", 3, "--optimizer", "adamw", check=False)
    assert result.returncode == 1
    assert "3 optimizer steps in a row had NaN/inf" in result.stderr and "--learning-rate" in result.stderr
    assert result.stderr.count("update skipped") == 3


def test_bad_options_and_wrong_family_fail_clearly(tmp_path, triplet_dataset):
    from tests.sd15_factory import save_fake_sdxl_checkpoint

    odd = run_train("--model", "x", "--dataset", triplet_dataset, "--output-dir", tmp_path, "--resolution", "500",
                    check=False)
    assert odd.returncode == 2 and "multiples of 8" in odd.stderr
    missing = run_train("--dataset", triplet_dataset, "--output-dir", tmp_path, check=False)
    assert missing.returncode == 2 and "--model is required" in missing.stderr
    sdxl = save_fake_sdxl_checkpoint(tmp_path / "sdxl.safetensors")
    wrong = run_train("--model", sdxl, "--dataset", triplet_dataset, "--output-dir", tmp_path / "o", check=False)
    assert wrong.returncode == 1 and "SDXL" in wrong.stderr and "Traceback" not in wrong.stderr


def test_config_file_and_flags(tmp_path):
    from hgdpo.training.config import TrainConfig, build_parser, load_config

    help_text = " ".join(build_parser().format_help().split())
    for option in ("--beta", "--lambda-stat", "--lora-rank", "--resume", "--resolution", "--mixed-precision"):
        assert option in help_text
    assert "(default: 2500.0)" in help_text and "(default: 10000.0)" in help_text
    config_file = tmp_path / "run.toml"
    config_file.write_text(TrainConfig(model="m", dataset=str(tmp_path), output_dir="o", beta=1000.0,
                                       validation_prompts=['a "quoted" prompt']).to_toml())
    config = load_config(["--config", str(config_file), "--lora-rank", "4"])
    assert (config.beta, config.lora_rank, config.model) == (1000.0, 4, "m")
    assert config.validation_prompts == ['a "quoted" prompt']
    assert config.size is None and TrainConfig(resolution="704x1024").size == (704, 1024)  # auto: the family's
    (tmp_path / "bad.toml").write_text("betta = 1\n")
    with pytest.raises(SystemExit, match="betta"):
        load_config(["--config", str(tmp_path / "bad.toml")])



def test_two_processes_share_the_encoding_and_train_data_parallel(tmp_path, tiny_single_file, tiny_model_dir):
    """torchrun with 2 CPU processes (gloo), as `accelerate launch` runs several GPUs."""
    from hgdpo.training.latent_cache import CHUNK_SIZE
    from tests.conftest import write_triplets

    data = write_triplets(tmp_path / "data", num_pairs=CHUNK_SIZE + 6)  # two cache chunks, one per rank
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", TRAIN[1],
               *_model_args(tiny_single_file, tiny_model_dir), "--dataset", data, "--output-dir", tmp_path / "out",
               *FAST, "--max-steps", 2, "--checkpointing-steps", 1, "--cache-dir", tmp_path / "cache"]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 per device x 1 accumulation x 2 devices = 2 pairs/step" in result.stderr
    assert result.stdout.count("LoRA written") == 1
    chunks = sorted(p.name for p in (tmp_path / "cache").rglob("chunk-*.safetensors"))
    assert chunks == ["chunk-000000.safetensors", "chunk-000001.safetensors"]
    from hgdpo.training.checkpoint import CheckpointManager

    _, _, objects = CheckpointManager.load(CheckpointManager(tmp_path / "out").resolve("latest"))
    assert {"generator/noise_rank0", "generator/noise_rank1"} <= objects["rng"].keys()
    assert (tmp_path / "out" / "hgdpo_lora.safetensors").exists()


def test_two_runs_in_one_process_with_different_mixed_precision(tmp_path, tiny_single_file, tiny_model_dir,
                                                                triplet_dataset):
    """accelerate keeps its settings process-wide: a second in-process run (the demo, a notebook, a test session)
    with another mixed precision must not be refused."""
    from hgdpo.training.config import TrainConfig
    from hgdpo.training.loop import train

    for precision in ("no", "bf16"):
        config = TrainConfig(model=str(tiny_single_file), model_config_dir=str(tiny_model_dir),
                             dataset=str(triplet_dataset), output_dir=str(tmp_path / precision), resolution="64",
                             max_steps=1, effective_batch_size=2, mixed_precision=precision, validation_steps=0,
                             cache_dir=str(tmp_path / "cache"))
        with safe_open(str(train(config)), framework="pt") as handle:
            assert handle.metadata()["ss_mixed_precision"] == precision
