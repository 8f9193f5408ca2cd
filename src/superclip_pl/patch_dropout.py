"""FLIP's patch dropout (Li et al., CVPR 2023, "Scaling Language-Image Pre-training via Masking") on the
HF vision tower: in training, each image is encoded from its class token and a random subset of its
patch tokens, so the encoder's cost falls with the share of patches dropped.

The semantics are open_clip's ``PatchDropout`` (``src/open_clip/transformer.py``), which the reference
SuperCLIP composes with its head: after the patch and position embeddings, before the pre-LayerNorm,
keep the class token and ``max(1, int(P * (1 - p)))`` of the P patch tokens, drawn per sample as the
top-k of ``randn(B, P)``; nothing changes in evaluation mode. The head then averages the tokens the
tower returns, the kept ones.

It runs as a forward hook on ``vision_model.embeddings`` (``attach``), not as a forward of ours over the
tower's modules: HF's vision forward (its output capture, position interpolation, attention backends)
stays HF's own, so ``from_pretrained`` weights, gradient checkpointing (per encoder layer, after the
hook), per-layer ``torch.compile``, FSDP2 (the embeddings are in the root's parameter group), DDP and
bf16 autocast see an ordinary, shorter sequence. The hook holds no parameters: checkpoints do not
change, and a run can resume with another ``p`` (FLIP's unmasked tuning).
"""

from __future__ import annotations

import torch
from torch import nn


def kept_count(num_patches: int, prob: float) -> int:
    """Patch tokens kept of ``num_patches`` at drop probability ``prob`` (open_clip's rounding down)."""
    return max(1, int(num_patches * (1 - prob)))


def draw_kept(batch: int, num_patches: int, keep: int, device: torch.device) -> torch.Tensor:
    """Indices (B, keep) of the kept patches, drawn independently per sample from the torch RNG of
    ``device`` (open_clip draws the same ``randn(B, P).topk`` on the CPU)."""
    return torch.randn(batch, num_patches, device=device).topk(keep, dim=-1).indices


def keep_patches(tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The class token and the ``kept`` patch tokens: (B, 1 + P, W), (B, n) -> (B, 1 + n, W)."""
    patches = tokens[:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :1], patches], dim=1)


class PatchDropout(nn.Module):
    """Drop a fraction ``prob`` of each image's patch tokens in training mode (0: off).

    Args:
        prob: the fraction dropped, ``0 <= prob < 1``.
    """

    def __init__(self, prob: float = 0.0):
        super().__init__()
        if not 0 <= prob < 1:
            raise ValueError(
                f"patch_dropout={prob} must be in [0, 1): the fraction of patches dropped in training "
                "(FLIP: 0.5 or 0.75; 0: off)"
            )
        self.prob = prob

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, 1 + P, W) -> (B, 1 + n, W)
        if not self.training or self.prob == 0:
            return tokens
        batch, num_patches = tokens.shape[0], tokens.shape[1] - 1
        kept = draw_kept(batch, num_patches, kept_count(num_patches, self.prob), tokens.device)
        return keep_patches(tokens, kept)

    def attach(self, embeddings: nn.Module) -> None:
        """Apply to the output of ``embeddings`` (an HF ``CLIPVisionEmbeddings``). The hook is a bound
        method, so a deep copy of the model (EMA, ``copy.deepcopy``) calls its own copy of this module."""
        embeddings.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self(output)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"
