"""The CODSR model: SD 2.1-base VAE + UNet with LoRA, RGPA and LQFM, and its one forward (paper §3).

One forward, shared by training and inference (docs/method.md#generator-forward)::

    z_L = sf·VAE_enc[LoRA](x_L).sample()          posterior noise ε_vae: 1st draw
    ε_a = W(x_L)·ε                                RGPA (paper Eq. 3), ε: 2nd draw
    z_t = √ᾱ_t z_L + √(1-ᾱ_t) ε_a                 (paper Eq. 1)
    h0  = conv_in(z_t)(1 + γ/w_t) + β/w_t         LQFM (paper Eq. 4), (γ, β) = SFT(unshuffle(x_L))
    ẑ_H = z_L + w_t (ε_a − ε_θ(z_t, c, t))         (paper Eq. 2), w_t = √(1-ᾱ_t)/√ᾱ_t
    x_H = VAE_dec(ẑ_H / sf)                        (optional)

:meth:`CODSRModel.forward` runs these lines in this order. Its three heavy stages (VAE encode,
noise prediction, VAE decode) can be swapped through :class:`ForwardStages`: the inference
pipeline passes tiled versions (``codsr.pipeline``); this module knows nothing of tiling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from codsr.model.checkpoint import CheckpointError, CODSRCheckpoint
from codsr.model.lora import (
    RELEASE_LORA_ALPHA,
    UNET_GROUPS,
    VAE_ADAPTER,
    activate_adapters,
    add_adapter,
    lora_state_dict,
    merge_lora_weights,
    unet_adapter_name,
    unet_lora_target_modules,
    vae_lora_target_modules,
)
from codsr.model.lqfm import SFTModulator, conv_in_modulation
from codsr.model.rgpa import DEFAULT_RGPA, RGPAParams, rgpa_weight_map

# diffusers clamps the posterior log-variance to this range (DiagonalGaussianDistribution).
_LOGVAR_RANGE = (-30.0, 20.0)


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device in float32, then moved.

    Drawing on the generator's own device in float32 makes a seeded CPU generator give the same
    noise whatever device and precision the model runs in (the reproducibility contract,
    docs/method.md#generator-forward).
    """
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device, dtype)


NoisePredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ForwardStages:
    """Replacements for the heavy stages of :meth:`CODSRModel.forward`; ``None`` = the model's own
    untiled method. They must compute the same function (e.g. tiled), only differently.

    * ``encode_moments(x_L)`` → B×8×h×w posterior mean and log-variance (``quant_conv`` output);
    * ``predict_noise(z_t, timesteps, prompt_embeds, scale, shift)`` → ε_θ, B×4×h×w, where
      ``scale``/``shift`` are the LQFM maps already divided by w_t;
    * ``decode(ẑ_H)`` → B×3×H×W image clamped to [-1, 1].
    """

    encode_moments: Callable[[torch.Tensor], torch.Tensor] | None = None
    predict_noise: NoisePredictor | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class CODSRModelOutput:
    """Tensors of one forward (B×4×h×w latents, float32; ``weight`` B×1×h×w; ``w_t`` B×1×1×1)."""

    z_h: torch.Tensor
    z_l: torch.Tensor
    z_t: torch.Tensor
    eps_a: torch.Tensor
    eps_pred: torch.Tensor
    weight: torch.Tensor
    w_t: torch.Tensor
    x_h: torch.Tensor | None = None  # the decoded image in [-1, 1], when forward(decode=True)


