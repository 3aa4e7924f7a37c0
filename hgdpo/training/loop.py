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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, parse_flag_from_env
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from safetensors import SafetensorError
from tqdm.auto import tqdm

from hgdpo.data.readers import PreferenceDataset, open_preference_dataset
from hgdpo.errors import TrainingError
from hgdpo.fileio import cache_root
from hgdpo.models.families import Conditioning, Prediction
from hgdpo.models.loading import SD15Components, family_size, file_sha256, model_fingerprint
from hgdpo.models.lora import (
    adapter_disabled,
    add_lora,
    kohya_metadata,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    save_kohya_lora,
)
from hgdpo.options import parse_resolution
from hgdpo.training.allocator import keep_freed_memory
from hgdpo.training.checkpoint import CheckpointManager, TrainingState, restore_rng_states, rng_states
from hgdpo.training.config import DTYPES, TrainConfig, save_config
from hgdpo.training.latent_cache import EncodedPairs, build_cache, cache_key, finalize_cache
from hgdpo.training.losses import DPOTerms, denoising_target, hgdpo_loss, sft_loss
from hgdpo.training.validation import validation_images

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
    text: Conditioning  # one row per pair


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


def _make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter],
                    device: torch.device) -> torch.optim.Optimizer:
    options = {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }
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


def _encode_dataset(config: TrainConfig, components: SD15Components, dataset: PreferenceDataset,
                    accelerator: Accelerator) -> tuple[EncodedPairs, Conditioning, Conditioning]:
    """Encode the dataset into the cache once (each rank its chunks); also the validation prompts."""
    cache_dir = Path(config.cache_dir or cache_root()) / "encoded" / cache_key(
        model_fingerprint(config.model), f"{dataset.fingerprint()}:{config.people_only}", config.size
    )
    components.vae.to(accelerator.device)
    for text_encoder in components.text_encoder_modules:
        text_encoder.to(accelerator.device)
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
    width, height = config.size
    validation_text = components.encode_prompts(prompts, (height, width)).to("cpu")
    negative_text = components.encode_prompts([""], (height, width)).to("cpu")
    return encoded, validation_text, negative_text


