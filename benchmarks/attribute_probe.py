"""What a trained model knows about one attribute: zero-shot top-1, linear probes and the head.

    python benchmarks/attribute_probe.py CKPT [CKPT ...] [--set data/shapes/eval/shape]

For each checkpoint, on a CLIP_benchmark-layout classification set: zero-shot top-1 with the set's
templates; the held-out accuracy of a linear probe (logistic regression, first 70% of the set to
fit, the rest to test) on the vision tower's CLS state, on the patch-token mean the head reads, and
on the contrastive image embedding; and, for SuperCLIP, how often the head ranks the right class
name's token first among the class names' tokens. A probe near chance means the features do not hold
the attribute at all, whatever the text side does.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from superclip_pl.eval.metrics import DEFAULT_TEMPLATES, build_classifier, classification_metrics
from superclip_pl.eval.sets import load_classification_set
from superclip_pl.tokenizer import tokenize
from superclip_pl.train.module import LitSuperCLIP
from superclip_pl.transforms import eval_transform


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, fit_fraction: float = 0.7) -> float:
    """Held-out accuracy of a logistic regression on standardised features."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = int(len(x) * fit_fraction)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(x[:n] @ w + b, y[:n]) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[n:] @ w + b).argmax(1) == y[n:]).float().mean().item()


@torch.no_grad()
def probe(ckpt: str, root: str) -> dict[str, float]:
    module = LitSuperCLIP.load_from_checkpoint(ckpt, map_location="cpu").eval()
    model, tok = module.model, module.tokenizer
    ds = load_classification_set(root)
    samples = list(ds)
    transform = eval_transform(module.image_size)
    pixels = torch.stack([transform(s.image) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    vision = model.clip.vision_model(pixel_values=pixels)
    cls_state = vision.pooler_output
    patch_mean = model.clip.vision_model.post_layernorm(vision.last_hidden_state[:, 1:]).mean(1)
    embeds = model.encode_image(pixels)

    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode_text(**tokenize(tok, texts, module.max_length))

    weights = build_classifier(encode, ds.classnames, ds.templates or DEFAULT_TEMPLATES)
    out = {"zeroshot_top1": classification_metrics(embeds @ weights, labels, topk=(1,))["top1"]}
    classes = len(ds.classnames)
    with torch.enable_grad():
        for name, feats in (("cls", cls_state), ("patch_mean", patch_mean), ("embedding", embeds)):
            out[f"probe_{name}"] = linear_probe(feats, labels, classes)
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in ds.classnames]
    if model.head is not None and all(len(i) == 1 for i in ids):  # class names that are single tokens
        head = model.head(patch_mean)[:, [i[0] for i in ids]]
        out["head_top1"] = (head.argmax(1) == labels).float().mean().item()
    out["chance"] = 1 / classes
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpts", nargs="+", help="LitSuperCLIP checkpoints")
    parser.add_argument("--set", default="data/shapes/eval/shape", help="classification set (CLIP_benchmark)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {ckpt: probe(ckpt, args.set) for ckpt in args.ckpts}
    for ckpt, r in results.items():
        print(ckpt, " ".join(f"{k}={v:.3f}" for k, v in r.items()))
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
