"""Variational score distillation regulariser of stage 2 (OSEDiff; paper §3.4; docs/method.md#stage-2).

One frozen SD 2.1 UNet serves both scores: the *real* score is that UNet with every LoRA
adapter switched off, the *fake* score is the same UNet with the fake-score LoRA (rank 4, three
adapters over the stage-1 module layout, **all active** — the release activates only the last
one added). Sharing the base weights saves a full UNet copy (≈3.5 GB in fp32); the base may be
held in fp16/bf16 while the fake-score LoRA stays float32.

Per generator step (``loss = vsd(z_h, c)``, gradient only into ẑ_H):

    t ~ U{20..979} per sample, ε ~ N(0, I)            both from ``generator``
    z_n     = √ᾱ_t ẑ_H + √(1−ᾱ_t) ε
    x0_fake = x0(z_n, ε_fake(z_n, t, c))               no grad, fake LoRA on, cond only
    x0_real = x0(z_n, ε_u + s(ε_c − ε_u))              no grad, LoRA off, CFG s = 7.5 with
                                                       the negative prompt as unconditional
    w       = mean |ẑ_H − x0_real| per sample
    L_VSD   = MSE(ẑ_H, (ẑ_H − (x0_fake − x0_real)/w).detach())

so ∂L_VSD/∂ẑ_H = 2·(x0_fake − x0_real)/(w·numel). After the generator step the fake score
learns the generator's distribution (:meth:`VSDLoss.step_fake_score`): ε-prediction MSE at
t ~ U{0..999} on the detached ẑ_H, its own AdamW (lr 5e-5, weight decay 1e-2, clip 1.0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from codsr.model.codsr import randn
from codsr.model.lora import UNET_GROUPS, activate_adapters, add_adapter, unet_lora_target_modules

NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, "
    "3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, "
    "signature, jpeg artifacts, deformed, lowres, over-smooth"
)
FAKE_SCORE_ADAPTERS = tuple(f"fake_score_{g}" for g in UNET_GROUPS)
VSD_TIMESTEP_RANGE = (20, 979)  # inclusive; the release's randint(20, 980)

__all__ = ["NEGATIVE_PROMPT", "FAKE_SCORE_ADAPTERS", "VSD_TIMESTEP_RANGE", "VSDLoss", "encode_prompts"]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: str | list[str]) -> torch.Tensor:
    """CLIP last hidden states of 77-token padded, truncated prompts (B×77×D)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenizer(
        prompts,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def _randint(
    low: int, high_inclusive: int, n: int, generator: torch.Generator | None, device
) -> torch.Tensor:
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(low, high_inclusive + 1, (n,), generator=generator, device=gen_device)
    return t.to(device)


class VSDLoss(nn.Module):
    """Real/fake score pair on one shared SD UNet; see the module docstring.

    Args:
        unet: a plain SD 2.1 UNet (no LoRA). It is frozen and gets the fake-score adapters.
        scheduler: its DDPM scheduler (``alphas_cumprod``; ε-prediction).
        negative_prompt_embeds: 1×77×D (or B×77×D) CLIP embeddings of :data:`NEGATIVE_PROMPT`,
            used as the unconditional branch of the real score's CFG.
        rank: fake-score LoRA rank (release 4; lora_alpha stays peft's 8 → scale 8/r).
        guidance_scale: real-score CFG scale (7.5).
        timestep_range: inclusive range of the VSD timesteps (20, 979).
        base_dtype: dtype of the shared base weights (e.g. torch.bfloat16); LoRA stays float32.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        negative_prompt_embeds: torch.Tensor,
        rank: int = 4,
        guidance_scale: float = 7.5,
        timestep_range: tuple[int, int] = VSD_TIMESTEP_RANGE,
        base_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(
                f"VSDLoss supports ε-prediction schedulers only (SD 2.1-base); got {prediction!r}"
            )
        if any("lora" in n for n, _ in unet.named_parameters()):
            raise ValueError(
                "VSDLoss needs the plain SD UNet (it already holds LoRA weights); load a fresh copy"
            )
        self.unet = unet
        self.unet.requires_grad_(False)
        if base_dtype is not None:
            self.unet.to(base_dtype)
        groups = unet_lora_target_modules(self.unet)
        for group, adapter in zip(UNET_GROUPS, FAKE_SCORE_ADAPTERS, strict=True):
            add_adapter(self.unet, rank, groups[group], adapter)
        # add_adapter leaves only the last adapter active (the release's bug): activate all.
        activate_adapters(self.unet, FAKE_SCORE_ADAPTERS)
        for name, param in self.unet.named_parameters():
            if "lora" in name:
                param.data = param.data.float()
                param.requires_grad_(True)
        self.rank = rank
        self.guidance_scale = float(guidance_scale)
        self.timestep_range = (int(timestep_range[0]), int(timestep_range[1]))
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.register_buffer(
            "alphas_cumprod", torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "negative_prompt_embeds", negative_prompt_embeds.detach().float(), persistent=False
        )

    # ------------------------------------------------------------------ parameters
    def fake_score_parameters(self) -> list[nn.Parameter]:
        """The trainable fake-score LoRA parameters (everything else is frozen)."""
        return [p for n, p in self.unet.named_parameters() if "lora" in n]

    def make_optimizer(
        self,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        eps: float = 1e-8,
    ) -> torch.optim.AdamW:
        """The fake score's own AdamW (release: lr 5e-5, betas 0.9/0.999, weight decay 1e-2)."""
        return torch.optim.AdamW(
            self.fake_score_parameters(), lr=lr, betas=betas, weight_decay=weight_decay, eps=eps
        )

    @property
    def base_dtype(self) -> torch.dtype:
        return self.unet.conv_in.base_layer.weight.dtype

    # ------------------------------------------------------------------ score evaluations
    @contextlib.contextmanager
    def real_score(self) -> Iterator[None]:
        """Context in which the UNet is the frozen SD UNet (every LoRA adapter disabled)."""
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()
            # enable_adapters re-activates peft's previous active set; make sure it is all three.
            activate_adapters(self.unet, FAKE_SCORE_ADAPTERS)

    def _eps(self, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        dtype = self.base_dtype
        out = self.unet(z.to(dtype), t, encoder_hidden_states=embeds.to(dtype), return_dict=False)[0]
        return out.float()

    def _coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    def _noisy(self, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        sqrt_a, sqrt_1m = self._coefficients(t)
        return sqrt_a * z + sqrt_1m * noise

    def _x0(self, z_n: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        sqrt_a, sqrt_1m = self._coefficients(t)
        return (z_n - sqrt_1m * eps) / sqrt_a

    def _negative(self, batch: int) -> torch.Tensor:
        neg = self.negative_prompt_embeds
        if neg.shape[0] == batch:
            return neg
        if neg.shape[0] != 1:
            raise ValueError(f"negative_prompt_embeds has batch {neg.shape[0]}; expected 1 or {batch}")
        return neg.expand(batch, *neg.shape[1:])

    @torch.no_grad()
    def score_x0(
        self, z_n: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_fake, x0_real) of noisy latents z_n at timesteps t (both float32, no grad)."""
        z_n = z_n.float()
        x0_fake = self._x0(z_n, t, self._eps(z_n, t, prompt_embeds))
        b = z_n.shape[0]
        with self.real_score():
            eps_both = self._eps(
                torch.cat([z_n, z_n]),
                torch.cat([t, t]),
                torch.cat([self._negative(b).to(prompt_embeds.device), prompt_embeds]),
            )
        eps_uncond, eps_cond = eps_both.chunk(2)
        eps_real = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
        return x0_fake, self._x0(z_n, t, eps_real)

    # ------------------------------------------------------------------ losses
    def vsd_loss(
        self, z_h: torch.Tensor, prompt_embeds: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """L_VSD of the generator's ẑ_H (B×4×h×w, with grad); see the module docstring."""
        b = z_h.shape[0]
        t = _randint(*self.timestep_range, b, generator, z_h.device)
        noise = randn(tuple(z_h.shape), generator, z_h.device)
        z = z_h.float()
        z_n = self._noisy(z.detach(), t, noise)
        x0_fake, x0_real = self.score_x0(z_n, t, prompt_embeds)
        weight = (z.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        grad = (x0_fake - x0_real) / weight
        return F.mse_loss(z, (z - grad).detach())

    def fake_score_loss(
        self, z_h: torch.Tensor, prompt_embeds: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """ε-prediction MSE of the fake score on detached ẑ_H at t ~ U{0..999} (grad into its LoRA only)."""
        z = z_h.detach().float()
        b = z.shape[0]
        t = _randint(0, self.num_train_timesteps - 1, b, generator, z.device)
        noise = randn(tuple(z.shape), generator, z.device)
        eps = self._eps(self._noisy(z, t, noise), t, prompt_embeds.detach())
        return F.mse_loss(eps, noise)

    def forward(
        self,
        z_h: torch.Tensor,
        prompt_embeds: torch.Tensor,
        generator: torch.Generator | None = None,
        mode: str = "vsd",
    ) -> torch.Tensor:
        """``mode="vsd"``: :meth:`vsd_loss`; ``mode="fake"``: :meth:`fake_score_loss`."""
        if mode == "vsd":
            return self.vsd_loss(z_h, prompt_embeds, generator)
        if mode == "fake":
            return self.fake_score_loss(z_h, prompt_embeds, generator)
        raise ValueError(f'mode must be "vsd" or "fake", got {mode!r}')

    def step_fake_score(
        self,
        z_h: torch.Tensor,
        prompt_embeds: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator | None = None,
        max_grad_norm: float | None = 1.0,
        accelerator=None,
    ) -> float:
        """One fake-score update (after the generator step); returns the loss value.

        With an ``accelerate.Accelerator`` of several processes the LoRA gradients are averaged
        across processes before clipping, so every process keeps the same fake score (this
        module needs no DDP wrapping). The backward is plain: ``accelerator.backward`` would
        scale the loss with the *generator's* fp16 GradScaler, which this optimizer never
        unscales. The LoRA is float32, so no loss scaling is needed.
        """
        params = self.fake_score_parameters()
        optimizer.zero_grad(set_to_none=True)
        loss = self.fake_score_loss(z_h, prompt_embeds, generator)
        loss.backward()
        if accelerator is not None:
            if accelerator.num_processes > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
