"""Zero-shot classification and image-text retrieval metrics, as pure tensor functions.

Semantics follow CLIP_benchmark (``clip_benchmark/metrics/zeroshot_{classification,retrieval}.py``):
class weights are the renormalised mean of L2-normalised prompt embeddings; top-k accuracy;
mean per-class recall is sklearn's balanced accuracy (classes absent from the labels are left out);
retrieval recall@K counts a query as a hit when *any* of its positives is among the top K.
``i2t_R@K`` (image query, texts retrieved) is CLIP_benchmark's ``text_retrieval_recall@K``;
``t2i_R@K`` is its ``image_retrieval_recall@K``.

Ties: CLIP_benchmark ranks with ``torch.topk``, whose order among equal scores is unspecified.
Here a query is a hit at K when fewer than K *negatives* score greater than or equal to its best
positive, so ties count against the model. The two agree whenever scores are distinct, and a
collapsed model (all features equal) scores 0 instead of whatever ``topk`` happens to return.
A NaN positive score is a miss.

What torchmetrics does: the counting of classification metrics (``multiclass_accuracy``,
``multiclass_recall``). What stays ours, and why: the ranking. torchmetrics ranks with
``torch.topk`` / ``argmax`` (a collapsed model gets top-1 1/C, the first class winning every tie)
and cannot make a NaN score a miss at K >= C; so each sample's rank is computed here and torchmetrics
is given *answers*: the label when the sample is a hit at K under the rule above, otherwise an extra
"no answer" class C that no label has. Mean per-class recall averages over the classes present in
the labels (sklearn's ``balanced_accuracy_score``, as CLIP_benchmark reports it), where torchmetrics'
``average="macro"`` would also count classes that were only predicted. Retrieval recall@K stays ours
too: torchmetrics' ``RetrievalHitRate`` ranks with ``topk`` and keeps every query's whole score row
(images x captions, 125M for COCO) until it computes, where here queries are scored in chunks.

Distributed evaluation: each rank encodes a disjoint shard of the set and records every sample's
global index; after an all-gather, :func:`unique_rows` drops padding (index < 0) and any sample seen
twice, so nothing is counted twice whatever the sampler did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall

# Written for this project, in the spirit of CLIP's prompt ensembles; used when a set ships none.
DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a photo of the {c}.",
    "a picture of the {c}.",
    "a close-up photo of a {c}.",
    "a blurry photo of a {c}.",
    "a drawing of a {c}.",
    "a photo of a small {c}.",
    "a photo of a large {c}.",
    "itap of a {c}.",
    "{c}",
]


def fill_template(template: str, classname: str) -> str:
    """``template`` with ``{c}`` replaced (``str.replace``, so stray braces in a template are kept)."""
    return template.replace("{c}", classname)


@torch.no_grad()
def build_classifier(
    encode_text: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """Zero-shot classifier weights of shape (D, C): per class, the mean of its normalised template
    embeddings, renormalised. ``encode_text(prompts)`` returns (len(prompts), D).

    Prompts are encoded ``batch_size`` at a time across class boundaries and summed per class as they
    come, so memory is (C, D) plus one batch whatever the number of classes and templates.
    """
    if not classnames or not templates:
        raise ValueError(
            f"build_classifier needs classes and templates, got {len(classnames)} classes "
            f"and {len(templates)} templates"
        )
    m = len(templates)
    # class-major order: prompt p belongs to class p // m
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    sums: Tensor | None = None  # (C, D), float32 whatever the encoder's dtype
    for start in range(0, len(prompts), batch_size):
        emb = F.normalize(encode_text(prompts[start : start + batch_size]).float(), dim=-1)  # (b, D)
        if sums is None:
            sums = emb.new_zeros(len(classnames), emb.shape[-1])
        owner = torch.arange(start, start + emb.shape[0], device=emb.device) // m  # (b,)
        sums.index_add_(0, owner, emb)
    return F.normalize(sums / m, dim=-1).t()  # (D, C)


def _negatives_ahead(scores: Tensor, positive: Tensor) -> Tensor:
    """Per row, how many negatives score >= the best positive: the 0-based rank of the first hit.

    scores, positive: (B, M) float and bool. Returns (B,) long; rows with no positive or a NaN
    positive get a rank beyond any K (a miss).
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (B, 1)
    ahead = ((scores >= best) & ~positive).sum(dim=1)  # (B,)
    miss = best.squeeze(1).isnan() | ~positive.any(dim=1)
    return ahead.masked_fill(miss, torch.iinfo(torch.long).max)


