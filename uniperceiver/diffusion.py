"""The text-to-image branch: a diffusers `UNet2DConditionModel` that reads, through cross-attention, the text-token
states the shared decoder gives a prompt (the same states every other task ranks or generates from).

Pieces, all from diffusers: the UNet (built from `DiffusionConfig` or loaded from a local diffusers folder), DDPM
noise for training (epsilon or v-prediction, Min-SNR weighting via `compute_snr`), DPM-Solver++ with
classifier-free guidance for sampling, `EMAModel` for the averaged weights, and optionally an `AutoencoderKL` (latent
space, frozen) from a local folder. Written by hand, because diffusers has no such piece: the projection from the
decoder's width to the UNet's `cross_attention_dim`, the learned null condition (one real, unmasked token: an
all-masked row makes attention NaN) and the EMA kept in buffers, so that it rides in the model's checkpoint.

Saved inside the model's folder as `diffusion/unet/`, `diffusion/scheduler/` (and `diffusion/vae/`) by diffusers'
own `save_pretrained`; the projection and the null condition are in the model's safetensors file.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UNET_FOLDER, SCHEDULER_FOLDER, VAE_FOLDER = "unet", "scheduler", "vae"
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class DiffusionConfig:
    """The branch as data (`UniPerceiverConfig.diffusion`; None: a model without it).

    pretrained: a local diffusers folder with unet/ and scheduler/ (and vae/ for latent space, e.g. a Stable
        Diffusion checkpoint in diffusers layout); None builds a pixel-space UNet from the fields below.
    image_size: the generated pictures' side in pixels (pixel space: the UNet's sample size).
    train_condition: whether the diffusion loss trains the decoder and the text encoder (False: it sees their
        states with gradients stopped; see `DiffusionBranch.condition`).
    """
    pretrained: str | None = None
    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    cross_attention_levels: tuple[bool, ...] = (False, True, True)  # attention costs most at the finest level
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    cross_attention_dim: int = 64
    pooled_condition: bool = True        # the prompt's <SPE> state also joins the timestep embedding
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    snr_gamma: float | None = 5.0        # Min-SNR weighting; None: plain MSE
    # training timesteps: uniform, or t / T = sigmoid(N(0, 1)), which spends the steps on the middle noise levels
    timestep_sampling: str = "uniform"
    condition_dropout: float = 0.1       # share of training prompts replaced by the null condition
    train_condition: bool = False
    ema_decay: float = 0.999             # the ceiling of EMAModel's warm-up (inv_gamma 1, power 2/3); 0: no EMA
    guidance: float = 3.0

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.cross_attention_levels = tuple(bool(b) for b in self.cross_attention_levels)
        problems = []
        if len(self.cross_attention_levels) != len(self.block_out_channels):
            problems.append(f"cross_attention_levels has {len(self.cross_attention_levels)} entries, "
                            f"block_out_channels {len(self.block_out_channels)}")
        if self.prediction_type not in PREDICTION_TYPES:
            problems.append(f"prediction_type {self.prediction_type!r}: expected one of {PREDICTION_TYPES}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            problems.append(f"timestep_sampling {self.timestep_sampling!r}: expected one of {TIMESTEP_SAMPLINGS}")
        if not 0.0 <= self.condition_dropout < 1.0:
            problems.append(f"condition_dropout {self.condition_dropout}: expected a value in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay {self.ema_decay}: expected a value in [0, 1)")
        if self.pretrained is None and self.image_size % 2 ** (len(self.block_out_channels) - 1):
            problems.append(f"image_size {self.image_size}: must be divisible by 2^{len(self.block_out_channels) - 1}"
                            " (the UNet halves it at every level but the last)")
        if problems:
            raise ValueError("config.diffusion: " + "; ".join(problems))


def build_unet(config: DiffusionConfig):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=config.image_size, in_channels=3, out_channels=3, block_out_channels=config.block_out_channels,
        down_block_types=down, up_block_types=up, layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim, attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        # every ResNet block sees the whole prompt through the timestep embedding, not only the attention levels
        class_embed_type="projection" if config.pooled_condition else None,
        projection_class_embeddings_input_dim=config.cross_attention_dim if config.pooled_condition else None)


def build_scheduler(config: DiffusionConfig):
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, clip_sample=False,
                         # set, not left to each class's default: the sampler built from this config, before and
                         # after a save, must place its steps alike ("trailing": the first step at the last timestep)
                         timestep_spacing="trailing")


class Condition(NamedTuple):
    """What the UNet is conditioned on: token states (B, L, cross_attention_dim), their mask (B, L; True keeps a
    token) and, for a UNet with a projection class embedding, the prompt's pooled state (B, cross_attention_dim)."""
    states: Tensor
    mask: Tensor
    pooled: Tensor | None = None


