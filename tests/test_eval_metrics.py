"""Zero-shot metrics: hand-worked examples, a reference computation, and gathered = single process."""

import math

import pytest
import torch
import torch.nn.functional as F

from superclip_pl.eval.metrics import (
    DEFAULT_TEMPLATES,
    build_classifier,
    classification_metrics,
    gathered_classification_metrics,
    gathered_retrieval_metrics,
    pad_rows,
    retrieval_metrics,
    unique_rows,
)


class TableEncoder:
    """encode_text over a fixed random embedding per prompt (unnormalised); records batch sizes."""

    def __init__(self, dim: int = 8):
        self.dim, self.table, self.batches = dim, {}, []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.batches.append(len(texts))
        g = torch.Generator().manual_seed(len(self.table))
        for t in texts:
            self.table.setdefault(t, torch.randn(self.dim, generator=g) * 3)
        return torch.stack([self.table[t] for t in texts])


def test_build_classifier_matches_per_class_reference():
    classnames, templates = ["cat", "dog", "eel"], ["a {c}.", "the {c}!", "{c}", "x {c} y", "photo: {c}"]
    enc = TableEncoder()
    weights = build_classifier(enc, classnames, templates, batch_size=4)  # 15 prompts, batches cross classes
    assert enc.batches == [4, 4, 4, 3]
    # reference: CLIP_benchmark's per-class loop
    ref = []
    for c in classnames:
        emb = F.normalize(torch.stack([enc.table[t.replace("{c}", c)] for t in templates]), dim=-1)
        mean = emb.mean(0)
        ref.append(mean / mean.norm())
    torch.testing.assert_close(weights, torch.stack(ref, dim=1))
    assert weights.shape == (8, 3)


def test_separable_embeddings_give_perfect_accuracy():
    classnames = ["red", "green", "blue", "yellow"]
    axis = {c: F.one_hot(torch.tensor(i), 6).float() for i, c in enumerate(classnames)}

    def encode_text(texts):  # every prompt of class c lies near axis c
        return torch.stack([axis[next(c for c in classnames if c in t)] + 0.1 * torch.rand(6) for t in texts])

    classifier = build_classifier(encode_text, classnames, DEFAULT_TEMPLATES, batch_size=7)  # (6, 4)
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    images = F.normalize(F.one_hot(labels, 6).float() + 0.05 * torch.rand(8, 6), dim=-1)  # (8, 6)
    m = classification_metrics(images @ classifier, labels)
    assert m == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}


def test_classification_metrics_by_hand():
    # 4 classes; class 3 never appears in the labels, so it is left out of the per-class mean
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.5],  # label 0: rank 0 -> top1 hit
            [0.2, 0.8, 0.0, 0.3],  # label 0: 0.8 and 0.3 ahead -> rank 2: top3 hit only
            [0.1, 0.9, 0.3, 0.0],  # label 1: rank 0
            [0.5, 0.4, 0.1, 0.0],  # label 2: 0.5 and 0.4 ahead -> rank 2
            [0.5, 0.5, 0.2, 0.1],  # label 1: tied with class 0 -> counted against: rank 1
        ]
    )
    labels = torch.tensor([0, 0, 1, 2, 1])
    m = classification_metrics(logits, labels, topk=(1, 2, 3, 5))
    # ranks [0, 2, 0, 2, 1]; top1 2/5, top2 3/5, top3 5/5, top5 clipped to C = 4 -> 5/5
    assert m["top1"] == pytest.approx(2 / 5)
    assert m["top2"] == pytest.approx(3 / 5)
    assert m["top3"] == 1.0 and m["top5"] == 1.0
    # per-class top-1 recall: class 0 1/2, class 1 1/2 (the tie is a miss), class 2 0/1 -> mean 1/3
    assert m["mean_per_class_recall"] == pytest.approx(1 / 3)


def test_collapsed_model_scores_zero_not_a_lucky_tie():
    logits = torch.zeros(6, 3)
    assert classification_metrics(logits, torch.tensor([0, 1, 2, 0, 1, 2]), topk=(1,))["top1"] == 0.0
    r = retrieval_metrics(torch.ones(4, 2), torch.ones(4, 2), torch.arange(4), ks=(1, 4))
    assert r["i2t_R@1"] == 0.0 and r["t2i_R@1"] == 0.0
    assert r["i2t_R@4"] == 1.0 and r["t2i_R@4"] == 1.0  # 3 negatives ahead, K = 4 still reaches it


def test_nan_features_are_misses_at_every_k():
    # a diverged model (NaN features) must not look good, even with K beyond the number of candidates
    nan = torch.full((3, 2), float("nan"))
    r = retrieval_metrics(nan, nan, torch.arange(3), ks=(1, 10))
    assert set(r.values()) == {0.0}
    assert classification_metrics(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))["top5"] == 0.0


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 3\), got \[0, 3\]"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))