@dataclass
class ForwardProcess:
    """The noising of training, ``q(x_t | x_0)``: timesteps and noise drawn from one generator.

    Also what Eq. 8's DDPM step needs of the schedule (``alphas_cumprod`` on the generator's device,
    the sample clipping range) and the regression target of the UNet.
    """

    scheduler: DDPMScheduler
    generator: torch.Generator
    alphas_cumprod: torch.Tensor
    clip_range: float | None

    @classmethod
    def of(cls, scheduler: DDPMScheduler, generator: torch.Generator) -> ForwardProcess:
        clip_range = scheduler.config.clip_sample_range if scheduler.config.get("clip_sample") else None
        return cls(scheduler, generator, scheduler.alphas_cumprod.to(generator.device), clip_range)

    def draw(self, latents: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps for ``pairs`` pairs, each noise shaped like one latent of ``latents``."""
        device = self.generator.device
        noise = torch.randn((pairs,) + tuple(latents.shape[1:]), generator=self.generator, device=device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (pairs,), generator=self.generator,
                                  device=device)
        return noise.to(latents), timesteps.to(latents.device)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet regresses: the noise, or the velocity for v-prediction models."""
        return denoising_target(self.scheduler, latents, noise, timesteps)


@dataclass
class TrainingRun:
    """One training run: its options, models, optimizer, checkpoints and where it stands."""

    config: TrainConfig
    accelerator: Accelerator
    components: SD15Components
    dataset: PreferenceDataset
    encoded: EncodedPairs
    unet: torch.nn.Module  # the policy (frozen UNet + LoRA) as ``accelerator.prepare`` returned it
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    noise: ForwardProcess
    checkpoints: CheckpointManager
    output_dir: Path
    weight_dtype: torch.dtype
    accumulation: int  # micro-batches per optimizer step on each device
    validation_text: Conditioning  # the validation prompts' (on the CPU)
    negative_text: Conditioning  # and the empty prompt's
    state: TrainingState = field(default_factory=lambda: TrainingState(step=0, batches_seen=0))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def due(self, every: int) -> bool:
        """Whether the step just taken is a multiple of ``every``, or the last one."""
        return self.state.step % every == 0 or self.state.step == self.config.max_steps


@dataclass
class StepOutcome:
    """What one optimizer step leaves for the logs."""

    logs: dict[str, list[float]]  # the scalars of each micro-batch
    grad_norm: torch.Tensor
    finite: bool  # False: NaN/inf loss or gradients, the update was skipped


def train(config: TrainConfig) -> Path:
    """Train and write ``<output_dir>/<output_name>.safetensors``; return its path."""
    run = setup_run(config)
    batches = _micro_batches(run)
    _start_tracking(run)
    bar = tqdm(total=config.max_steps, initial=run.state.step, desc="training", unit="step", disable=not run.is_main)
    while run.state.step < config.max_steps:
        outcome = optimizer_step(run, batches)
        _count_step(run, outcome.finite)
        bar.update(1)
        if run.state.step % config.log_every == 0:
            _log_step(run, outcome, bar)
        if run.due(config.checkpointing_steps):
            _save_checkpoint(run)
        if run.is_main and config.validation_steps and run.due(config.validation_steps):
            _log_validation(run)
    bar.close()
    return _save_final_lora(run)


def setup_run(config: TrainConfig) -> TrainingRun:
    """Devices, model, encoded dataset, the LoRA policy and its optimizer; resumed when asked."""
    config.validate()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator, accumulation = _make_accelerator(config, output_dir)
    device = accelerator.device
    if device.type == "cpu" and keep_freed_memory():
        logger.info("CPU training: glibc keeps freed memory for reuse (no fresh pages at every step).")
    weight_dtype = torch.float32 if config.mixed_precision == "no" else DTYPES[config.mixed_precision]
    torch.manual_seed(config.seed)

    logger.info("Loading model %s", config.model)
    components = config.model_options.load(config.model, config.model_config_dir, config.size,
                                           unet_dtype=weight_dtype)
    family = components.family
    config.resolution = "x".join(map(str, family_size(config.size, family)))  # "auto" -> the family's
    logger.info("%s model, %s prediction, training at %s", family.label,
                components.noise_scheduler.config.prediction_type, config.resolution)
    dataset = open_preference_dataset(config.dataset, people_only=config.people_only)
    logger.info("Dataset %s: %d pairs (%s)", config.dataset, len(dataset), dataset.info)
    encoded, validation_text, negative_text = _encode_dataset(config, components, dataset, accelerator)
    components.release_text_encoders()  # the dataset and the validation prompts are encoded
    components.vae.to(device, dtype=family.vae_dtype(weight_dtype))

    unet = _make_policy(config, components.unet, device, weight_dtype)
    optimizer = _make_optimizer(config, lora_parameters(unet), device)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    generator = torch.Generator(device).manual_seed(config.seed * 1009 + accelerator.process_index)
    run = TrainingRun(
        config=config, accelerator=accelerator, components=components, dataset=dataset, encoded=encoded,
        unet=unet, optimizer=optimizer, lr_scheduler=lr_scheduler,
        noise=ForwardProcess.of(components.noise_scheduler, generator),
        checkpoints=CheckpointManager(output_dir, keep_last=config.checkpoints_total_limit), output_dir=output_dir,
        weight_dtype=weight_dtype, accumulation=accumulation, validation_text=validation_text,
        negative_text=negative_text,
    )
    _resume(run)
    return run


def _make_accelerator(config: TrainConfig, output_dir: Path) -> tuple[Accelerator, int]:
    """The accelerator (also sets up logging); with the micro-batches per optimizer step on each device."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # `accelerate launch --cpu`
    world_size = state.num_processes
    _setup_logging(output_dir, state.is_main_process)
    if config.effective_batch_size % (config.batch_size * world_size):
        raise ValueError(
            f"--effective-batch-size {config.effective_batch_size} is not a multiple of --batch-size "
            f"{config.batch_size} x {world_size} processes."
        )
    accumulation = config.effective_batch_size // (config.batch_size * world_size)
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this device.")
    _forget_earlier_runs()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    return accelerator, accumulation


def _forget_earlier_runs() -> None:
    """Drop the accelerator settings an earlier run left in this process (a second ``train`` in one process).

    accelerate keeps its mixed precision and accumulation process-wide and refuses a new ``Accelerator``
    with other values; the process group (``PartialState``) is kept, so ``accelerate launch`` is unaffected.
    ``_reset_state`` is accelerate's own (private) reset, the one its test suite uses between runs.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _make_policy(config: TrainConfig, unet: torch.nn.Module, device: torch.device,
                 weight_dtype: torch.dtype) -> torch.nn.Module:
    """The policy: the frozen UNet in the weight dtype with a trainable fp32 LoRA."""
    unet = unet.to(device, dtype=weight_dtype)
    add_lora(unet, config.lora_rank, config.lora_alpha, config.target_modules)
    for parameter in lora_parameters(unet):
        parameter.data = parameter.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def _resume(run: TrainingRun) -> None:
    """Continue from the checkpoint ``config.resume`` names, if there is one; drop other lineages."""
    config, checkpoints = run.config, run.checkpoints
    resume_from = checkpoints.resolve(config.resume) if config.resume else None
    if config.resume and resume_from is None:
        logger.info("No checkpoint in %s yet: starting a new run.", checkpoints.root)
    run.accelerator.wait_for_everyone()  # every rank has resolved before the main one moves anything
    if run.is_main:
        checkpoints.abandon_other_lineages(resume_from)
    if resume_from is not None:
        run.state = _restore(run, resume_from)
        logger.info("Resumed from %s at step %d", resume_from, run.state.step)


