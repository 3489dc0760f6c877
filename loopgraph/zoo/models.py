"""Tiny denoisers with seeded random weights: a DiT and a conv UNet.

They stand in for real diffusion transformers / UNets in tests and benchmarks, so they are built
from small configs, never download anything, and are *pure tensor functions* of ``(x, t, context)``:
no ``.item()``, no Python branches on tensor values (only on shapes), no in-place writes to
parameters. That keeps them traceable as one graph by the loop compiler.

Both share the signature ``forward(x, t, context)``:
    x:       [B, C, H, W]  the (scaled) noisy sample
    t:       0-d or [B] tensor, float or int, in [0, num_train_timesteps] (a 0-d t is broadcast to B)
    context: [B, L, text_dim]  text-encoder hidden states (any L)
    returns  [B, C, H, W]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiTConfig", "TinyDiT", "UNetConfig", "TinyUNet", "build_denoiser"]

# Width of the sinusoidal timestep features fed to the timestep MLP (DiT uses 256; tiny models need less).
_FREQ_DIM = 128


# ----------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------


def _require_positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 4
    sample_size: int = 16  # H == W
    patch_size: int = 2
    hidden_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    text_dim: int = 32
    text_len: int = 8  # default L for example inputs; the model accepts any L
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _require_positive(f.name, getattr(self, f.name))
        if self.sample_size % self.patch_size != 0:
            raise ValueError(
                f"sample_size ({self.sample_size}) must be divisible by patch_size ({self.patch_size})"
            )
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    sample_size: int = 16  # H == W; must be even (one 2x downsample)
    channels: tuple[int, ...] = (32, 64)  # (full-resolution width, half-resolution width)
    text_dim: int = 32
    text_len: int = 8  # default L for example inputs; the model accepts any L
    groups: int = 8  # GroupNorm groups
    attention_heads: int = 4  # heads of the low-resolution cross-attention

    def __post_init__(self) -> None:
        # Accept a list from overrides but store a tuple so the config stays hashable.
        object.__setattr__(self, "channels", tuple(self.channels))
        for name in ("in_channels", "sample_size", "text_dim", "text_len", "groups", "attention_heads"):
            _require_positive(name, getattr(self, name))
        if len(self.channels) != 2:
            raise ValueError(f"channels must have exactly 2 entries (one per resolution), got {self.channels!r}")
        for c in self.channels:
            _require_positive("channels", c)
            if c % self.groups != 0:
                raise ValueError(f"channels {self.channels!r} must all be divisible by groups ({self.groups})")
        if self.sample_size % 2 != 0:
            raise ValueError(f"sample_size ({self.sample_size}) must be even for the 2x downsample")
        if self.channels[1] % self.attention_heads != 0:
            raise ValueError(
                f"channels[1] ({self.channels[1]}) must be divisible by attention_heads ({self.attention_heads})"
            )


# ----------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------


def _init_weights(module: nn.Module) -> None:
    """Variance-preserving normal init (std = 1/sqrt(fan_in)), zero biases.

    Deliberately *not* adaLN-zero / zero-init of output layers: with random weights that would make
    the model output identically zero (or independent of t and context), which is useless for
    testing a compiler. This init keeps activations O(1) so outputs vary with x, t and context.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        fan_in = module.weight[0].numel()
        nn.init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps.

    t: [B] float32 -> [B, dim] float32 (cos half, then sin half).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _broadcast_t(t: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """0-d / [1] / [B] timestep (float or int) -> [B] float32 on ``device``.

    Only shapes are inspected, never values, so this stays traceable.
    """
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t)
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim == 0:
        return t.expand(batch)
    if t.ndim == 1 and t.shape[0] in (1, batch):
        return t.expand(batch)
    raise ValueError(f"t must be a 0-d tensor or have shape [B]=[{batch}], got shape {tuple(t.shape)}")


def _check_context(context: torch.Tensor, batch: int, text_dim: int) -> None:
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != text_dim:
        raise ValueError(
            f"context must have shape [B={batch}, L, text_dim={text_dim}], got {tuple(context.shape)}"
        )


