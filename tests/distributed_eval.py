"""Evaluate one checkpoint with both evaluation callbacks under a given strategy; each rank writes
its ``trainer.callback_metrics`` to ``OUT_DIR/rank{r}.json``.

Run as a script (Lightning's DDP launcher re-runs it for every rank):
    python tests/distributed_eval.py CKPT CLASSIFICATION_ROOT RETRIEVAL_ROOT OUT_DIR {single,ddp,fsdp2}
``single`` is one process; ``ddp`` and ``fsdp2`` are two, whose shards of each set differ in size.
Also the home of the small evaluation sets the tests write, in the CLIP_benchmark layout.
"""

import io
import json
import sys
from pathlib import Path

import lightning
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import quiet_trainer
from shards import write_split
from superclip_pl.eval.callbacks import ZeroShotClassification, ZeroShotRetrieval
from superclip_pl.train.module import LitSuperCLIP

CLASSES = ["red", "green", "blue", "circle", "square", "star", "triangle"]
TEMPLATES = ["a photo of a {c}.", "a {c} on the left"]


def image_png(seed: int) -> bytes:
    """A 20 x 16 image of random pixels: distinct images, so no two features tie."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (16, 20, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def classification_labels(n: int) -> list[int]:
    return [(3 * i) % len(CLASSES) for i in range(n)]


def write_classification_set(root: Path, n: int = 11, shard_sizes=(4, 4, 3), labels=None, classnames=CLASSES):
    """n images with .cls labels; 3 shards, so two ranks split them sample by sample (6 and 5)."""
    labels = classification_labels(n) if labels is None else labels
    write_split(
        root, [{"png": image_png(i), "cls": f"{labels[i]}\n".encode()} for i in range(n)], list(shard_sizes)
    )
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def retrieval_captions(i: int) -> list[str]:
    words = CLASSES + ["big", "small", "left"]
    return [f"a {words[(i + k) % 10]} {words[(3 * i + 2 * k) % 10]}" for k in range(1 + i % 3)]


def write_retrieval_set(root: Path, n: int = 9, shard_sizes=(5, 4)):
    """n images with 1 to 3 captions each; 2 shards, so two ranks take one whole shard each (5 and 4)."""
    samples = [
        {"png": image_png(100 + i), "txt": "\n".join(retrieval_captions(i)).encode()} for i in range(n)
    ]
    write_split(root, samples, list(shard_sizes))
    return root


def save_checkpoint(module: LitSuperCLIP, path: Path) -> None:
    """A checkpoint as ``--ckpt_path`` reads it: the weights and the hyper-parameters of the module."""
    state = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(state, path)


def val_loader(tokenizer) -> DataLoader:
    """One tiny batch: Lightning runs the validation loop (and its hooks) only when it has batches."""
    enc = tokenizer(["a red circle", "a blue star"], padding=True, return_tensors="pt")
    return DataLoader([{"pixel_values": torch.zeros(2, 3, 16, 16), **enc}], batch_size=None)


def callbacks(cls_root: str, ret_root: str, **kwargs) -> list:
    """Classification decodes in 2 DataLoader workers per rank, retrieval in the rank's own process."""
    return [
        ZeroShotClassification("colours", cls_root, batch_size=5, num_workers=2, **kwargs),
        ZeroShotRetrieval("captions", ret_root, batch_size=2, num_workers=0, **kwargs),
    ]


def count_forward_passes(module: LitSuperCLIP) -> dict[str, int]:
    """Counts of the image and text towers' forward passes on this rank, filled in as they run."""
    counts = {"forward_passes/image": 0, "forward_passes/text": 0}
    towers = {"image": module.model.clip.vision_model, "text": module.model.clip.text_model}
    for name, tower in towers.items():
        tower.register_forward_hook(
            lambda *_, key=f"forward_passes/{name}": counts.update({key: counts[key] + 1})
        )
    return counts


def main(ckpt: str, cls_root: str, ret_root: str, out_dir: str, mode: str) -> None:
    """``single`` / ``ddp`` / ``fsdp2_validate``: ``validate --ckpt_path`` (the checkpoint loaded into the
    sharded model). ``fsdp2``: one training step at learning rate 0 (the weights stay the checkpoint's)
    with evaluation after it, the path where FSDP2 has re-sharded the model."""
    checkpoint = torch.load(ckpt, weights_only=False)
    torch.manual_seed(1)  # other weights than the checkpoint's: they must be loaded
    module = LitSuperCLIP(**{**checkpoint["hyper_parameters"], "lr": 0.0})
    counts = count_forward_passes(module)
    strategy = {"single": "auto", "ddp": "ddp"}.get(mode, "model_parallel_fsdp2")
    if strategy == "model_parallel_fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = quiet_trainer(
        devices=1 if mode == "single" else 2,
        strategy=strategy,
        max_steps=1,
        limit_val_batches=0 if mode == "fsdp2" else None,
        callbacks=callbacks(cls_root, ret_root, every_n_steps=1 if mode == "fsdp2" else None),
    )
    if mode == "fsdp2":
        module.load_state_dict(checkpoint["state_dict"])
        trainer.fit(module, train_dataloaders=val_loader(module.tokenizer))
    else:
        trainer.validate(module, dataloaders=val_loader(module.tokenizer), ckpt_path=ckpt, verbose=False)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()} | counts
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:6])
