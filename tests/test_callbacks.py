"""The evaluation callbacks: the same numbers on one and two processes (DDP, FSDP2), the numbers of a
direct computation, when they run in fit / validate / test (eval mode, no grad, autocast), clear
errors on broken sets, and metrics that reach metrics.json through the real entry point."""

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

import distributed_eval as de
from conftest import MICRO, quiet_trainer
from superclip_pl.eval.callbacks import ZeroShotClassification, ZeroShotRetrieval
from superclip_pl.eval.sets import load_classification_set, load_retrieval_set
from superclip_pl.train.module import LitSuperCLIP
from superclip_pl.transforms import eval_transform

HERE = os.path.dirname(__file__)
CONTRACT_KEYS = [
    "zeroshot/colours/top1",
    "zeroshot/colours/top5",
    "zeroshot/colours/mean_per_class_recall",
    *(f"retrieval/captions/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """A checkpoint of a micro model, a classification set (11 images, 7 classes, 3 shards) and a
    retrieval set (9 images with 1 to 3 captions, 2 shards)."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    de.save_checkpoint(
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0), root / "model.ckpt"
    )
    return SimpleNamespace(
        root=root,
        ckpt=str(root / "model.ckpt"),
        cls=str(de.write_classification_set(root / "cls")),
        ret=str(de.write_retrieval_set(root / "ret")),
    )


@pytest.fixture(scope="module")
def one_process(world):
    """The callback metrics of ``validate --ckpt_path`` on one process."""
    out = world.root / "single"
    out.mkdir()
    de.main(world.ckpt, world.cls, world.ret, str(out), "single")
    return json.loads((out / "rank0.json").read_text())