# Scores (image x text) chosen by hand; text_to_image = [0, 0, 1, 1, 2, 2]
SCORES = torch.tensor(
    [  # t0   t1   t2   t3   t4   t5
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # img0 (t0, t1): best positive t0 = 0.9 is the row max: rank 0
        [0.1, 0.2, 0.3, 0.7, 0.6, 0.5],  # img1 (t2, t3): best positive t3 = 0.7 is the row max: rank 0
        [0.5, 0.4, 0.1, 0.0, 0.2, 0.3],  # img2 (t4, t5): best positive t5 = 0.3, t0 and t1 ahead: rank 2
    ]
)
# i2t ranks [0, 0, 2] -> R@1 2/3, R@2 2/3, R@3 1
# t2i, per text column: t0 [.9 .1 .5] rank 0; t1 [.1 .2 .4] rank 2; t2 [.8 .3 .1] rank 1;
#                       t3 [.2 .7 .0] rank 0; t4 [.3 .6 .2] rank 2; t5 [.0 .5 .3] rank 1
# t2i ranks [0, 2, 1, 0, 2, 1] -> R@1 2/6, R@2 4/6, R@3 6/6
EXPECTED = {
    "i2t_R@1": 2 / 3,
    "i2t_R@2": 2 / 3,
    "i2t_R@3": 1.0,
    "t2i_R@1": 2 / 6,
    "t2i_R@2": 4 / 6,
    "t2i_R@3": 1.0,
}


@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_retrieval_recall_by_hand_under_a_text_permutation(chunk_size):
    # image features = identity, text t's features = column t of SCORES, so image @ text.T == SCORES
    perm = torch.tensor([4, 1, 5, 0, 3, 2])  # shuffle the texts: recall must not depend on their order
    texts, owners = SCORES.t()[perm], torch.tensor([0, 0, 1, 1, 2, 2])[perm]
    m = retrieval_metrics(torch.eye(3), texts, owners, ks=(1, 2, 3), chunk_size=chunk_size)
    assert m == pytest.approx(EXPECTED)


def topk_reference(img, txt, owners, k):
    """CLIP_benchmark's rule written plainly: hit if any positive is among torch.topk's k."""
    scores = img @ txt.t()  # (I, T)
    i2t = [bool((owners[scores[i].topk(k).indices] == i).any()) for i in range(len(img))]
    t2i = [bool((scores[:, t].topk(k).indices == owners[t]).any()) for t in range(len(txt))]
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def test_retrieval_matches_topk_reference_without_ties():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(20, 16, generator=g), dim=-1)
    owners = torch.randint(0, 20, (50,), generator=g)
    owners[:20] = torch.arange(20)  # every image has at least one caption
    txt = F.normalize(img[owners] + 0.8 * torch.randn(50, 16, generator=g), dim=-1)
    m = retrieval_metrics(img, txt, owners, chunk_size=7)
    assert set(m) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    for k in (1, 5, 10):
        assert (m[f"i2t_R@{k}"], m[f"t2i_R@{k}"]) == pytest.approx(topk_reference(img, txt, owners, k))


def test_unique_rows_drops_padding_and_repeats():
    index = torch.tensor([4, 1, -1, 4, 0, 1])
    values = torch.tensor([40, 10, -1, 41, 0, 11])
    kept_index, kept = unique_rows(index, values)
    assert kept_index.tolist() == [0, 1, 4] and kept.tolist() == [0, 10, 40]  # first of each, sorted
    pair_index = torch.tensor([[2, 0], [2, 1], [2, 0], [-1, -1]])
    assert unique_rows(pair_index)[0].tolist() == [[2, 0], [2, 1]]


def shard_like_a_sampler(n: int, world: int) -> list[torch.Tensor]:
    """DistributedSampler-style split of range(n): pad by repeating from the start, rank r takes r::world."""
    total = math.ceil(n / world) * world
    order = torch.cat([torch.arange(n), torch.arange(total - n)])
    return [order[r::world] for r in range(world)]


def fake_all_gather(per_rank: list[torch.Tensor], length: int) -> torch.Tensor:
    """An all-gather of rows padded to ``length`` (index -1), flattened to (world * length, ...)."""
    return torch.cat([pad_rows(x, length) for x in per_rank])


def test_gathered_classification_counts_each_sample_once():
    g = torch.Generator().manual_seed(1)
    feats, labels, classifier = (
        torch.randn(7, 5, generator=g),
        torch.randint(0, 3, (7,), generator=g),
        torch.randn(5, 3),
    )
    expected = classification_metrics(feats @ classifier, labels, topk=(1, 2))
    # 3 ranks; rank 2 holds one sample fewer, and the sampler repeated sample 0 and 1 to even things out
    shards = shard_like_a_sampler(7, 3)
    shards[2] = shards[2][:-1]
    index = fake_all_gather(shards, 3)
    got = gathered_classification_metrics(
        index,
        fake_all_gather([feats[s] for s in shards], 3),
        fake_all_gather([labels[s] for s in shards], 3),
        classifier,
        topk=(1, 2),
    )
    assert got == pytest.approx(expected)


def test_gathered_retrieval_remaps_captions_to_gathered_images():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    captions = [2, 1, 3, 1, 2]  # captions per image
    owners = torch.repeat_interleave(torch.arange(5), torch.tensor(captions))
    txt = F.normalize(img[owners] + torch.randn(len(owners), 8, generator=g), dim=-1)
    expected = retrieval_metrics(img, txt, owners)
    ordinal = torch.cat([torch.arange(c) for c in captions])
    text_key = torch.stack([owners * 1000 + 7, ordinal], dim=1)  # (T, 2); global ids need not be 0..I-1
    image_key = torch.arange(5) * 1000 + 7
    shards = shard_like_a_sampler(5, 2)  # rank 1 repeats image 0 and its captions
    per_rank_texts = [torch.cat([(owners == i).nonzero().squeeze(1) for i in s]) for s in shards]
    got = gathered_retrieval_metrics(
        fake_all_gather([image_key[s] for s in shards], 4),
        fake_all_gather([img[s] for s in shards], 4),
        fake_all_gather([text_key[t] for t in per_rank_texts], 8),
        fake_all_gather([txt[t] for t in per_rank_texts], 8),
    )
    assert got == pytest.approx(expected)