def _micro_batches(run: TrainingRun) -> Iterator[StepInputs]:
    """This rank's micro-batches on the device, from the run's position on."""
    sampler = ResumableBatchSampler(len(run.encoded), run.config.batch_size, run.config.seed,
                                    run.accelerator.process_index, run.accelerator.num_processes,
                                    start=run.state.batches_seen)
    device, dtype = run.accelerator.device, run.weight_dtype
    width, height = run.config.size
    for batch in torch.utils.data.DataLoader(run.encoded, batch_sampler=sampler, collate_fn=_collate):
        pooled = batch.get("pooled")
        text = run.components.family.conditioning(batch["text"], pooled, (height, width))
        yield StepInputs(latents=torch.cat([batch["win"], batch["lose"]]).to(device, dtype),
                         text=text.to(device, dtype))


def _start_tracking(run: TrainingRun) -> None:
    """TensorBoard and the config file beside the LoRA (main process); the run's shape in the log."""
    config = run.config
    if run.is_main:
        run.accelerator.init_trackers("hgdpo", config={k: v for k, v in vars(config).items()
                                                       if isinstance(v, (int, float, str, bool))})
        save_config(config, run.output_dir / f"{config.output_name}.toml")
    logger.info(
        "Training %s for %d steps: %d pairs, %d per device x %d accumulation x %d devices = %d pairs/step",
        config.loss, config.max_steps, len(run.encoded), config.batch_size, run.accumulation,
        run.accelerator.num_processes, config.effective_batch_size,
    )


def optimizer_step(run: TrainingRun, batches: Iterator[StepInputs]) -> StepOutcome:
    """One optimizer step: ``run.accumulation`` micro-batches, then clipping, the finiteness check, the update."""
    accelerator, logs = run.accelerator, defaultdict(list)
    losses_finite = True
    for _ in range(run.accumulation):
        inputs = next(batches)
        run.state.batches_seen += 1
        with accelerator.accumulate(run.unet):
            loss = micro_step_loss(run.config, run.unet, run.noise, inputs, logs)
            losses_finite &= bool(torch.isfinite(loss))
            accelerator.backward(loss)
    # accelerate counted `accumulation` micro-batches: the last one synchronised the gradients
    grad_norm = _clip(accelerator, run.unet, run.config.max_grad_norm)
    # fp16's grad scaler skips overflowing steps itself (and must see every step to rescale);
    # its overflows while it calibrates are not failures, only a non-finite loss is
    scaler = accelerator.scaler
    finite = losses_finite and (scaler is not None or bool(torch.isfinite(grad_norm)))
    if finite or scaler is not None:
        run.optimizer.step()
    if finite:
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(logs=logs, grad_norm=grad_norm, finite=finite)