@pytest.fixture
def module(world):
    checkpoint = torch.load(world.ckpt, weights_only=False)
    module = LitSuperCLIP(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2_validate"])
def test_two_processes_give_the_numbers_of_one(world, one_process, mode, tmp_path):
    # the two ranks hold different numbers of samples, so one of them must run placeholder batches
    for load in (load_classification_set, load_retrieval_set):
        root = world.cls if load is load_classification_set else world.ret
        assert len(list(load(root, rank=0, world_size=2))) == len(list(load(root, rank=1, world_size=2))) + 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": HERE}
    script = os.path.join(HERE, "distributed_eval.py")
    proc = subprocess.run(
        [sys.executable, script, world.ckpt, world.cls, world.ret, str(tmp_path), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for metrics in ranks:  # every rank holds the whole set's numbers, equal to one process's
        assert {k: metrics[k] for k in CONTRACT_KEYS} == pytest.approx(
            {k: one_process[k] for k in CONTRACT_KEYS}, abs=1e-6
        )
    assert 0 < one_process["zeroshot/colours/top1"] < 1  # a model neither perfect nor useless
    # FSDP's forward passes are collectives: both ranks must have run the same number of each
    for tower in ("image", "text"):
        assert ranks[0][f"forward_passes/{tower}"] == ranks[1][f"forward_passes/{tower}"] > 0


def read_shards(root: str) -> tuple[list[Image.Image], list[int]]:
    """Every image and label of a set, read straight from its tar files in shard order."""
    images, labels = [], []
    for shard in sorted(Path(root, "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = sorted(m.name for m in tar.getmembers())
            for name in names:
                data = tar.extractfile(name).read()
                if name.endswith(".png"):
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                else:
                    labels.append(int(data))
    return images, labels


def test_classification_equals_a_direct_computation(world, module, tokenizer):
    # DataLoader workers and batches that straddle the shards: neither may change a number
    callback = ZeroShotClassification("colours", world.cls, batch_size=3, num_workers=2)
    quiet_trainer(callbacks=[callback]).validate(module, de.val_loader(tokenizer), verbose=False)

    images, labels = read_shards(world.cls)
    labels = torch.tensor(labels)
    model = module.model.eval()
    with torch.no_grad():
        pixels = torch.stack([eval_transform(module.image_size)(im) for im in images])
        image_features = model.encode_image(pixels)  # (N, D)
        class_weights = []
        for name in de.CLASSES:  # mean of the normalised prompt embeddings, renormalised
            prompts = tokenizer(
                [t.replace("{c}", name) for t in de.TEMPLATES], padding=True, return_tensors="pt"
            )
            class_weights.append(F.normalize(model.encode_text(**prompts).mean(0), dim=0))
        logits = image_features @ torch.stack(class_weights).T  # (N, C)
    hits = logits.argmax(1) == labels
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1)
    recall = torch.stack([hits[labels == c].float().mean() for c in labels.unique()]).mean()
    assert len(images) == 11
    assert callback.results == {
        "zeroshot/colours/top1": hits.float().mean().item(),
        "zeroshot/colours/top5": top5.float().mean().item(),
        "zeroshot/colours/mean_per_class_recall": pytest.approx(recall.item(), abs=1e-7),
    }


def test_an_hf_classlabel_set_gives_the_numbers_of_the_same_set_in_the_clip_benchmark_layout(
    world, module, tokenizer, tmp_path
):
    import datasets

    images, labels = read_shards(world.cls)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=de.CLASSES)})
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(
        str(tmp_path / "set.parquet")
    )
    callbacks = [
        ZeroShotClassification("wds", world.cls, batch_size=4, num_workers=0),
        ZeroShotClassification(
            "hf",
            "parquet",
            split="train",
            batch_size=4,
            num_workers=0,
            templates=de.TEMPLATES,
            hf_dataset=True,
            dataset_kwargs={"data_files": str(tmp_path / "set.parquet")},
        ),
    ]
    quiet_trainer(callbacks=callbacks).validate(module, de.val_loader(tokenizer), verbose=False)
    assert callbacks[1].classnames == de.CLASSES
    assert list(callbacks[1].results.values()) == list(callbacks[0].results.values())


@pytest.mark.parametrize("kind", ["cls", "ret"])
def test_max_samples_takes_the_first_samples_whatever_the_world_size(world, kind):
    load, root = (load_classification_set, world.cls) if kind == "cls" else (load_retrieval_set, world.ret)
    first = [s.index for s in load(root)][:7]  # the first shard has 4 (cls) or 5 (ret) samples: cross it
    for world_size in (1, 2, 3):
        parts = [
            [s.index for s in load(root, rank=r, world_size=world_size, max_samples=7)]
            for r in range(world_size)
        ]
        assert sorted(i for part in parts for i in part) == first


def test_every_n_steps_evaluates_during_fit_in_eval_mode_without_grad_in_bf16(
    world, module, tokenizer, tmp_path
):
    calls = []  # (model in training mode, autograd on, output dtype) of each image projection

    def record(layer, inputs, output):
        calls.append((module.model.training, torch.is_grad_enabled(), output.dtype))

    module.model.clip.visual_projection.register_forward_hook(record)
    callbacks = [
        ZeroShotClassification("colours", world.cls, batch_size=11, num_workers=0, every_n_steps=2),
        ZeroShotRetrieval("captions", world.ret, batch_size=9, num_workers=0, every_n_steps=2),
    ]
    trainer = quiet_trainer(
        max_steps=4,
        precision="bf16-mixed",
        limit_val_batches=0,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=50,
    )
    trainer.fit(module, train_dataloaders=de.val_loader(tokenizer))

    # a training step, then one image batch per set (evaluation), twice: after steps 2 and 4
    train, evaluate = (True, True, torch.bfloat16), (False, False, torch.bfloat16)
    assert calls == [train, train, evaluate, evaluate, train, train, evaluate, evaluate]
    logged: dict[int, set[str]] = {}  # step -> names of the metrics written at it
    with open(tmp_path / "metrics.csv") as f:
        for row in csv.DictReader(f):
            logged.setdefault(int(row["step"]), set()).update(k for k, v in row.items() if v)
    # written to the logger at once, although log_every_n_steps lets no training step log
    assert {step for step, names in logged.items() if set(CONTRACT_KEYS) <= names} == {2, 4}


class WithTestStep(LitSuperCLIP):
    """The test loop (and so ``on_test_epoch_end``) runs only for a module that has a ``test_step``."""

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)