class TimestepEmbedder(nn.Module):
    """t: [B] -> [B, out_dim] via sinusoidal features and a 2-layer MLP."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(_FREQ_DIM, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Features in float32 (t up to 1000 times high frequencies loses precision in bf16), then cast.
        return self.mlp(timestep_embedding(t, _FREQ_DIM).to(dtype))


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, else cross-attention to it.

    x: [B, N, dim], context: [B, L, context_dim] -> [B, N, dim]
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # [B, heads, N, d_head]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if context is None else context
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(kv)), self._heads(self.to_v(kv))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d_head]
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # [B, N, dim]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: [B, N, D], shift/scale: [B, D]
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ----------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, plain cross-attention to text tokens (PixArt-style), gated MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # shift/scale/gate for the attention and the MLP branch
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # x: [B, N, D], cond: [B, D], text: [B, L, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)  # each [B, D]
        x = x + gate1[:, None, :] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm2(x), text)
        x = x + gate2[:, None, :] * self.mlp(_modulate(self.norm3(x), shift2, scale2))
        return x


class TinyDiT(nn.Module):
    """A small DiT: patchify -> (adaLN self-attn, cross-attn to text, MLP) x depth -> unpatchify.

    Text conditioning is done twice, as in PixArt/SD3-style models: the projected context tokens are
    attended to by a cross-attention in every block, and their mean (pooled text) is added to the
    timestep embedding that drives the adaLN modulation.
    """

    def __init__(self, config: DiTConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else DiTConfig()
        cfg = self.config
        d, p = cfg.hidden_dim, cfg.patch_size
        self.grid = cfg.sample_size // p
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        # Learned position embedding, ViT-style small init.
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid, d) * 0.02)
        self.t_embed = TimestepEmbedder(d)
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.pooled_proj = nn.Linear(d, d)
        self.blocks = nn.ModuleList([DiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.proj_out = nn.Linear(d, p * p * cfg.in_channels)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2:] != (cfg.sample_size, cfg.sample_size):
            raise ValueError(
                f"x must have shape [B, {cfg.in_channels}, {cfg.sample_size}, {cfg.sample_size}], "
                f"got {tuple(x.shape)}"
            )
        b, c = x.shape[0], cfg.in_channels
        p, g = cfg.patch_size, self.grid
        _check_context(context, b, cfg.text_dim)
        t = _broadcast_t(t, b, x.device)  # [B]

        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N=g*g, D]
        text = self.text_proj(context.to(h.dtype))  # [B, L, D]
        cond = self.t_embed(t, h.dtype) + self.pooled_proj(text.mean(dim=1))  # [B, D]
        for block in self.blocks:
            h = block(h, cond, text)
        shift, scale = self.ada_out(cond).chunk(2, dim=-1)  # each [B, D]
        h = self.proj_out(_modulate(self.norm_out(h), shift, scale))  # [B, N, p*p*C]
        h = h.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        return h.reshape(b, c, g * p, g * p)  # [B, C, H, W]


# ----------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + timestep embedding, GroupNorm -> SiLU -> conv, residual.

    x: [B, in_ch, H, W], temb: [B, T] -> [B, out_ch, H, W]
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, out, H, W]
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    """A two-resolution conv UNet with one text cross-attention at the low resolution.

    conv_in -> res (full) --skip--> downsample -> res (half) -> cross-attn -> upsample -> concat skip
    -> res (full) -> GroupNorm/SiLU/conv_out.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else UNetConfig()
        cfg = self.config
        c0, c1 = cfg.channels
        temb_dim = 4 * c0
        self.t_embed = TimestepEmbedder(temb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.res_down = ResBlock(c0, c0, temb_dim, cfg.groups)
        self.downsample = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.res_low = ResBlock(c0, c1, temb_dim, cfg.groups)
        self.attn_norm = nn.GroupNorm(cfg.groups, c1)
        self.cross_attn = Attention(c1, cfg.attention_heads, context_dim=cfg.text_dim)
        self.upsample = nn.Conv2d(c1, c0, 3, padding=1)
        self.res_up = ResBlock(2 * c0, c0, temb_dim, cfg.groups)
        self.norm_out = nn.GroupNorm(cfg.groups, c0)
        self.conv_out = nn.Conv2d(c0, cfg.in_channels, 3, padding=1)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"x must have shape [B, {cfg.in_channels}, H, W] with even H, W, got {tuple(x.shape)}")
        b = x.shape[0]
        _check_context(context, b, cfg.text_dim)
        t = _broadcast_t(t, b, x.device)  # [B]

        h = self.conv_in(x)  # [B, c0, H, W]
        temb = self.t_embed(t, h.dtype)  # [B, 4*c0]
        skip = self.res_down(h, temb)  # [B, c0, H, W]
        h = self.res_low(self.downsample(skip), temb)  # [B, c1, H/2, W/2]

        _, c1, hh, ww = h.shape
        tokens = self.attn_norm(h).flatten(2).transpose(1, 2)  # [B, H/2*W/2, c1]
        attn = self.cross_attn(tokens, context.to(h.dtype))  # [B, H/2*W/2, c1]
        h = h + attn.transpose(1, 2).reshape(b, c1, hh, ww)

        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # [B, c0, H, W]
        h = self.res_up(torch.cat([h, skip], dim=1), temb)  # [B, c0, H, W]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, C, H, W]


# ----------------------------------------------------------------------------------------------------
# factory
# ----------------------------------------------------------------------------------------------------

_DENOISERS: dict[str, tuple[type, type]] = {"dit": (TinyDiT, DiTConfig), "unet": (TinyUNet, UNetConfig)}


def build_denoiser(
    name: str = "dit",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **overrides: object,
) -> nn.Module:
    """Build a tiny denoiser ("dit" or "unet") with deterministic random weights.

    ``overrides`` replace fields of the model's config (e.g. ``hidden_dim=128``). Weights are drawn on
    CPU in float32 from ``torch.manual_seed(seed)`` inside ``fork_rng`` (so the caller's global RNG is
    untouched and the weights do not depend on ``device``/``dtype``), then moved/cast.
    Returns the model in eval mode with ``requires_grad_(False)``.
    """
    if name not in _DENOISERS:
        raise ValueError(f"unknown denoiser name {name!r}; known names: {sorted(_DENOISERS)}")
    model_cls, config_cls = _DENOISERS[name]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} override(s) {unknown}; known fields: {sorted(known)}")
    config = config_cls(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