def _count_step(run: TrainingRun, finite: bool) -> None:
    """Advance the step counter; stop after ``max_nonfinite_steps`` skipped updates in a row."""
    state = run.state
    state.step += 1
    state.consecutive_nonfinite = 0 if finite else state.consecutive_nonfinite + 1
    if finite:
        return
    logger.warning("Step %d: NaN/inf gradients, update skipped (%d in a row).", state.step,
                   state.consecutive_nonfinite)
    if state.consecutive_nonfinite >= run.config.max_nonfinite_steps:
        raise TrainingError(
            f"{state.consecutive_nonfinite} optimizer steps in a row had NaN/inf loss or "
            "gradients. Lower --learning-rate, use --mixed-precision bf16 instead of fp16, or check "
            "the dataset; the last good checkpoint is in " + str(run.checkpoints.root)
        )


def _log_step(run: TrainingRun, outcome: StepOutcome, bar: tqdm) -> None:
    """The step's mean scalars, learning rate and gradient norm to TensorBoard; the headline ones to the bar."""
    scalars = {name: sum(values) / len(values) for name, values in outcome.logs.items()}
    scalars.update({"train/lr": run.lr_scheduler.get_last_lr()[0], "train/grad_norm": float(outcome.grad_norm)})
    run.accelerator.log(scalars, step=run.state.step)
    bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items()
                     if k in ("loss/total", "dpo/implicit_accuracy", "loss/stat_share")})


def micro_step_loss(config: TrainConfig, unet: torch.nn.Module, noise: ForwardProcess, inputs: StepInputs,
                    logs: dict[str, list[float]]) -> torch.Tensor:
    """Forward passes and loss of one micro-batch (Eq. 9, Eq. 3 or SFT); appends its scalars to ``logs``.

    Both images of a pair get the same noise and timestep; the reference is the UNet with its LoRA off.
    """
    pairs = len(inputs.text)
    epsilon, timesteps = noise.draw(inputs.latents, pairs)
    scheduler = noise.scheduler
    if config.loss == "sft":  # winners only, no reference
        winners = inputs.latents[:pairs]
        prediction = unet(scheduler.add_noise(winners, epsilon, timesteps), timesteps,
                          **inputs.text.unet_kwargs()).sample
        loss = sft_loss(prediction, noise.target(winners, epsilon, timesteps))
        logs["loss/total"].append(loss.item())
        return loss
    epsilon, timesteps = epsilon.repeat(2, 1, 1, 1), timesteps.repeat(2)
    noisy = scheduler.add_noise(inputs.latents, epsilon, timesteps)
    text = inputs.text.repeat(2).unet_kwargs()
    policy = unet(noisy, timesteps, **text).sample
    with torch.no_grad(), adapter_disabled(_base(unet)):
        reference = unet(noisy, timesteps, **text).sample
    result = hgdpo_loss(
        policy, reference, noise.target(inputs.latents, epsilon, timesteps), noisy, timesteps, noise.alphas_cumprod,
        prediction_type=scheduler.config.prediction_type, beta=config.beta,
        lambda_stat=config.lambda_stat if config.loss == "hgdpo" else 0.0, clip_sample_range=noise.clip_range,
    )
    for name, value in result.scalars().items():
        logs[name].append(value)
    _log_by_timestep(logs, timesteps[:pairs], result.dpo, scheduler.config.num_train_timesteps)
    return result.loss


def _log_by_timestep(logs: dict[str, list[float]], timesteps: torch.Tensor, dpo: DPOTerms, num_timesteps: int) -> None:
    """Each pair's Eq. 3 loss and implicit accuracy under its band of ``TIMESTEP_BUCKETS`` timestep bands."""
    width = num_timesteps // TIMESTEP_BUCKETS
    buckets = (timesteps * TIMESTEP_BUCKETS // num_timesteps).tolist()
    for bucket, pair_loss, margin in zip(buckets, dpo.loss.tolist(), dpo.reward_margin.tolist()):
        label = f"{bucket * width:03d}-{(bucket + 1) * width - 1:03d}"
        logs[f"dpo_loss_by_t/{label}"].append(pair_loss)
        logs[f"implicit_accuracy_by_t/{label}"].append(float(margin > 0) + 0.5 * float(margin == 0))


def _base(unet: torch.nn.Module) -> torch.nn.Module:
    return getattr(unet, "module", unet)


def _clip(accelerator: Accelerator, unet: torch.nn.Module, max_norm: float) -> torch.Tensor:
    parameters = lora_parameters(_base(unet))
    return accelerator.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)