def _require_folder(folder: Path, what: str) -> None:
    if not (folder / "config.json").exists() and not (folder / "scheduler_config.json").exists():
        raise FileNotFoundError(f"config.diffusion.pretrained: {folder} holds no diffusers {what} "
                                "(expected config.json or scheduler_config.json written by save_pretrained)")


def zero3_partitioned(parameters) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions any of `parameters`."""
    return any(hasattr(p, "ds_id") for p in parameters)


def _zero3_gathered(parameters: Sequence[nn.Parameter]):
    """All of `parameters`, whole, inside the block: ZeRO-3 partitions them outside a forward pass (an EMA step on
    the partitions would average empty tensors)."""
    if zero3_partitioned(parameters):
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=None)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _channels_last(module: nn.Module):
    """The module's 4-D weights in channels-last layout inside the block, contiguous again after it. Convolutions
    on a CPU run about 1.3x faster so (16 pictures of 64 px, 20 steps, 2 cores: 20 s -> 15 s); the layout is not
    kept, since the optimizer and DeepSpeed's flattening expect contiguous parameters. ZeRO-3's partitioned
    parameters are left alone."""
    if zero3_partitioned(module.parameters()):
        yield
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


def _autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on the device's type (CPU or CUDA), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class DiffusionBranch(nn.Module):
    """UNet + projection of the decoder's states + null condition (+ frozen VAE, + EMA of the UNet)."""

    def __init__(self, config: DiffusionConfig, width: int, root: str | Path | None = None):
        super().__init__()
        self.config = config
        source = Path(root or config.pretrained) if (root or config.pretrained) else None
        self.vae = None
        if source is None:
            self.unet, self.scheduler = build_unet(config), build_scheduler(config)
        else:
            from diffusers import DDPMScheduler, UNet2DConditionModel
            for sub, what in ((UNET_FOLDER, "UNet"), (SCHEDULER_FOLDER, "scheduler")):
                _require_folder(source / sub, what)
            self.unet = UNet2DConditionModel.from_pretrained(source, subfolder=UNET_FOLDER)
            # training noise is DDPM's whatever the checkpoint sampled with; the prediction type is the checkpoint's
            self.scheduler = DDPMScheduler.from_pretrained(source, subfolder=SCHEDULER_FOLDER)
            if (source / VAE_FOLDER).exists():
                from diffusers import AutoencoderKL
                self.vae = AutoencoderKL.from_pretrained(source, subfolder=VAE_FOLDER).requires_grad_(False).eval()
        self.cross_attention_dim = int(self.unet.config.cross_attention_dim)
        self.projection = nn.Linear(width, self.cross_attention_dim)
        self.null_condition = nn.Parameter(torch.randn(1, width) * 0.02)
        self.ema_decay = config.ema_decay
        if self.ema_decay > 0:
            for i, p in enumerate(self.unet.parameters()):
                self.register_buffer(f"ema_{i}", p.detach().clone())
            self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    # ---------------------------------------------------------------------------------------------- geometry
    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def image_size(self) -> int:
        """The side of a generated picture: the UNet's sample size, times the VAE's downsampling in latent space."""
        if self.vae is None:
            return self.sample_size
        return self.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen
        return self

    # --------------------------------------------------------------------------------------------- condition
    @property
    def pooled(self) -> bool:
        return self.unet.config.class_embed_type == "projection"

    def condition(self, states: Tensor, valid: Tensor, drop: Tensor | None = None) -> Condition:
        """Decoder states (B, L, width) with valid (B, L), the <SPE> state first -> the UNet's
        encoder_hidden_states (B, L, cross_attention_dim), encoder_attention_mask and pooled state (the projected
        first state). Rows where `drop` is True become the null condition: the learned null token first and
        unmasked, the rest masked (never an all-masked row)."""
        if drop is not None and bool(drop.any()):
            null = torch.zeros_like(states)
            null[:, 0] = self.null_condition.to(states.dtype)
            null_valid = torch.zeros_like(valid)
            null_valid[:, 0] = True
            states = torch.where(drop[:, None, None], null, states)
            valid = torch.where(drop[:, None], null_valid, valid)
        projected = self.projection(states.to(self.projection.weight.dtype))
        return Condition(projected, valid, projected[:, 0] if self.pooled else None)

    def null(self, batch: int, device) -> Condition:
        """The unconditional condition for `batch` pictures: the null token alone."""
        states = self.null_condition.to(device)[None].expand(batch, -1, -1)
        return self.condition(states, torch.ones(batch, 1, dtype=torch.bool, device=device))

    def predict(self, sample: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """The UNet's output (noise or velocity, by the scheduler's prediction type)."""
        pooled = None if condition.pooled is None else condition.pooled.to(sample.dtype)
        return self.unet(sample, timesteps, encoder_hidden_states=condition.states.to(sample.dtype),
                         encoder_attention_mask=condition.mask, class_labels=pooled).sample

    # ---------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def encode_pictures(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) pictures in [-1, 1] -> what the UNet denoises: the pixels at its sample size, or the VAE's
        scaled latents."""
        if self.vae is None:
            if pixels.shape[-1] != self.sample_size or pixels.shape[-2] != self.sample_size:
                pixels = F.interpolate(pixels.float(), size=(self.sample_size, self.sample_size), mode="bilinear",
                                       antialias=True, align_corners=False).to(pixels.dtype)
            return pixels
        size = self.image_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(pixels.to(vae_dtype)).latent_dist.sample()
        return (latents * self.vae.config.scaling_factor).to(pixels.dtype)

    def _timesteps(self, count: int, generator: torch.Generator | None) -> Tensor:
        """`count` training timesteps by `config.timestep_sampling`."""
        steps = self.scheduler.config.num_train_timesteps
        if self.config.timestep_sampling == "uniform":
            return torch.randint(0, steps, (count,), generator=generator)
        share = torch.sigmoid(torch.randn(count, generator=generator))
        return (share * steps).long().clamp(0, steps - 1)

    def training_draws(self, shape: torch.Size, seeds: Sequence[int] | None, generator: torch.Generator | None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """Noise, timesteps and the dropout draw of a batch: from each sample's own seed when given (a sample then
        gets the same draws however the global batch is split over ranks), else from `generator` (default: the
        global random stream)."""
        batch = shape[0]
        if seeds is None:
            return (torch.randn(shape, generator=generator), self._timesteps(batch, generator),
                    torch.rand(batch, generator=generator))
        if len(seeds) != batch:
            raise ValueError(f"diffusion loss: {len(seeds)} seeds for {batch} pictures")
        draws = []
        for seed in seeds:
            own = torch.Generator().manual_seed(int(seed))
            draws.append((torch.randn(shape[1:], generator=own), self._timesteps(1, own)[0],
                          torch.rand((), generator=own)))
        noise, timesteps, uniform = zip(*draws)
        return torch.stack(noise), torch.stack(timesteps), torch.stack(uniform)

    def loss(self, pixels: Tensor, states: Tensor, valid: Tensor, generator: torch.Generator | None = None,
             seeds: Sequence[int] | None = None, pixel_weights: Tensor | None = None) -> Tensor:
        """The denoising loss of pictures (B, 3, H, W) in [-1, 1] given their prompts' decoder states: DDPM noise
        at `config.timestep_sampling` timesteps, MSE on the scheduler's target, Min-SNR weighted, with
        `condition_dropout` of the prompts replaced by the null condition. The draws come from `seeds` (one per
        picture) or `generator`. `pixel_weights` (B, 1, h, w), at any size: each picture's squared error is their
        weighted mean (resized to what the UNet denoises by area)."""
        from diffusers.training_utils import compute_snr

        clean = self.encode_pictures(pixels)
        device = clean.device
        noise, timesteps, uniform = self.training_draws(clean.shape, seeds, generator)
        noise, timesteps = noise.to(device, clean.dtype), timesteps.to(device)
        drop = uniform.to(device) < self.config.condition_dropout
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        prediction = self.predict(noisy, timesteps, self.condition(states, valid, drop)).float()
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(clean, noise, timesteps)
        squared = (prediction - target.float()).pow(2)
        if pixel_weights is None:
            error = squared.mean(dim=(1, 2, 3))
        else:
            if pixel_weights.dim() != 4 or tuple(pixel_weights.shape[:2]) != (squared.shape[0], 1):
                raise ValueError(f"diffusion loss: pixel_weights has shape {tuple(pixel_weights.shape)}; expected "
                                 f"({squared.shape[0]}, 1, height, width), one map per picture")
            weights = F.interpolate(pixel_weights.to(device).float(), size=squared.shape[-2:], mode="area")
            error = (squared * weights).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * squared.shape[1])
        if self.config.snr_gamma:
            snr = compute_snr(self.scheduler, timesteps).float()
            clipped = snr.clamp(max=self.config.snr_gamma)
            error = error * (clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1))
        return error.mean()

    # -------------------------------------------------------------------------------------------------- EMA
    def _ema_model(self):
        from diffusers.training_utils import EMAModel
        # built on no parameters (EMAModel would clone the whole UNet), then pointed at the buffers: they are the
        # EMA, updated in place, and ride in checkpoints
        ema = EMAModel([], decay=self.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3, foreach=False)
        ema.shadow_params = self.ema_buffers()
        ema.optimization_step = int(self.ema_steps)
        return ema

    def ema_buffers(self) -> list[Tensor]:
        return [getattr(self, f"ema_{i}") for i in range(sum(1 for _ in self.unet.parameters()))]

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMAModel step of the UNet's averaged weights (after an optimizer step)."""
        if self.ema_decay <= 0:
            return
        parameters = list(self.unet.parameters())
        with _zero3_gathered(parameters):
            ema = self._ema_model()
            ema.step(parameters)
        self.ema_steps.fill_(ema.optimization_step)

    @contextlib.contextmanager
    def averaged_weights(self):
        """The UNet with the EMA weights inside the block (sampling, export); its own weights back after."""
        if self.ema_decay <= 0 or int(self.ema_steps) == 0:
            yield self.unet
            return
        parameters = list(self.unet.parameters())
        with _zero3_gathered(parameters):
            ema = self._ema_model()
            ema.store(parameters)
            ema.copy_to(parameters)
            try:
                yield self.unet
            finally:
                ema.restore(parameters)

    # ------------------------------------------------------------------------------------------------ sampling
    def guided_prediction(self, sample: Tensor, timestep: Tensor, condition: Condition, unconditional: Condition,
                          guidance: float) -> Tensor:
        """Classifier-free guidance: uncond + guidance x (cond - uncond), both in one doubled batch (the shorter
        condition padded and masked)."""
        length = max(condition.states.shape[1], unconditional.states.shape[1])
        cond, cond_mask = _pad_to(condition.states, condition.mask, length)
        uncond, uncond_mask = _pad_to(unconditional.states, unconditional.mask, length)
        pooled = None if condition.pooled is None else torch.cat([unconditional.pooled, condition.pooled])
        both = self.predict(torch.cat([sample, sample]), timestep.expand(2 * sample.shape[0]),
                            Condition(torch.cat([uncond, cond]), torch.cat([uncond_mask, cond_mask]), pooled))
        prediction_uncond, prediction_cond = both.chunk(2)
        return prediction_uncond + guidance * (prediction_cond - prediction_uncond)

    def sampler(self):
        """DPM-Solver++ (second order, as recommended with guidance) from the training scheduler's settings."""
        from diffusers import DPMSolverMultistepScheduler
        return DPMSolverMultistepScheduler.from_config(self.scheduler.config, algorithm_type="dpmsolver++",
                                                       solver_order=2)

    @torch.no_grad()
    def sample(self, condition: Condition, unconditional: Condition, seeds: Sequence[int],
               steps: int = 20, guidance: float = 3.0, progress: bool = False,
               callback: Callable[[int, int], None] | None = None, bf16: bool = False) -> Tensor:
        """Pictures (B, 3, H, W) in [-1, 1]; picture i starts from the noise of `seeds[i]` alone, so that it
        depends on its prompt and seed only, not on the rest of the batch. `callback(done, total)` after each
        step (a demo's progress bar). `bf16`: the UNet under bfloat16 autocast (the scheduler's arithmetic stays
        in float32)."""
        if steps < 1:
            raise ValueError(f"generate_images: steps={steps}; expected at least 1")
        device, dtype = condition.states.device, self.projection.weight.dtype
        channels = self.unet.config.in_channels
        size = self.sample_size
        noise = torch.stack([torch.randn(channels, size, size, generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]).to(device, dtype)
        scheduler = self.sampler()
        scheduler.set_timesteps(steps, device=device)
        sample = noise * scheduler.init_noise_sigma
        timesteps = scheduler.timesteps
        if progress:
            from tqdm.auto import tqdm
            timesteps = tqdm(timesteps, desc="sampling", leave=False)
        with self.averaged_weights(), _channels_last(self.unet):
            for done, t in enumerate(timesteps, 1):
                model_input = scheduler.scale_model_input(sample, t)
                with _autocast(sample.device, bf16):
                    prediction = self.guided_prediction(model_input, t.reshape(1).to(device), condition,
                                                        unconditional, guidance)
                sample = scheduler.step(prediction.to(sample.dtype), t, sample).prev_sample
                if callback is not None:
                    callback(done, steps)
        if self.vae is not None:
            vae_dtype = next(self.vae.parameters()).dtype
            sample = self.vae.decode(sample.to(vae_dtype) / self.vae.config.scaling_factor).sample
        return sample.float().clamp(-1, 1)

    # ---------------------------------------------------------------------------------------------------- I/O
    def save_pretrained(self, folder: str | Path) -> Path:
        """folder/unet (the EMA weights when there are any: what sampling uses), folder/scheduler, folder/vae."""
        folder = Path(folder)
        with self.averaged_weights():
            self.unet.save_pretrained(folder / UNET_FOLDER)
        self.scheduler.save_pretrained(folder / SCHEDULER_FOLDER)
        if self.vae is not None:
            self.vae.save_pretrained(folder / VAE_FOLDER)
        return folder

    def exported_state_keys(self, prefix: str) -> list[str]:
        """The state-dict keys diffusers' own files hold (the UNet, the VAE) or that an export does not keep (the
        EMA, which the exported UNet already is): left out of the model's safetensors file."""
        return [key for key in self.state_dict(prefix=prefix)
                if key[len(prefix):].split(".")[0] in ("unet", "vae") or key[len(prefix):].startswith("ema_")]


def _pad_to(states: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    extra = length - states.shape[1]
    if extra <= 0:
        return states, mask
    return F.pad(states, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def to_pil(pictures: Tensor) -> list[Any]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    from PIL import Image
    array = ((pictures.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def from_pil(pictures: Sequence[Any], size: int) -> Tensor:
    """PIL pictures -> (B, 3, size, size) in [-1, 1] (resized without a crop)."""
    import numpy as np
    from PIL import Image
    arrays = [np.asarray(p.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for p in pictures]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
