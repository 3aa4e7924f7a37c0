"""The HG-DPO training loop: a LoRA on an SD1.5 UNet trained with Eq. 9 (or Eq. 3, or SFT).

Runs on one device or, through ``accelerate launch``, data-parallel on several. The frozen
reference of DPO is the same UNet with its LoRA disabled. Latents and text embeddings come from the
on-disk cache (:mod:`hgdpo.training.latent_cache`). Every ``checkpointing_steps`` an atomic checkpoint is written;
``resume="latest"`` continues a killed run exactly where its last checkpoint left it.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from hgdpo.training.latent_cache import build_cache, cache_key, encode_prompts, finalize_cache
from hgdpo.training.checkpoint import CheckpointManager, TrainingState, restore_rng_states, rng_states
from hgdpo.training.config import DTYPES, TrainConfig, save_config
from hgdpo.errors import TrainingError
from hgdpo.fileio import cache_root
from hgdpo.training.losses import hgdpo_loss, sft_loss
from hgdpo.training.validation import validation_images
from hgdpo.models.lora import (
    add_lora,
    adapter_disabled,
    kohya_metadata,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    save_kohya_lora,
)
from hgdpo.models.loading import file_sha256, load_sd15, model_fingerprint

logger = logging.getLogger("hgdpo.train")

TIMESTEP_BUCKETS = 4
# options that must not change between a checkpoint and the run resuming from it
_RESUME_INVARIANTS = ("loss", "lora_rank", "lora_alpha", "lora_targets", "resolution", "batch_size",
                      "effective_batch_size", "seed")


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless, reproducible micro-batches for one rank, starting at any global position.

    Global micro-batch ``g`` comes from the permutation of epoch ``g // batches_per_epoch`` (seeded
    by ``seed + epoch``); rank ``r`` takes its ``batch_size`` slice of it.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, world_size: int, start: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, start
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"The dataset has {num_items} usable pairs, fewer than one batch over all devices "
                f"({batch_size * world_size})."
            )

    def __iter__(self):
        span = self.batch_size * self.world_size
        order_epoch, order = None, None
        while True:
            epoch, offset = divmod(self.position, self.batches_per_epoch)
            if epoch != order_epoch:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order_epoch, order = epoch, torch.randperm(self.num_items, generator=generator)
            start = offset * span + self.rank * self.batch_size
            self.position += 1
            yield order[start : start + self.batch_size].tolist()


@dataclass
class StepInputs:
    """One micro-batch on the device: winners first, then losers."""

    latents: torch.Tensor
    text: torch.Tensor


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([item[name] for item in items]) for name in items[0]}


def _setup_logging(output_dir: Path, is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    if is_main:
        handler = logging.FileHandler(output_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    for noisy in ("diffusers", "transformers", "PIL", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter], device: torch.device):
    options = dict(
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    if config.optimizer == "adamw8bit":
        if device.type != "cuda":
            logger.warning("8-bit AdamW needs a CUDA device; using torch AdamW on %s.", device.type)
        else:
            try:
                import bitsandbytes

                return bitsandbytes.optim.AdamW8bit(parameters, **options)
            except Exception as error:  # missing or broken install
                logger.warning("bitsandbytes is unusable here (%s); using torch AdamW.", error)
    return torch.optim.AdamW(parameters, **options)


def _encode_dataset(config: TrainConfig, components, dataset, accelerator):
    """Encode the dataset into the cache once (each rank its chunks); also the validation prompts."""
    from tqdm.auto import tqdm

    cache_dir = Path(config.cache_dir or cache_root()) / "encoded" / cache_key(
        model_fingerprint(config.model), f"{dataset.fingerprint()}:{config.people_only}", config.size
    )
    components.vae.to(accelerator.device)
    components.text_encoder.to(accelerator.device)
    build_cache(dataset, components, config.size, cache_dir, rank=accelerator.process_index,
                world_size=accelerator.num_processes, bad_images=config.bad_images,
                progress=tqdm if accelerator.is_main_process else None)
    accelerator.wait_for_everyone()
    encoded = finalize_cache(cache_dir, len(dataset))
    if encoded.skipped:
        if config.bad_images == "stop":
            raise TrainingError(f"{len(encoded.skipped)} pair(s) have missing or corrupt images, e.g. "
                                f"{next(iter(encoded.skipped.values()))}. Fix them or use --bad-images skip.")
        logger.warning("%d pair(s) skipped for missing or corrupt images: %s", len(encoded.skipped),
                       "; ".join(list(encoded.skipped.values())[:5]))
    prompts = config.validation_prompts or [dataset.prompt(i) for i in range(min(2, len(dataset)))]
    validation_text = encode_prompts(prompts, components.tokenizer, components.text_encoder).cpu()
    negative_text = encode_prompts([""], components.tokenizer, components.text_encoder).cpu()
    return encoded, validation_text, negative_text


def train(config: TrainConfig) -> Path:
    """Train and write ``<output_dir>/<output_name>.safetensors``; return its path."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, parse_flag_from_env
    from diffusers.optimization import get_scheduler
    from safetensors import SafetensorError
    from tqdm.auto import tqdm

    from hgdpo.data.readers import open_preference_dataset

    config.validate()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # `accelerate launch --cpu`
    world_size, rank = state.num_processes, state.process_index
    _setup_logging(output_dir, state.is_main_process)
    if config.effective_batch_size % (config.batch_size * world_size):
        raise ValueError(
            f"--effective-batch-size {config.effective_batch_size} is not a multiple of --batch-size "
            f"{config.batch_size} x {world_size} processes."
        )
    accumulation = config.effective_batch_size // (config.batch_size * world_size)
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this device.")
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    device = accelerator.device
    weight_dtype = torch.float32 if config.mixed_precision == "no" else DTYPES[config.mixed_precision]
    torch.manual_seed(config.seed)

    logger.info("Loading model %s", config.model)
    components = load_sd15(config.model, config_dir=config.model_config_dir)
    dataset = open_preference_dataset(config.dataset, people_only=config.people_only)
    logger.info("Dataset %s: %d pairs (%s)", config.dataset, len(dataset), dataset.info)
    encoded, validation_text, negative_text = _encode_dataset(config, components, dataset, accelerator)
    components.text_encoder.to("cpu")  # not needed any more: validation prompts are encoded
    components.vae.to(device, dtype=weight_dtype)

    # ---- the policy: frozen UNet + trainable fp32 LoRA
    unet = components.unet.to(device, dtype=weight_dtype)
    add_lora(unet, config.lora_rank, config.lora_alpha, config.target_modules)
    for parameter in lora_parameters(unet):
        parameter.data = parameter.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = _make_optimizer(config, lora_parameters(unet), device)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_generator = torch.Generator(device).manual_seed(config.seed * 1009 + rank)

    # ---- resume
    checkpoints = CheckpointManager(output_dir, keep_last=config.checkpoints_total_limit)
    progress_state = TrainingState(step=0, batches_seen=0)
    resume_from = checkpoints.resolve(config.resume) if config.resume else None
    if config.resume and resume_from is None:
        logger.info("No checkpoint in %s yet: starting a new run.", checkpoints.root)
    accelerator.wait_for_everyone()  # every rank has resolved before the main one moves anything
    if accelerator.is_main_process:
        checkpoints.abandon_other_lineages(resume_from)
    if resume_from is not None:
        progress_state = _restore(
            resume_from, config, accelerator, unet, optimizer, lr_scheduler, noise_generator, rank
        )
        logger.info("Resumed from %s at step %d", resume_from, progress_state.step)

    sampler = ResumableBatchSampler(len(encoded), config.batch_size, config.seed, rank, world_size,
                                    start=progress_state.batches_seen)
    batches = iter(torch.utils.data.DataLoader(encoded, batch_sampler=sampler, collate_fn=_collate))
    if accelerator.is_main_process:
        accelerator.init_trackers("hgdpo", config={k: v for k, v in vars(config).items()
                                                   if isinstance(v, (int, float, str, bool))})
        save_config(config, output_dir / f"{config.output_name}.toml")
    logger.info(
        "Training %s for %d steps: %d pairs, %d per device x %d accumulation x %d devices = %d pairs/step",
        config.loss, config.max_steps, len(encoded), config.batch_size, accumulation, world_size,
        config.effective_batch_size,
    )
    scheduler = components.noise_scheduler
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    clip_range = scheduler.config.clip_sample_range if scheduler.config.get("clip_sample") else None
    bar = tqdm(total=config.max_steps, initial=progress_state.step, desc="training", unit="step",
               disable=not accelerator.is_main_process)
    while progress_state.step < config.max_steps:
        logs: dict[str, list[float]] = defaultdict(list)
        losses_finite = True
        for _ in range(accumulation):
            batch = next(batches)
            progress_state.batches_seen += 1
            with accelerator.accumulate(unet):
                inputs = StepInputs(
                    latents=torch.cat([batch["win"], batch["lose"]]).to(device, weight_dtype),
                    text=batch["text"].to(device, weight_dtype),
                )
                loss = micro_step_loss(
                    config, unet, inputs, scheduler, alphas_cumprod, clip_range, noise_generator, logs
                )
                losses_finite &= bool(torch.isfinite(loss))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = _clip(accelerator, unet, config.max_grad_norm)
                    # fp16's grad scaler skips overflowing steps itself (and must see every step to rescale);
                    # its overflows while it calibrates are not failures, only a non-finite loss is
                    scaler = accelerator.scaler
                    finite = losses_finite and (scaler is not None or bool(torch.isfinite(grad_norm)))
                    if finite or scaler is not None:
                        optimizer.step()
                    if finite:
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        progress_state.step += 1
        progress_state.consecutive_nonfinite = 0 if finite else progress_state.consecutive_nonfinite + 1
        if not finite:
            logger.warning("Step %d: NaN/inf gradients, update skipped (%d in a row).",
                           progress_state.step, progress_state.consecutive_nonfinite)
            if progress_state.consecutive_nonfinite >= config.max_nonfinite_steps:
                raise TrainingError(
                    f"{progress_state.consecutive_nonfinite} optimizer steps in a row had NaN/inf loss or "
                    "gradients. Lower --learning-rate, use --mixed-precision bf16 instead of fp16, or check "
                    "the dataset; the last good checkpoint is in " + str(checkpoints.root)
                )
        bar.update(1)
        if progress_state.step % config.log_every == 0:
            scalars = {name: sum(values) / len(values) for name, values in logs.items()}
            scalars.update({"train/lr": lr_scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)})
            accelerator.log(scalars, step=progress_state.step)
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items()
                             if k in ("loss/total", "dpo/implicit_accuracy", "loss/stat_share")})
        if progress_state.step % config.checkpointing_steps == 0 or progress_state.step == config.max_steps:
            _save_checkpoint(checkpoints, progress_state, config, accelerator, unet, optimizer, lr_scheduler,
                             noise_generator, rank)
        if (accelerator.is_main_process and config.validation_steps
                and (progress_state.step % config.validation_steps == 0 or progress_state.step == config.max_steps)):
            _log_validation(config, components, accelerator, unet, validation_text, negative_text, progress_state.step,
                            output_dir)
    bar.close()
    accelerator.wait_for_everyone()
    final_path = output_dir / f"{config.output_name}.safetensors"
    if accelerator.is_main_process:
        try:
            _save_lora(final_path, _base(accelerator.unwrap_model(unet)), config, dataset, len(encoded),
                       optimizer_name=type(getattr(optimizer, "optimizer", optimizer)).__name__)
        except (OSError, SafetensorError) as error:
            raise TrainingError(f"Could not write {final_path} ({error}). Free disk space and run the same "
                                "command with --resume latest: it writes the LoRA from the last checkpoint.") from error
        logger.info("Wrote %s", final_path)
    accelerator.end_training()
    return final_path


