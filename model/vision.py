"""Image input of Mini-Omni2: CLIP preprocessing and the CLIP ViT image tower.

Mini-Omni2 embeds a picture with the released OpenAI CLIP ViT-B/32 (`ViT-B-32.pt`, a
TorchScript archive with fp16 weights) but does not use CLIP's pooled embedding: its
feature is the final layer norm applied to *all* 50 tokens (CLS + 7 x 7 patches) times the
visual projection, `[50, 512]`, which its vision adapter maps into the language model.

The tower is written here in plain PyTorch (so it runs in fp32 and needs no TorchScript at
inference); its parameter names are CLIP's, so the archive's `visual.*` state dict loads
into it verbatim. Preprocessing reproduces CLIP's torchvision pipeline with PIL alone.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import CheckpointError, check_state_dict


@dataclass(frozen=True)
class ImageFrontend:
    """CLIP's image preprocessing constants (those of `clip.load`'s transform)."""

    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


IMAGE_FRONTEND = ImageFrontend()

# CLIP gives every ViT 64-wide attention heads; the archive stores no head count.
CLIP_HEAD_WIDTH = 64
# CLIP's LayerNorm is torch's default.
_LN_EPS = 1e-5


# ---- preprocessing --------------------------------------------------------------------
def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (any format PIL reads); undecodable input is a ValueError."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # Image.open is lazy: force the decode so truncated data fails here
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return img


def preprocess_image(img: Image.Image | bytes, size: int = IMAGE_FRONTEND.size,
                     frontend: ImageFrontend = IMAGE_FRONTEND) -> torch.Tensor:
    """CLIP preprocessing: `[3, size, size]` float32.

    Same steps and order as CLIP's transform: bicubic resize of the shorter side to `size`
    (long side truncated as torchvision computes it), centre crop, RGB conversion, scale
    to [0, 1], per-channel mean/std normalisation.
    """
    if isinstance(img, (bytes, bytearray, memoryview)):
        img = decode_image(bytes(img))
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected PIL.Image.Image or bytes, got {type(img).__name__}")
    width, height = img.size
    if width < 1 or height < 1:
        raise ValueError(f"cannot preprocess an empty image of size {width}x{height}")
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != (width, height):
        img = img.resize(new_size, Image.BICUBIC)
    width, height = img.size
    # torchvision's centre crop rounds half to even (Python's round), so do the same.
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    pixels = pixels.to(torch.float32).div(255)
    mean = torch.tensor(frontend.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(frontend.std, dtype=torch.float32)[:, None, None]
    return (pixels - mean) / std


# ---- the tower --------------------------------------------------------------------------
class CLIPAttention(nn.Module):
    """Multi-head self-attention with CLIP's (nn.MultiheadAttention's) parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
        # Image tokens attend to each other freely: no mask in CLIP's vision tower.
        y = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.out_proj(y.transpose(1, 2).reshape(batch, tokens, width))


class CLIPMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        # QuickGELU: the activation CLIP was trained with (not exact GELU).
        return self.c_proj(h * torch.sigmoid(1.702 * h))


class CLIPBlock(nn.Module):
    """Pre-norm residual block: `x + attn(ln_1 x)`, then `x + mlp(ln_2 x)`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = CLIPAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width, eps=_LN_EPS)
        self.mlp = CLIPMLP(width)
        self.ln_2 = nn.LayerNorm(width, eps=_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(CLIPBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisualTower(nn.Module):
    """CLIP's VisionTransformer, returning every token: `[B, 3, S, S] -> [B, 1 + grid^2, output_dim]`."""

    def __init__(self, width: int, patch_size: int, grid: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.patch_size, self.grid = patch_size, grid
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=_LN_EPS)
        self.transformer = CLIPTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width, eps=_LN_EPS)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv1(image).flatten(2).transpose(1, 2)  # [B, grid^2, width], row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        # Mini-Omni2 keeps all tokens (CLIP's encode_image would keep only x[:, 0]).
        return self.ln_post(x) @ self.proj


