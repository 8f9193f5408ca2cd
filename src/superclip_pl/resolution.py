"""A pretrained image tower at another resolution: its position embeddings resampled, once, in the weights.

As open_clip does when it loads a checkpoint at ``--force-image-size`` (``resize_pos_embed``) and timm
(``resample_abs_pos_embed``): the class token's position is kept, the patch positions, a (g x g) grid,
are resized to the new (g' x g') grid bicubically (``align_corners=False``, anti-aliased when the grid
shrinks). The model is then an ordinary HF ``CLIPModel`` at the new ``image_size`` (no interpolation at
run time), so that what is exported loads anywhere at that size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel


def resample_position_embeddings(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, W) position embeddings -> (1 + grid*grid, W): the class position, then the patch grid
    resized bicubically (row-major, as the patches are flattened)."""
    old = round((weight.shape[0] - 1) ** 0.5)
    if old * old != weight.shape[0] - 1:
        raise ValueError(f"{weight.shape[0] - 1} patch positions are not a square grid")
    cls, patches = weight[:1], weight[1:]
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # (1, W, g, g)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = image.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(weight.dtype)
    return torch.cat([cls, patches])


def resize_image_tower(clip: CLIPModel, image_size: int) -> None:
    """Make ``clip``'s vision tower take ``image_size`` px inputs, in place: new position embeddings
    (resampled), position ids and config."""
    emb = clip.vision_model.embeddings
    if image_size % emb.patch_size:
        raise ValueError(
            f"image_size={image_size} is not a multiple of the tower's patch size {emb.patch_size}"
        )
    grid = image_size // emb.patch_size
    weight = resample_position_embeddings(emb.position_embedding.weight.detach(), grid)
    emb.position_embedding = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device)
    with torch.no_grad():
        emb.position_embedding.weight.copy_(weight)
    emb.image_size, emb.num_patches, emb.num_positions = image_size, grid * grid, grid * grid + 1
    emb.position_ids = torch.arange(emb.num_positions, device=weight.device).expand((1, -1))
    for config in (emb.config, clip.config.vision_config, clip.vision_model.config):
        config.image_size = image_size