def micro_step_loss(config, unet, inputs: StepInputs, scheduler, alphas_cumprod, clip_range, generator, logs):
    """Forward passes and loss of one micro-batch; appends its scalars to ``logs``."""
    pairs = inputs.text.shape[0]
    shape = (pairs,) + tuple(inputs.latents.shape[1:])
    noise = torch.randn(shape, generator=generator, device=generator.device).to(inputs.latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), generator=generator,
                              device=generator.device).to(inputs.latents.device)
    if config.loss == "sft":  # winners only, no reference
        noisy = scheduler.add_noise(inputs.latents[:pairs], noise, timesteps)
        prediction = unet(noisy, timesteps, inputs.text).sample
        loss = sft_loss(prediction, _target(scheduler, inputs.latents[:pairs], noise, timesteps))
        logs["loss/total"].append(loss.item())
        return loss
    noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    noisy = scheduler.add_noise(inputs.latents, noise, timesteps)
    text = inputs.text.repeat(2, 1, 1)
    policy = unet(noisy, timesteps, text).sample
    with torch.no_grad(), adapter_disabled(_base(unet)):
        reference = unet(noisy, timesteps, text).sample
    result = hgdpo_loss(
        policy, reference, _target(scheduler, inputs.latents, noise, timesteps), noisy, timesteps, alphas_cumprod,
        prediction_type=scheduler.config.prediction_type, beta=config.beta,
        lambda_stat=config.lambda_stat if config.loss == "hgdpo" else 0.0, clip_sample_range=clip_range,
    )
    for name, value in result.scalars().items():
        logs[name].append(value)
    buckets = (timesteps[:pairs] * TIMESTEP_BUCKETS // scheduler.config.num_train_timesteps).tolist()
    width = scheduler.config.num_train_timesteps // TIMESTEP_BUCKETS
    for bucket, pair_loss, margin in zip(buckets, result.dpo.loss.tolist(), result.dpo.reward_margin.tolist()):
        label = f"{bucket * width:03d}-{(bucket + 1) * width - 1:03d}"
        logs[f"dpo_loss_by_t/{label}"].append(pair_loss)
        logs[f"implicit_accuracy_by_t/{label}"].append(float(margin > 0) + 0.5 * float(margin == 0))
    return result.loss


def _target(scheduler, latents, noise, timesteps):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def _base(unet):
    return getattr(unet, "module", unet)


def _clip(accelerator, unet, max_norm: float) -> torch.Tensor:
    parameters = lora_parameters(_base(unet))
    return accelerator.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)