def _save_checkpoint(run: TrainingRun) -> None:
    """Every rank contributes its noise-generator state; the main process writes the folder atomically."""
    accelerator = run.accelerator
    rng = rng_states({f"noise_rank{accelerator.process_index}": run.noise.generator})
    if accelerator.num_processes > 1:
        gathered: list = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, rng)
        for part in gathered:
            rng.update({key: value for key, value in part.items() if key.startswith("generator/")})
    if accelerator.is_main_process:
        objects = {
            "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            "rng": rng,
            "invariants": {name: getattr(run.config, name) for name in _RESUME_INVARIANTS},
        }
        if accelerator.scaler is not None:
            objects["grad_scaler"] = accelerator.scaler.state_dict()
        path = run.checkpoints.save(run.state, lora_state_dict(_base(run.unet)), objects)
        if path:
            logger.info("Checkpoint %s", path)
    accelerator.wait_for_everyone()


def _same_option(name: str, was: object, now: object) -> bool:
    """Whether a resume invariant is unchanged (``512`` and ``512x512`` are one resolution)."""
    return parse_resolution(was) == parse_resolution(now) if name == "resolution" else was == now


def _restore(run: TrainingRun, path: Path) -> TrainingState:
    """Load a checkpoint into the run's live objects; refuse one made with incompatible options."""
    progress_state, tensors, objects = CheckpointManager.load(path)
    changed = {name: (objects["invariants"][name], getattr(run.config, name)) for name in _RESUME_INVARIANTS
               if not _same_option(name, objects["invariants"][name], getattr(run.config, name))}
    if changed:
        raise ValueError(f"Cannot resume from {path}: options changed since it was written (was, now): {changed}.")
    load_lora_state_dict(_base(run.unet), tensors)
    run.optimizer.load_state_dict(objects["optimizer"])
    run.lr_scheduler.load_state_dict(objects["lr_scheduler"])
    scaler = run.accelerator.scaler
    if scaler is not None and "grad_scaler" in objects:
        scaler.load_state_dict(objects["grad_scaler"])
    restore_rng_states(objects["rng"], {f"noise_rank{run.accelerator.process_index}": run.noise.generator})
    return progress_state


@torch.no_grad()
def _log_validation(run: TrainingRun) -> None:
    """Images at fixed seeds for each validation LoRA weight: a grid PNG and a TensorBoard image."""
    import numpy as np
    from PIL import Image

    config, components, accelerator, unet, step = run.config, run.components, run.accelerator, run.unet, run.state.step
    prompt_embeds, negative_embeds, output_dir = run.validation_text, run.negative_text, run.output_dir

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


def _save_final_lora(run: TrainingRun) -> Path:
    """Write the trained LoRA (main process) once every rank is done; close the trackers."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    final_path = run.output_dir / f"{run.config.output_name}.safetensors"
    if accelerator.is_main_process:
        try:
            _save_lora(run, final_path)
        except (OSError, SafetensorError) as error:
            raise TrainingError(f"Could not write {final_path} ({error}). Free disk space and run the same "
                                "command with --resume latest: it writes the LoRA from the last checkpoint.") from error
        logger.info("Wrote %s", final_path)
    accelerator.end_training()
    return final_path


def _save_lora(run: TrainingRun, path: Path) -> None:
    """The kohya LoRA file with its training metadata (``ss_*``, ``modelspec.*`` and ``hgdpo.*`` keys)."""
    config, info, num_pairs = run.config, run.dataset.info, len(run.encoded)
    model_path = Path(config.model)
    base_hash = file_sha256(model_path) if model_path.is_file() else model_fingerprint(config.model)
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate wraps it
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
            "optimizer": type(optimizer).__name__,
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
        family=run.components.family,
        prediction_type=Prediction(run.noise.scheduler.config.prediction_type).modelspec,
    )
    unet = _base(run.accelerator.unwrap_model(run.unet))
    save_kohya_lora(path, lora_state_dict(unet), config.lora_alpha, metadata, DTYPES[config.save_precision],
                    names=run.components.family.kohya_unet_names(unet))