class CODSRModel(nn.Module):
    """VAE (encoder LoRA) + UNet (LoRA, LQFM) + SFT + RGPA around stock diffusers modules."""

    def __init__(
        self,
        vae: nn.Module,
        unet: nn.Module,
        scheduler,
        sft: SFTModulator | None = None,
        rgpa: RGPAParams = DEFAULT_RGPA,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.sft = sft if sft is not None else SFTModulator(channels=unet.config.block_out_channels[0])
        self.scheduler = scheduler
        self.rgpa = rgpa
        # A plain tensor, not a buffer: ``.to(dtype=bf16)`` on the module must not round ᾱ_t.
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32)
        self.lora_ranks: dict[str, int] = {}
        self.lora_modules: dict[str, list[str]] = {}
        # The checkpoint tensors of LoRA merged into the weights (plain dict, not module state):
        # what export_checkpoint writes for the merged parts, so load → merge → export round-trips.
        self.merged_lora: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------ the forward
    def forward(
        self,
        x_l: torch.Tensor,
        prompt_embeds: torch.Tensor,
        timesteps: torch.Tensor | int,
        generator: torch.Generator | None = None,
        posterior_noise: torch.Tensor | None = None,
        rgpa_noise: torch.Tensor | None = None,
        *,
        stages: ForwardStages | None = None,
        decode: bool = False,
        control_map: torch.Tensor | None = None,
        noise_scale: float = 1.0,
        fidelity_timestep: int | None = None,
    ) -> CODSRModelOutput:
        """One-step restoration of ``x_l`` (B×3×H×W in [-1, 1]) to ẑ_H, and x_H when ``decode``.

        ``timesteps`` is an int or a (B,) tensor (per-sample t in training). Noise is drawn from
        ``generator`` in the contract's order (posterior first, RGPA second) unless given
        explicitly. ``stages`` swaps the encode / noise-prediction / decode implementations
        (tiling); the equations and their order stay these.

        Region control (docs/region-control.md): ``control_map`` (B×1×h×w on the latent grid, values
        in [0, 1]) and the scalar ``noise_scale`` multiply the RGPA weight map, so Eq. 3 becomes
        ε_a = (m · noise_scale · W(g_{x_L})) ε. With ``fidelity_timestep`` t_f (and a map that is not
        all ones) a second noise prediction at t_f gives ẑ_H(t_f) by Eq. 1–2 from the same z_L and
        ε_a, and the result is the per-cell blend ẑ_H = lerp(ẑ_H(t_f), ẑ_H(t), m).
        """
        stages = stages or ForwardStages()
        b = x_l.shape[0]
        if not torch.is_tensor(timesteps):
            timesteps = torch.full((b,), int(timesteps), dtype=torch.long, device=x_l.device)
        timesteps = timesteps.to(x_l.device).long().expand(b) if timesteps.ndim == 0 else timesteps.to(x_l.device)

        # z_L: a sample of the LoRA'd VAE encoder's posterior (1st noise draw).
        moments = (stages.encode_moments or self.encode_moments)(x_l)
        shape = (b, moments.shape[1] // 2, *moments.shape[-2:])
        if posterior_noise is None:
            posterior_noise = randn(shape, generator, x_l.device)
        if rgpa_noise is None:
            rgpa_noise = randn(shape, generator, x_l.device)
        z_l = self.latent_from_moments(moments, posterior_noise)
        del moments
        # RGPA: ε_a = W(x_L)·ε (Eq. 3) and z_t = √ᾱ_t z_L + √(1-ᾱ_t) ε_a (Eq. 1).
        z_t, eps_a, weight = self.noisy_latent(x_l, z_l, timesteps, rgpa_noise, control_map, noise_scale)
        _, _, w_t = self.time_coefficients(timesteps)
        # LQFM: SFT maps of x_L scaled by λ_t = 1/w_t modulate conv_in (Eq. 4).
        scale, shift = self.modulation(x_l, w_t)
        # ε_θ(z_t, c, t) with the modulated conv_in.
        eps_pred = (stages.predict_noise or self.predict_noise)(z_t, timesteps, prompt_embeds, scale, shift)
        del scale, shift  # the largest latent-resolution tensors: freed before the decode
        # One-step x0 estimate ẑ_H = z_L + w_t (ε_a − ε_θ) (Eq. 2).
        z_h = self.denoise(z_l, eps_a, eps_pred, w_t)
        if fidelity_timestep is not None and control_map is not None and not bool((control_map == 1).all()):
            z_h = self._blend_fidelity(x_l, z_l, eps_a, z_h, fidelity_timestep, prompt_embeds, control_map, stages)
        x_h = (stages.decode or self.decode)(z_h) if decode else None
        return CODSRModelOutput(
            z_h=z_h, z_l=z_l, z_t=z_t, eps_a=eps_a, eps_pred=eps_pred, weight=weight, w_t=w_t, x_h=x_h
        )

    # ------------------------------------------------------------------ the forward's pieces
    def time_coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1-ᾱ_t), w_t), each B×1×1×1 float32, for integer timesteps of shape (B,)."""
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()].view(-1, 1, 1, 1)
        sqrt_a = abar**0.5
        sqrt_1m = (1 - abar) ** 0.5
        return sqrt_a, sqrt_1m, sqrt_1m / sqrt_a

    def encode_moments(self, x_l: torch.Tensor) -> torch.Tensor:
        """``quant_conv(Encoder(x_L))``: B×8×h×w posterior mean and log-variance (untiled)."""
        return self.vae.quant_conv(self.vae.encoder(x_l.to(self.vae.dtype)))

    def latent_from_moments(self, moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Scaled posterior sample z_L = sf·(μ + σ·noise) in float32."""
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(*_LOGVAR_RANGE))
        return (mean + std * noise.float()) * self.scaling_factor

    def noisy_latent(
        self,
        x_l: torch.Tensor,
        z_l: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        control_map: torch.Tensor | None = None,
        noise_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RGPA (paper Eq. 1, 3): returns (z_t, ε_a, W) in float32.

        W is the weight map of Eq. 3 times ``noise_scale`` and times ``control_map`` (B×1×h×w or
        1×1×h×w in [0, 1]) when given (region control, docs/region-control.md); a factor of exactly
        1 leaves W bit for bit unchanged.
        """
        weight = rgpa_weight_map(x_l, self.rgpa, latent_size=tuple(z_l.shape[-2:]))
        if noise_scale != 1.0:
            weight = weight * float(noise_scale)
        if control_map is not None:
            if control_map.ndim != 4 or control_map.shape[1] != 1 or tuple(control_map.shape[-2:]) != tuple(
                weight.shape[-2:]
            ):
                raise ValueError(
                    f"control_map must be B×1×{weight.shape[-2]}×{weight.shape[-1]} (the latent grid), got "
                    f"{tuple(control_map.shape)}; codsr.pipeline.control_map.control_map_to_latent resizes a map"
                )
            weight = weight * control_map.to(weight.device, torch.float32)
        eps_a = noise.float() * weight
        sqrt_a, sqrt_1m, _ = self.time_coefficients(timesteps)
        return sqrt_a * z_l + sqrt_1m * eps_a, eps_a, weight

    def _blend_fidelity(
        self,
        x_l: torch.Tensor,
        z_l: torch.Tensor,
        eps_a: torch.Tensor,
        z_h: torch.Tensor,
        fidelity_timestep: int,
        prompt_embeds: torch.Tensor,
        control_map: torch.Tensor,
        stages: ForwardStages,
    ) -> torch.Tensor:
        """lerp(ẑ_H(t_f), ẑ_H(t), m): Eq. 1, 4 and 2 again at t_f with the same z_L and ε_a, then a
        per-cell blend (exactly ẑ_H(t_f) where m = 0 and ẑ_H(t) where m = 1; docs/region-control.md)."""
        t_f = torch.full((z_l.shape[0],), int(fidelity_timestep), dtype=torch.long, device=z_l.device)
        sqrt_a, sqrt_1m, w_f = self.time_coefficients(t_f)
        z_t = sqrt_a * z_l + sqrt_1m * eps_a
        scale, shift = self.modulation(x_l, w_f)
        eps_pred = (stages.predict_noise or self.predict_noise)(z_t, t_f, prompt_embeds, scale, shift)
        del scale, shift
        z_f = self.denoise(z_l, eps_a, eps_pred, w_f)
        return torch.lerp(z_f, z_h, control_map.to(z_h.device, torch.float32).expand_as(z_h))

    def modulation(self, x_l: torch.Tensor, w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LQFM maps already divided by w_t (λ_t = 1/w_t, paper Eq. 4)."""
        scale, shift = self.sft(x_l.to(self.sft.SFT_scale_conv0.weight.dtype))
        w = w_t.to(scale.dtype)
        return scale / w, shift / w

    def predict_noise(
        self,
        z_t: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
    ) -> torch.Tensor:
        """ε_θ(z_t, c, t) from the stock UNet with the LQFM hook on ``conv_in`` (untiled)."""
        dtype = self.dtype
        with conv_in_modulation(self.unet, scale, shift):
            return self.unet(
                z_t.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype), return_dict=False
            )[0]

    @staticmethod
    def denoise(z_l: torch.Tensor, eps_a: torch.Tensor, eps_pred: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        """One-step x0 estimate ẑ_H = z_L + w_t(ε_a − ε_θ) (paper Eq. 2), in float32."""
        return z_l + w_t * (eps_a - eps_pred.float())

    def decode(self, z_h: torch.Tensor) -> torch.Tensor:
        """VAE decode of ẑ_H, clamped to [-1, 1] (the decoder has no LoRA; untiled)."""
        x = self.vae.decode((z_h / self.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        return x.clamp(-1, 1)

    # ------------------------------------------------------------------ LoRA set-up
    def add_stage1_lora(self, rank_vae: int = 4, rank_unet: int = 16) -> None:
        """Inject the trainable stage-1 adapters (docs/method.md#lora-layout) with peft, all active."""
        vae_modules = vae_lora_target_modules(self.vae)
        self.merged_lora = {}  # fresh adapters: nothing merged is theirs
        add_adapter(self.vae, rank_vae, vae_modules, VAE_ADAPTER)
        groups = unet_lora_target_modules(self.unet)
        for group in UNET_GROUPS:
            add_adapter(self.unet, rank_unet, groups[group], unet_adapter_name(group))
        activate_adapters(self.unet, [unet_adapter_name(g) for g in UNET_GROUPS])
        self.lora_ranks = {"vae": rank_vae, "unet": rank_unet}
        self.lora_modules = {"vae": vae_modules, **groups}

    def add_alignment_lora(self) -> None:
        """Add the stage-2 ``*_alignment`` adapters (same rank and modules as stage 1) and activate all six."""
        if "unet" not in self.lora_ranks:
            raise RuntimeError("add_alignment_lora needs the stage-1 adapters first (load a stage-1 checkpoint)")
        for group in UNET_GROUPS:
            add_adapter(self.unet, self.lora_ranks["unet"], self.lora_modules[group], unet_adapter_name(group, True))
        activate_adapters(
            self.unet, [unet_adapter_name(g, a) for a in (False, True) for g in UNET_GROUPS]
        )

    def load_checkpoint(
        self,
        ckpt: CODSRCheckpoint,
        *,
        merge_unet: bool = True,
        merge_vae: bool = False,
        alignment_scale: float = 1.0,
    ) -> None:
        """Apply a checkpoint: SFT weights, VAE-encoder LoRA, UNet LoRA (stage 1 then alignment).

        Merged: ``W += (8/r)·ΔW`` for the stage-1 adapters, then ``W += λ_sem·(8/r)·ΔW`` for the
        alignment adapters, in float32 (as the release merges). Unmerged: peft adapters holding
        the checkpoint's tensors, for training or inspection. The VAE LoRA stays unmerged by
        default because that is what the release computes (merging moves z_L by ~1e-4). The merged
        parts' checkpoint tensors are kept (:attr:`merged_lora`) for :meth:`export_checkpoint`.
        """
        ckpt.validate()
        missing, unexpected = self.sft.load_state_dict(ckpt.sft, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"SFT state dict mismatch: missing {missing}, unexpected {unexpected}")
        scale_vae = RELEASE_LORA_ALPHA / ckpt.rank_vae
        scale_unet = RELEASE_LORA_ALPHA / ckpt.rank_unet
        _check_lora_shapes(self.vae, ckpt.vae_lora, "VAE")
        _check_lora_shapes(self.unet, ckpt.unet_lora, "UNet")
        self.merged_lora = {}
        if merge_vae:
            merge_lora_weights(self.vae, ckpt.vae_lora, ckpt.vae_lora_modules, VAE_ADAPTER, scale_vae)
            self.merged_lora["vae"] = dict(ckpt.vae_lora)
        else:
            add_adapter(self.vae, ckpt.rank_vae, ckpt.vae_lora_modules, VAE_ADAPTER)
            _load_lora_tensors(self.vae, ckpt.vae_lora, "VAE")
        if merge_unet:
            self.merged_lora["unet"] = dict(ckpt.unet_lora)
            self.merged_lora["unet_extra"] = dict(ckpt.unet_extra)
            for alignment, factor in ((False, 1.0), (True, alignment_scale)):
                if alignment and not ckpt.has_alignment:
                    continue
                for group in UNET_GROUPS:
                    merge_lora_weights(
                        self.unet,
                        ckpt.unet_lora,
                        ckpt.unet_lora_modules[group],
                        unet_adapter_name(group, alignment),
                        scale_unet * factor,
                    )
        else:
            for group in UNET_GROUPS:
                add_adapter(self.unet, ckpt.rank_unet, ckpt.unet_lora_modules[group], unet_adapter_name(group))
            if ckpt.has_alignment:
                for group in UNET_GROUPS:
                    add_adapter(
                        self.unet, ckpt.rank_unet, ckpt.unet_lora_modules[group], unet_adapter_name(group, True)
                    )
            activate_adapters(self.unet, ckpt.unet_adapters)
            _load_lora_tensors(self.unet, ckpt.unet_lora, "UNet")
            if ckpt.has_alignment and alignment_scale != 1.0:
                _scale_adapters(self.unet, [unet_adapter_name(g, True) for g in UNET_GROUPS], alignment_scale)
        self.lora_ranks = {"vae": ckpt.rank_vae, "unet": ckpt.rank_unet}
        self.lora_modules = {"vae": list(ckpt.vae_lora_modules), **{g: list(ckpt.unet_lora_modules[g])
                                                                     for g in UNET_GROUPS}}  # fmt: skip

    def export_checkpoint(self, metadata: dict | None = None) -> CODSRCheckpoint:
        """Collect the LoRA (peft adapters, or the tensors of a merged load) and the SFT into a checkpoint.

        After a merged :meth:`load_checkpoint` the merged parts are exported as the checkpoint's own
        tensors (whatever ``alignment_scale`` was: λ_sem is a load-time knob, not stored), so loading
        the export gives the same model as loading the original.
        """
        if not self.lora_ranks:
            raise RuntimeError("the generator holds no LoRA adapters to export (none loaded or added)")
        unet_sd = self.unet.state_dict()
        extra = {k: v.detach().clone() for k, v in unet_sd.items()
                 if k.startswith(("conv_in.base_layer.", "conv_out.base_layer."))}  # fmt: skip
        if "unet" in self.merged_lora:
            extra = {k: v.detach().clone() for k, v in self.merged_lora["unet_extra"].items()}
        merged = {k: {n: t.detach().clone() for n, t in sd.items()} for k, sd in self.merged_lora.items()}
        return CODSRCheckpoint(
            rank_vae=self.lora_ranks["vae"],
            rank_unet=self.lora_ranks["unet"],
            vae_lora_modules=list(self.lora_modules["vae"]),
            unet_lora_modules={g: list(self.lora_modules[g]) for g in UNET_GROUPS},
            vae_lora={**merged.get("vae", {}), **lora_state_dict(self.vae)},
            unet_lora={**merged.get("unet", {}), **lora_state_dict(self.unet)},
            sft={k: v.detach().clone() for k, v in self.sft.state_dict().items()},
            unet_extra=extra,
            metadata=dict(metadata or {}),
        )


def _check_lora_shapes(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """ΔW of every A/B pair must have the target weight's shape; name the key otherwise."""
    modules = dict(model.named_modules())
    for key, a in sd.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        layer = modules.get(name)
        if layer is None:
            raise CheckpointError(f"{what} LoRA tensor {key!r} targets module {name!r}, which the model lacks")
        base = getattr(layer, "base_layer", layer)
        if b_key not in sd:
            raise CheckpointError(f"{what} LoRA tensor {b_key!r} is missing from the checkpoint")
        b = sd[b_key]
        expected = tuple(base.weight.shape)
        got = (b.shape[0], a.shape[1], *a.shape[2:])
        if b.shape[1] != a.shape[0] or got != expected:
            raise CheckpointError(
                f"{what} LoRA tensors {key!r}/{b_key!r} give a {got} update but {name!r}.weight is {expected}"
            )


def _load_lora_tensors(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    own = {k for k in model.state_dict() if "lora" in k}
    missing = sorted(own - set(sd))
    unexpected = sorted(set(sd) - own)
    if missing:
        raise CheckpointError(f"{what} LoRA tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"checkpoint {what} LoRA tensor {unexpected[0]!r} has no matching module in the model")
    model.load_state_dict(sd, strict=False)


def _scale_adapters(model: nn.Module, adapters: list[str], factor: float) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for a in adapters:
                if a in module.scaling:
                    module.scaling[a] *= factor


__all__ = ["CODSRModel", "CODSRModelOutput", "ForwardStages", "randn"]
