"""SuperCLIP's losses as pure functions, and the document-frequency counts behind the IDF weights.

``contrastive_loss`` / ``siglip_loss`` take the local features and, under data parallelism, the
features all-gathered from every rank (with gradients); ``classification_loss`` is the sparse form of
the IDF-weighted soft-target cross-entropy: it never builds a (batch x vocab) target.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmax-type reductions; fp32 and fp64 are kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE of the local features (B, E) against all features (R*B, E).

    ``all_*`` default to the local features (one process). The positives of the local rows sit at
    columns ``offset + arange(B)`` (``offset = rank * B``). Each rank's value is the mean over its
    rows, so the average over ranks equals the loss of one process on the global batch.
    """
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    logits_per_image = logit_scale * image_features @ all_text.T  # (B, R*B)
    logits_per_text = logit_scale * text_features @ all_image.T  # (B, R*B)
    return (
        F.cross_entropy(_upcast(logits_per_image), labels) + F.cross_entropy(_upcast(logits_per_text), labels)
    ) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Sigmoid loss (SigLIP) of the local images (B, E) against all texts (R*B, E).

    Every (image, text) pair is a binary problem: +1 on the matching pair, -1 otherwise. Summed over
    pairs and divided by the local batch size, so the average over ranks equals one process's loss.
    """
    all_text = text_features if all_text_features is None else all_text_features
    logits = _upcast(logit_scale * image_features @ all_text.T + logit_bias)  # (B, R*B)
    signs = -torch.ones_like(logits)
    rows = torch.arange(image_features.shape[0], device=logits.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]


def caption_token_mask(input_ids: torch.Tensor, ignore_ids: Iterable[int] | torch.Tensor) -> tuple:
    """Sort each caption's ids and mark the first copy of every non-special token.

    Returns ``(ids, keep)``, both (B, T): the sorted ids and a bool mask that is True once per distinct
    token of the caption (repeats, padding and special tokens are False).
    """
    ids = input_ids.sort(dim=1).values
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]  # a repeated token counts once
    ignore = torch.as_tensor(list(ignore_ids) if not torch.is_tensor(ignore_ids) else ignore_ids)
    keep &= ~torch.isin(ids, ignore.to(ids.device))
    return ids, keep


# rows of the (B, V) logits handled at once in fp32: bounds the temporaries to ~16 MB whatever B and V
CHUNK_ELEMENTS = 2**22


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """sum_b valid_b (logsumexp(z_b) - sum_t p_bt z_b[ids_bt]) / B with a hand-written backward.

    Autograd's logsumexp + gather keep several (B, V) temporaries alive; here the forward reduces in
    row chunks and the backward writes the gradient, softmax(z) - p scattered, into one (B, V) buffer.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, p: torch.Tensor, valid: torch.Tensor):
        rows = max(1, CHUNK_ELEMENTS // logits.shape[1])
        lse = torch.cat([torch.logsumexp(_upcast(c), dim=1) for c in logits.split(rows)])  # (B,)
        target = (p * _upcast(logits.gather(1, ids))).sum(dim=1)  # (B,)
        ctx.save_for_backward(logits, ids, p, lse, valid)
        return ((lse - target) * valid).sum() / logits.shape[0]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, ids, p, lse, valid = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_output * valid / logits.shape[0]  # (B,)
        rows = max(1, CHUNK_ELEMENTS // logits.shape[1])
        for i in range(0, logits.shape[0], rows):
            j = min(i + rows, logits.shape[0])
            g = (_upcast(logits[i:j]) - lse[i:j, None]).exp_()  # softmax of the rows
            g.scatter_add_(1, ids[i:j], -p[i:j])  # minus the soft target
            grad[i:j] = g.mul_(scale[i:j, None])
        return grad, None, None, None


def classification_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    idf: torch.Tensor,
    ignore_ids: Iterable[int] | torch.Tensor,
) -> torch.Tensor:
    """IDF-weighted soft-target cross-entropy of the vocabulary logits (B, V) against the captions.

    For caption b with token set S_b: p_bt = w_t / sum_{t' in S_b} w_t' and
    loss_b = logsumexp(z_b) - sum_{t in S_b} p_bt z_bt; the result is the mean over the batch, a caption
    whose weights sum to 0 contributing 0. Only (B, T) gathers are built, never a (B, V) target, and
    the reductions run in fp32 (fp64 if given) whatever the dtype of ``logits`` (bf16 autocast); the
    gradient is written into one (B, V) buffer of the logits' dtype.
    """
    ids, keep = caption_token_mask(input_ids, ignore_ids)
    dtype = _upcast(logits[:0]).dtype
    weights = idf.to(dtype)[ids] * keep  # (B, T)
    total = weights.sum(dim=1, keepdim=True)  # (B, 1)
    p = weights / total.clamp_min(torch.finfo(dtype).tiny)
    return _SoftTargetCrossEntropy.apply(logits, ids, p, (total.squeeze(1) > 0).to(dtype))


class DocumentFrequency(nn.Module):
    """Running document frequencies of the vocabulary over the captions seen so far.

    Buffers (saved and restored with the checkpoint): ``df`` (V,) int64, the number of captions seen
    that contain each token, and ``num_docs``, the number of captions seen. ``update`` counts a batch
    and, when ``torch.distributed`` is initialised, sums the counts over all ranks, so every rank
    holds the global counts; call it once per (micro-)batch, so that each caption counts once.
    """

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("df", torch.zeros(vocab_size, dtype=torch.long))
        self.register_buffer("num_docs", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def count(self, input_ids: torch.Tensor, ignore_ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """Counts of one local batch, (V + 1,): per-token caption counts, then the caption count."""
        ids, keep = caption_token_mask(input_ids, ignore_ids)
        counts = torch.zeros(self.vocab_size + 1, dtype=torch.long, device=input_ids.device)
        counts.index_add_(0, ids.flatten(), keep.flatten().long())  # no boolean indexing: no host sync
        counts[-1] = input_ids.shape[0]
        return counts

    @torch.no_grad()
    def update(
        self, input_ids: torch.Tensor, ignore_ids: Iterable[int] | torch.Tensor, sync: bool = True
    ) -> None:
        """Add a batch's counts (summed over ranks when distributed and ``sync``)."""
        counts = self.count(input_ids, ignore_ids).to(self.df.device)
        if sync and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.df += counts[:-1]
        self.num_docs += counts[-1]

    def idf(self) -> torch.Tensor:
        """w_t = log((N + 1) / (df_t + 1)) as float32 (V,)."""
        return torch.log((self.num_docs.double() + 1) / (self.df.double() + 1)).float()
