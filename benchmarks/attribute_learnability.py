"""How fast the vision tower can learn one attribute when it is told it directly.

    python benchmarks/attribute_learnability.py [--attribute shape|colour|count|all] [--steps 1250]
                                                [--eval-every 250] [--style primary]

An upper bound for what contrastive or SuperCLIP training can reach in the same number of steps:
the demo's vision tower (``tiny`` preset at the style's resolution: 32 px and patch 8 for
``primary``, as ``configs/demo.yaml`` builds it; 32 px and patch 4 for ``small``, the demo model its
published numbers were made with; 64 px and patch 8 for ``classic``)
and a head of the SuperCLIP head's form (LayerNorm + Linear on the post-LayerNorm patch-token mean)
are trained with a multi-label loss on which values of the attribute are present (shape: the shapes
in the scene; colour: the colours; size: the sizes; count: the object count, one label), on freshly
drawn training scenes of the style (the demo's distribution and training crop), with the demo's
optimiser and schedule. Every ``eval-every`` steps it reports top-1 on the evaluation set of that
attribute (``data/shapes/eval/<attribute>``, from ``make data``, which must be of the same style).
``--attribute all`` checks every attribute the style's data set evaluates. Run it before comparing
methods on them: an attribute the tower cannot learn in the demo's budget even when told it
directly cannot separate the methods.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from superclip_pl.eval.sets import load_classification_set
from superclip_pl.model import SuperCLIP
from superclip_pl.shapes.dataset import eval_sets
from superclip_pl.shapes.scenes import DEFAULT_STYLE, STYLES, render_scene, sample_scene
from superclip_pl.train.module import param_groups, warmup_cosine
from superclip_pl.transforms import eval_transform, train_transform

ATTRIBUTES = ("shape", "colour", "size", "count")
# the demo model of each style: image size and overrides of the tiny preset (configs/demo.yaml: 32 px,
# patch 8; the small style's numbers were made at patch 4)
MODELS = {
    "primary": (32, {"vision_config": {"patch_size": 8}}),
    "small": (32, {"vision_config": {"patch_size": 4}}),
    "classic": (64, None),
}


def classes(attribute: str, style: str) -> tuple[str, ...]:
    st = STYLES[style]
    values = {"shape": st.shapes, "colour": st.colours, "size": tuple(st.sizes)}
    return values.get(attribute, ("one", "two", "three")[: st.max_objects])


def targets(scene: dict, attribute: str, style: str) -> torch.Tensor:
    """Multi-hot vector of the attribute's values present in ``scene``."""
    values = classes(attribute, style)
    y = torch.zeros(len(values))
    if attribute == "count":
        y[len(scene["objects"]) - 1] = 1
    else:
        for obj in scene["objects"]:
            y[values.index(obj[attribute])] = 1
    return y


def run(
    attribute: str = "shape",
    steps: int = 2500,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.2,
    warmup: int = 100,
    eval_every: int = 500,
    eval_root: str | None = None,
    seed: int = 0,
    style: str = DEFAULT_STYLE,
) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    image_size, overrides = MODELS[style]
    vision = SuperCLIP.build("tiny", image_size=image_size, overrides=overrides, head=False).clip.vision_model
    width, size = vision.config.hidden_size, vision.config.image_size
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(classes(attribute, style))))
    groups = param_groups(nn.ModuleList([vision, head]), weight_decay)  # the demo's decay / no-decay split
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps, 0.0))
    augment = train_transform(size)

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        tokens = vision(pixel_values=pixels).last_hidden_state[:, 1:]
        return head(vision.post_layernorm(tokens).mean(1))

    evalset = list(load_classification_set(eval_root or f"data/shapes/eval/{attribute}"))
    to_tensor = eval_transform(size)
    eval_pixels = torch.stack([to_tensor(s.image) for s in evalset])
    eval_labels = torch.tensor([s.label for s in evalset])

    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        scenes = [sample_scene(rng, None, STYLES[style]) for _ in range(batch_size)]
        pixels = torch.stack([augment(render_scene(s, size)) for s in scenes])
        labels = torch.stack([targets(s, attribute, style) for s in scenes])
        loss = F.binary_cross_entropy_with_logits(logits(pixels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            vision.eval()
            with torch.no_grad():
                top1 = (logits(eval_pixels).argmax(1) == eval_labels).float().mean().item()
            vision.train()
            curve.append({"step": step, "loss": loss.item(), "top1": top1})
            print(
                f"step {step:6d}  loss {loss.item():.3f}  {attribute} top-1 {top1:.3f}  "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return {
        "attribute": attribute,
        "style": style,
        "chance": 1 / len(classes(attribute, style)),
        "batch_size": batch_size,
        "lr": lr,
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attribute", choices=[*ATTRIBUTES, "all"], default="all")
    parser.add_argument("--style", choices=sorted(MODELS), default=DEFAULT_STYLE)
    parser.add_argument("--steps", type=int, default=1250, help="the demo's 20k samples at batch 16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-root", help="evaluation set (default: data/shapes/eval/<attribute>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    evaluated = tuple(eval_sets(args.style))
    attributes = evaluated if args.attribute == "all" else (args.attribute,)
    if args.eval_root and len(attributes) > 1:
        parser.error("--eval-root names one set: give --attribute too")
    results = {}
    for attribute in attributes:
        results[attribute] = run(
            attribute,
            args.steps,
            args.batch_size,
            args.lr,
            eval_every=args.eval_every,
            eval_root=args.eval_root,
            seed=args.seed,
            style=args.style,
        )
    print(json.dumps(results, indent=1))
    for attribute, r in results.items():
        curve = "  ".join(f"{p['step']}: {p['top1']:.2f}" for p in r["curve"])
        print(f"{attribute:>7} (chance {r['chance']:.2f})  top-1 at step  {curve}")
    return results


if __name__ == "__main__":
    main()