class VisionEncoder(nn.Module):
    """Mini-Omni2's image feature extractor: `image [B, 3, S, S] -> [B, tokens, out_dim]`."""

    def __init__(self, width: int = 768, patch_size: int = 32, grid: int = 7, layers: int = 12,
                 heads: int | None = None, output_dim: int = 512):
        super().__init__()
        heads = heads if heads is not None else width // CLIP_HEAD_WIDTH
        if heads < 1 or width % heads:
            raise ValueError(f"width {width} cannot be split into {heads} attention heads")
        self.dims = dict(width=width, patch_size=patch_size, grid=grid, layers=layers, heads=heads,
                         output_dim=output_dim)
        # Named `visual` so state-dict keys are the archive's `visual.*` keys verbatim.
        self.visual = VisualTower(width, patch_size, grid, layers, heads, output_dim)

    @property
    def out_dim(self) -> int:
        return self.dims["output_dim"]

    @property
    def image_size(self) -> int:
        return self.dims["grid"] * self.dims["patch_size"]

    @property
    def n_tokens(self) -> int:
        return self.dims["grid"] ** 2 + 1

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, s, s):
            raise ValueError(f"expected image of shape [B, 3, {s}, {s}], got {list(image.shape)}")
        return self.visual(image)

    @torch.no_grad()
    def encode(self, img: Image.Image | bytes) -> torch.Tensor:
        """Features Mini-Omni2 feeds its vision adapter: `[n_tokens, out_dim]`."""
        return self.encode_batch([img])[0]

    @torch.no_grad()
    def encode_batch(self, images: list) -> list[torch.Tensor]:
        """`encode` of several images in one forward call (every image is resized to the same
        grid and the tower mixes no batch entries: each result is the image's own encoding)."""
        param = next(self.parameters())
        pixels = torch.stack([preprocess_image(img, size=self.image_size) for img in images])
        out = self.forward(pixels.to(param.device, param.dtype))
        return list(out)

    # ---- checkpoint I/O ---------------------------------------------------------------
    @classmethod
    def dims_from_state_dict(cls, state: dict[str, torch.Tensor], path: object = "<state dict>") -> dict:
        """CLIP's own rules for a ViT's dims, from shapes (the archive stores no config)."""
        for key in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj"):
            if key not in state:
                raise CheckpointError(f"{path}: CLIP archive is missing key {key} (not a CLIP ViT?)")
        conv = state["visual.conv1.weight"]
        if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
            raise CheckpointError(f"{path}: visual.conv1.weight has shape {list(conv.shape)}, "
                                  "expected [width, 3, patch, patch]")
        rows = state["visual.positional_embedding"].shape[0]
        grid = round((rows - 1) ** 0.5)
        if grid * grid + 1 != rows:
            raise CheckpointError(f"{path}: visual.positional_embedding has {rows} rows, expected 1 + grid^2")
        if state["visual.proj"].ndim != 2:
            raise CheckpointError(f"{path}: visual.proj has shape {list(state['visual.proj'].shape)}, expected 2-D")
        width = conv.shape[0]
        if width % CLIP_HEAD_WIDTH:
            raise CheckpointError(f"{path}: width {width} is not a multiple of CLIP's head width {CLIP_HEAD_WIDTH}")
        block = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")
        layers = len({m.group(1) for k in state if (m := block.match(k))})
        return dict(width=width, patch_size=conv.shape[-1], grid=grid, layers=layers,
                    heads=width // CLIP_HEAD_WIDTH, output_dim=state["visual.proj"].shape[1])

    @classmethod
    def from_clip_torchscript(cls, path: str | Path) -> "VisionEncoder":
        """Load the image tower of an OpenAI CLIP TorchScript archive strictly, in fp32.

        Text-tower keys are ignored; every `visual.*` key must be present with the shape the
        archive's own dims imply, and no other `visual.*` key may exist.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: CLIP archive not found")
        try:
            with warnings.catch_warnings():
                # The release is TorchScript; torch's deprecation notice is noise to a user.
                warnings.simplefilter("ignore", DeprecationWarning)
                archive = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # RuntimeError, zip and pickle errors for damaged or foreign files
            raise CheckpointError(
                f"{path}: not a readable TorchScript archive ({type(exc).__name__}: {str(exc).strip()[:300]})"
            ) from exc
        visual = {k: v for k, v in archive.state_dict().items() if k.startswith("visual.")}
        if not visual:
            raise CheckpointError(f"{path}: TorchScript archive has no visual.* keys (not a CLIP model)")
        model = cls(**cls.dims_from_state_dict(visual, path))
        check_state_dict(path, visual, model.state_dict(), what="CLIP image tower")
        with torch.no_grad():
            model.load_state_dict(visual, strict=True)  # copies the fp16 release into fp32
        return model.eval()


# ---- tiny synthetic archive ---------------------------------------------------------------
class _TextTower(nn.Module):
    """Holds CLIP's text-tower parameters under their released names (weights only)."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, width))
        self.transformer = CLIPTransformer(width, layers, heads=1)
        self.ln_final = nn.LayerNorm(width, eps=_LN_EPS)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))


class _TinyCLIP(nn.Module):
    def __init__(self, visual: VisualTower, text: _TextTower, resolution: int):
        super().__init__()
        self.visual = visual
        # Text parameters at top level, as in CLIP's state dict.
        for name, child in text.named_children():
            setattr(self, name, child)
        for name, param in text.named_parameters(recurse=False):
            setattr(self, name, param)
        # The released archive also carries these three as integer tensors.
        self.register_buffer("input_resolution", torch.tensor(resolution))
        self.register_buffer("context_length", torch.tensor(text.positional_embedding.shape[0]))
        self.register_buffer("vocab_size", torch.tensor(text.token_embedding.num_embeddings))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def write_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Write a deterministic random CLIP TorchScript archive in the released layout.

    Image tower: width 64 (one 64-wide head, CLIP's rule), patch 32, 224 px (7 x 7 + 1 = 50
    tokens), 1 layer, output dim 16; a 1-layer width-64 text tower with the released key
    names; fp16 floating tensors like the release. About 0.5 MB.
    """
    path = Path(path)
    width, patch, grid, out = 64, 32, 7, 16
    visual = VisualTower(width, patch, grid, layers=1, heads=width // CLIP_HEAD_WIDTH, output_dim=out)
    # Text width 64 so CLIP's own build_model (heads = width // 64) accepts the archive; the
    # vocabulary is cut from 49408 to 512 rows to keep the file small (nothing here reads it).
    text = _TextTower(vocab=512, context=77, width=64, layers=1, embed_dim=out)
    model = _TinyCLIP(visual, text, resolution=grid * patch)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith(".weight"):  # every 1-D weight is a LayerNorm gain
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.ndim <= 1:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:
                fan_in = int(np.prod(param.shape[1:])) if name != "visual.proj" else param.shape[0]
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
    model = model.half().eval()
    example = torch.zeros(1, 3, grid * patch, grid * patch, dtype=torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path))
    return path