def _save_checkpoint(checkpoints, progress_state, config, accelerator, unet, optimizer, lr_scheduler, generator, rank):
    """Every rank contributes its noise-generator state; the main process writes the folder atomically."""
    rng = rng_states({f"noise_rank{rank}": generator})
    if accelerator.num_processes > 1:
        gathered: list = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, rng)
        for part in gathered:
            rng.update({key: value for key, value in part.items() if key.startswith("generator/")})
    if accelerator.is_main_process:
        objects = {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "rng": rng,
            "invariants": {name: getattr(config, name) for name in _RESUME_INVARIANTS},
        }
        if accelerator.scaler is not None:
            objects["grad_scaler"] = accelerator.scaler.state_dict()
        path = checkpoints.save(progress_state, lora_state_dict(_base(unet)), objects)
        if path:
            logger.info("Checkpoint %s", path)
    accelerator.wait_for_everyone()


def _restore(path, config, accelerator, unet, optimizer, lr_scheduler, generator, rank) -> TrainingState:
    """Load a checkpoint into the live objects; refuse one made with incompatible options."""
    progress_state, tensors, objects = CheckpointManager.load(path)
    changed = {name: (objects["invariants"][name], getattr(config, name)) for name in _RESUME_INVARIANTS
               if objects["invariants"][name] != getattr(config, name)}
    if changed:
        raise ValueError(f"Cannot resume from {path}: options changed since it was written (was, now): {changed}.")
    load_lora_state_dict(_base(unet), tensors)
    optimizer.load_state_dict(objects["optimizer"])
    lr_scheduler.load_state_dict(objects["lr_scheduler"])
    if accelerator.scaler is not None and "grad_scaler" in objects:
        accelerator.scaler.load_state_dict(objects["grad_scaler"])
    restore_rng_states(objects["rng"], {f"noise_rank{rank}": generator})
    return progress_state