def classification_metrics(logits: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``top{k}`` accuracy for each k (k clipped to the number of classes C, so top5 with C = 3 is
    1.0 where CLIP_benchmark reports NaN) and ``mean_per_class_recall`` (top-1 recall averaged over
    the classes present in ``labels``). logits (N, C), labels (N,) long in [0, C)."""
    n, c = logits.shape
    if n == 0:
        raise ValueError("classification_metrics got no samples")
    labels = labels.to(logits.device).long()
    if len(labels) != n:
        raise ValueError(f"got {n} rows of logits but {len(labels)} labels")
    if not 0 <= int(labels.min()) <= int(labels.max()) < c:
        raise ValueError(
            f"labels must be class ids in [0, {c}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    positive = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)  # (N, C)
    rank = _negatives_ahead(logits.float(), positive)  # (N,)

    def answers(k: int) -> Tensor:  # (N,) the label where it is a hit at k, else the "no answer" class C
        return torch.where(rank < min(k, c), labels, c)

    out = {
        f"top{k}": multiclass_accuracy(answers(k), labels, num_classes=c + 1, average="micro").item()
        for k in topk
    }
    recall = multiclass_recall(answers(1), labels, num_classes=c + 1, average="none")  # (C + 1,)
    present = torch.bincount(labels, minlength=c + 1) > 0  # (C + 1,); never the "no answer" class
    out["mean_per_class_recall"] = recall[present].mean().item()
    return out


@torch.no_grad()
def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways. image_features (I, D), text_features (T, D), text_to_image (T,) long: the
    row of each caption's image. Features are compared by dot product (pass normalised features).

    ``i2t_R@K``: fraction of images (those with at least one caption) with any caption in the top K
    texts. ``t2i_R@K``: fraction of captions whose image is in the top K images. Queries are scored
    ``chunk_size`` at a time, so memory is one (chunk, I or T) block, not the (I, T) matrix.
    """
    img, txt = image_features.float(), text_features.float()
    t2i = text_to_image.to(img.device).long()
    if len(img) == 0 or len(txt) == 0:
        raise ValueError(f"retrieval_metrics needs images and captions, got {len(img)} and {len(txt)}")
    if len(t2i) != len(txt) or not 0 <= int(t2i.min()) <= int(t2i.max()) < len(img):
        raise ValueError(
            f"text_to_image must map each of the {len(txt)} texts to an image row in "
            f"[0, {len(img)}), got {len(t2i)} entries"
        )
    i2t_rank, t2i_rank = [], []
    for s in range(0, len(img), chunk_size):
        rows = torch.arange(s, min(s + chunk_size, len(img)), device=img.device)  # (b,)
        scores = img[rows] @ txt.t()  # (b, T)
        positive = t2i[None, :] == rows[:, None]  # (b, T)
        has_caption = positive.any(dim=1)
        i2t_rank.append(_negatives_ahead(scores, positive)[has_caption])
    for s in range(0, len(txt), chunk_size):
        scores = txt[s : s + chunk_size] @ img.t()  # (b, I)
        positive = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, t2i[s : s + chunk_size, None], True)
        t2i_rank.append(_negatives_ahead(scores, positive))
    i2t, t2i_r = torch.cat(i2t_rank), torch.cat(t2i_rank)
    out = {f"i2t_R@{k}": (i2t < k).float().mean().item() for k in ks}
    out |= {f"t2i_R@{k}": (t2i_r < k).float().mean().item() for k in ks}
    return out


def pad_rows(x: Tensor, length: int, value: float = -1) -> Tensor:
    """``x`` (N, ...) padded with ``value`` to (length, ...): ranks hold different numbers of samples,
    and an all-gather needs equal shapes; pad indices with -1 so :func:`unique_rows` drops them."""
    if len(x) > length:
        raise ValueError(f"cannot pad {len(x)} rows to {length}")
    return torch.cat([x, x.new_full((length - len(x), *x.shape[1:]), value)])


def unique_rows(index: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Keep the first row of each distinct sample index, sorted by index; drop padding (index < 0).

    index (N,) or (N, K) long (K columns form one key, e.g. (image index, caption number));
    each of ``tensors`` has N rows. Returns (index, *tensors) with the kept rows.
    """
    keys = index if index.dim() == 2 else index[:, None]  # (N, K)
    real = (keys >= 0).all(dim=1).nonzero().squeeze(1)  # (N',) rows that are not padding
    uniq, inverse = torch.unique(keys[real], dim=0, return_inverse=True)  # sorted distinct keys
    first = torch.full((len(uniq),), len(real), dtype=torch.long, device=index.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(real), device=index.device), reduce="amin")
    keep = real[first]
    return (index[keep], *(t[keep.to(t.device)] for t in tensors))


def gathered_classification_metrics(
    index: Tensor, image_features: Tensor, labels: Tensor, classifier: Tensor, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Metrics of all-gathered rows: index (N,), image_features (N, D), labels (N,), classifier (D, C)."""
    _, feats, labels = unique_rows(index, image_features, labels)
    return classification_metrics(feats.float() @ classifier.float().to(feats.device), labels, topk)


def gathered_retrieval_metrics(
    image_index: Tensor,
    image_features: Tensor,
    text_index: Tensor,
    text_features: Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Metrics of all-gathered rows: image_index (I,) the images' global sample indices,
    image_features (I, D), text_index (T, 2) long = (global index of the caption's image, caption
    number within that image), text_features (T, D). Padding rows carry index -1."""
    image_index, image_features = unique_rows(image_index, image_features)
    text_index, text_features = unique_rows(text_index, text_features)
    owner = text_index[:, 0].contiguous()  # (T,) global index of each caption's image
    row = torch.searchsorted(image_index, owner).clamp(max=max(len(image_index) - 1, 0))  # (T,)
    if len(image_index) == 0 or not torch.equal(image_index[row], owner):
        raise ValueError(
            "some captions belong to images that were not gathered; "
            "every rank must gather the images and captions of the same samples"
        )
    return retrieval_metrics(image_features, text_features, row, ks)
