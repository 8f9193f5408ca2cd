"""The losses against the formulas of DESIGN.md, written out densely here."""

import math

import pytest
import torch
import torch.nn.functional as F

from superclip_pl.losses import DocumentFrequency, classification_loss, contrastive_loss, siglip_loss

BOS, EOS = 48, 49  # special ids at the end of a 50-token vocabulary; pad = EOS, as in CLIP
V = 50


def random_captions(generator: torch.Generator, batch: int = 7, length: int = 12) -> torch.Tensor:
    """Captions BOS w1 .. wn EOS EOS .. with repeats; the last caption holds no ordinary token."""
    ids = torch.full((batch, length), EOS)
    for b in range(batch):
        n = int(torch.randint(1, length - 1, (1,), generator=generator))
        words = torch.randint(0, 12, (n,), generator=generator)  # small range: many repeats
        ids[b, 0], ids[b, 1 : 1 + n] = BOS, words
    ids[-1, 0], ids[-1, 1:] = BOS, EOS
    return ids


def dense_reference(logits, input_ids, idf, ignore_ids):
    """The method as written: a (B, V) soft target over each caption's token set."""
    target = torch.zeros_like(logits)
    for b, row in enumerate(input_ids.tolist()):
        tokens = set(row) - set(ignore_ids)
        for t in tokens:
            target[b, t] = idf[t]
    total = target.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, target / total.clamp_min(1e-300), torch.zeros_like(target))
    per = -(p * F.log_softmax(logits, dim=1)).sum(dim=1)  # = logsumexp(z) - sum_t p_t z_t when sum p = 1
    return (per * (total.squeeze(1) > 0)).sum() / logits.shape[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_classification_loss_and_gradient_equal_dense_reference(dtype):
    g = torch.Generator().manual_seed(0)
    ids = random_captions(g)
    idf = torch.rand(V, generator=g, dtype=torch.float64) * 3
    idf[3] = 0.0  # a token seen in every caption has weight 0
    logits = (torch.randn(ids.shape[0], V, generator=g, dtype=torch.float64) * 4).to(dtype)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = classification_loss(a, ids, idf.to(dtype), [BOS, EOS])
    ref = dense_reference(b, ids, idf.to(dtype), [BOS, EOS])
    ours.backward()
    ref.backward()
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(a.grad, b.grad, **tol)
    # the last caption (special tokens only) contributes 0 to the loss and gets no gradient
    assert torch.all(a.grad[-1] == 0)


def test_zero_weight_caption_contributes_zero_but_counts_in_the_mean():
    ids = torch.tensor([[BOS, 5, EOS], [BOS, EOS, EOS]])
    logits = torch.randn(2, V)
    idf = torch.ones(V)
    both = classification_loss(logits, ids, idf, [BOS, EOS])
    first = classification_loss(logits[:1], ids[:1], idf, [BOS, EOS])
    torch.testing.assert_close(both, first / 2)  # the mean divides by the batch size, as the reference


def test_repeated_tokens_count_once():
    logits = torch.randn(1, V)
    idf = torch.rand(V) + 0.5
    once = classification_loss(logits, torch.tensor([[BOS, 4, 7, EOS, EOS]]), idf, [BOS, EOS])
    twice = classification_loss(logits, torch.tensor([[BOS, 4, 7, 4, 7, 7, EOS]]), idf, [BOS, EOS])
    torch.testing.assert_close(once, twice)


def test_classification_loss_in_bf16_autocast_reduces_in_fp32():
    g = torch.Generator().manual_seed(1)
    ids = random_captions(g)
    idf = torch.rand(V, generator=g) * 3
    logits = torch.randn(ids.shape[0], V, generator=g) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = classification_loss(logits.bfloat16(), ids, idf, [BOS, EOS])
    assert low.dtype == torch.float32
    ref = dense_reference(logits.bfloat16().double(), ids, idf.double(), [BOS, EOS])
    torch.testing.assert_close(low.double(), ref, rtol=1e-5, atol=1e-5)


def test_document_frequency_matches_hand_counts():
    df = DocumentFrequency(V)
    batches = [
        torch.tensor([[BOS, 1, 2, 2, EOS], [BOS, 2, 3, EOS, EOS]]),
        torch.tensor([[BOS, 1, EOS, EOS, EOS], [BOS, EOS, EOS, EOS, EOS], [BOS, 4, 1, 4, EOS]]),
    ]
    for ids in batches:
        df.update(ids, [BOS, EOS])
    # captions: {1,2} {2,3} {1} {} {1,4}
    expected = torch.zeros(V, dtype=torch.long)
    expected[1], expected[2], expected[3], expected[4] = 3, 2, 1, 1
    assert int(df.num_docs) == 5
    torch.testing.assert_close(df.df, expected)
    idf = df.idf()
    assert idf.dtype == torch.float32
    torch.testing.assert_close(idf[1], torch.tensor(math.log(6 / 4)))
    torch.testing.assert_close(idf[7], torch.tensor(math.log(6 / 1)))
    torch.testing.assert_close(idf[BOS], torch.tensor(math.log(6 / 1)))  # never counted
    state = df.state_dict()
    assert set(state) == {"df", "num_docs"}
    fresh = DocumentFrequency(V)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.idf(), idf)


def reference_infonce(image, text, scale):
    """Per-pair loop: -log softmax of the matching pair, over rows and over columns."""
    n = image.shape[0]
    sims = scale * image @ text.T
    i2t = sum(-(sims[i, i] - torch.logsumexp(sims[i], 0)) for i in range(n)) / n
    t2i = sum(-(sims[j, j] - torch.logsumexp(sims[:, j], 0)) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_contrastive_loss_equals_reference_and_local_shards_average_to_global():
    g = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    full = contrastive_loss(image, text, scale)
    torch.testing.assert_close(full, reference_infonce(image, text, scale))
    # two "ranks" with local rows against the gathered columns, labels offset by rank
    parts = [
        contrastive_loss(image[r * 4 : r * 4 + 4], text[r * 4 : r * 4 + 4], scale, image, text, r * 4)
        for r in range(2)
    ]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, full)


def test_siglip_loss_equals_reference_and_shards_average_to_global():
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    ref = 0.0
    for i in range(6):
        for j in range(6):
            z = scale * image[i] @ text[j] + bias
            ref = ref - F.logsigmoid(z if i == j else -z)
    ref = ref / 6
    torch.testing.assert_close(siglip_loss(image, text, scale, bias), ref)
    parts = [
        siglip_loss(image[r * 3 : r * 3 + 3], text[r * 3 : r * 3 + 3], scale, bias, text, r * 3)
        for r in range(2)
    ]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, ref)


def test_chunked_reduction_equals_one_chunk(monkeypatch):
    from superclip_pl import losses

    g = torch.Generator().manual_seed(4)
    ids = random_captions(g)
    idf = torch.rand(V, generator=g, dtype=torch.float64) * 3
    logits = torch.randn(ids.shape[0], V, generator=g, dtype=torch.float64)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    whole = classification_loss(a, ids, idf, [BOS, EOS])
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 2 * V)  # 2 rows per chunk, the last one short
    chunked = classification_loss(b, ids, idf, [BOS, EOS])
    whole.backward()
    chunked.backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)