def test_fit_evaluates_after_validation_but_not_in_the_sanity_check_and_test_evaluates_once(world, tokenizer):
    checkpoint = torch.load(world.ckpt, weights_only=False)
    module = WithTestStep(**checkpoint["hyper_parameters"])
    batch_sizes = []  # of the image projections run in eval mode: 2 = a validation/test step, 11 = evaluation

    def record(layer, inputs, output):
        if not module.model.training:
            batch_sizes.append(len(output))

    module.model.clip.visual_projection.register_forward_hook(record)
    callback = ZeroShotClassification("colours", world.cls, batch_size=11, num_workers=0)
    trainer = quiet_trainer(max_steps=1, num_sanity_val_steps=1, callbacks=[callback])
    loader = de.val_loader(tokenizer)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert batch_sizes == [2, 2, 11]  # sanity check, validation after step 1, its evaluation
    trainer.test(module, dataloaders=loader, verbose=False)
    assert batch_sizes == [2, 2, 11, 2, 11]
    assert set(callback.results) <= set(trainer.callback_metrics)


def test_missing_classnames_fail_at_setup_naming_the_file(tmp_path, module, tokenizer):
    root = de.write_classification_set(tmp_path / "set", classnames=None)
    callback = ZeroShotClassification("colours", str(root), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"set/classnames\.txt not found"):
        quiet_trainer(callbacks=[callback]).validate(module, de.val_loader(tokenizer), verbose=False)


def test_label_outside_the_class_list_fails_naming_the_file(tmp_path, module, tokenizer):
    labels = de.classification_labels(11)
    labels[7] = len(de.CLASSES)
    root = de.write_classification_set(tmp_path / "set", labels=labels)
    callback = ZeroShotClassification("colours", str(root), num_workers=0)
    with pytest.raises(ValueError, match=r"label 7 is outside the 7 classes of .*set/classnames\.txt"):
        quiet_trainer(callbacks=[callback]).validate(module, de.val_loader(tokenizer), verbose=False)


def test_validate_writes_every_metric_to_metrics_json_and_prints_one_table(
    world, one_process, tmp_path, capsys
):
    from superclip_pl.cli.main import main

    checkpoint = torch.load(world.ckpt, weights_only=False)
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "superclip_pl.eval.callbacks.ZeroShotClassification",
                    "init_args": {"name": "colours", "root": world.cls, "batch_size": 4, "num_workers": 0},
                },
                {
                    "class_path": "superclip_pl.eval.callbacks.ZeroShotRetrieval",
                    "init_args": {"name": "captions", "root": world.ret, "num_workers": 0},
                },
            ],
        },
        "model": {"backbone_config": MICRO, "warmup_steps": 0},
        "data": {
            "class_path": "superclip_pl.data.ImageTextDataModule",
            "init_args": {
                "tokenizer": checkpoint["hyper_parameters"]["tokenizer"],
                "val": {"path": "webdataset", "data_files": f"{world.ret}/test/*.tar", "split": "train"},
                "batch_size": 4,
                "num_workers": 0,
            },
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["validate", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", world.ckpt]) == 0

    written = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert {k: written[k] for k in CONTRACT_KEYS} == pytest.approx(
        {k: one_process[k] for k in CONTRACT_KEYS}, abs=1e-6
    )
    table = capsys.readouterr().out.split("Evaluation at step 0:")[1]
    assert [line.split()[0] for line in table.strip().splitlines()[1:10]] == CONTRACT_KEYS