@torch.no_grad()
def _log_validation(config, components, accelerator, unet, prompt_embeds, negative_embeds, step, output_dir):
    """Images at fixed seeds for each validation LoRA weight: a grid PNG and a TensorBoard image."""
    import numpy as np
    from PIL import Image

    unet = _base(accelerator.unwrap_model(unet))
    unet.eval()
    with accelerator.autocast():
        rows = validation_images(config, components, unet, prompt_embeds, negative_embeds)
    unet.train()
    grid = np.concatenate([np.concatenate([np.asarray(image) for image in row], axis=1) for row in rows], axis=0)
    folder = output_dir / "validation"
    folder.mkdir(exist_ok=True)
    Image.fromarray(grid).save(folder / f"step-{step:08d}.png")
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image("validation (rows: LoRA weight " + ", ".join(map(str, config.validation_lora_weights)) + ")",
                      grid, step, dataformats="HWC")


def _save_lora(path: Path, unet, config: TrainConfig, dataset, num_pairs: int, optimizer_name: str) -> None:
    model_path = Path(config.model)
    base_hash = file_sha256(model_path) if model_path.is_file() else model_fingerprint(config.model)
    info = dataset.info
    metadata = kohya_metadata(
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        title=config.output_name,
        resolution=config.size,
        base_model=config.model,
        base_model_hash=base_hash,
        training={
            "learning_rate": config.learning_rate,
            "max_train_steps": config.max_steps,
            "num_train_images": 2 * num_pairs,
            "mixed_precision": config.mixed_precision,
            "seed": config.seed,
            "optimizer": optimizer_name,
            "total_batch_size": config.effective_batch_size,
            "lr_scheduler": config.lr_scheduler,
        },
        hgdpo={
            "loss": config.loss,
            "beta": config.beta,
            "lambda_stat": config.lambda_stat,
            "pool_size": info.pool_size,
            "dataset_size": num_pairs,
            "dataset_kind": info.kind,
            "steps": config.max_steps,
            "scorer": info.scorer,
            "people_only": config.people_only,
        },
    )
    save_kohya_lora(path, lora_state_dict(unet), config.lora_alpha, metadata, DTYPES[config.save_precision])
