"""Every shipped YAML parses and instantiates, so configs cannot drift from the code."""

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from superclip_pl import ImageTextDataModule, LitSuperCLIP
from superclip_pl.cli.main import build_cli, main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# CLIP baselines are fragments: their SuperCLIP run's config plus the differences
BASELINES = {"demo_clip.yaml": "demo.yaml", "vit_b16_datacomp_clip.yaml": "vit_b16_datacomp_superclip.yaml"}
# SuperClass's two stages: the demo's are fragments after demo.yaml; each LiT stage starts from the
# directory its first stage was exported to (a stand-in here)
SUPERCLASS = {
    "demo_superclass.yaml": ("demo.yaml", None),
    "demo_superclass_lit.yaml": ("demo.yaml", "stand-in"),
    "vit_b16_datacomp_superclass_lit.yaml": (None, "stand-in"),
}
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in set(BASELINES) | set(SUPERCLASS))
FRAGMENTS = sorted((CONFIGS / "trainer").glob("*.yaml"))


def test_there_are_configs_to_check():
    names = {p.name for p in RUN_CONFIGS}
    assert {"debug.yaml", "demo.yaml", "vit_b16_datacomp_superclip.yaml"} <= names
    assert set(BASELINES) <= {p.name for p in CONFIGS.glob("*.yaml")} and set(BASELINES.values()) <= names
    assert {p.name for p in FRAGMENTS} == {"ddp.yaml", "fsdp.yaml", "fsdp2.yaml"}


def offline(config: Path, tokenizer_dir: str) -> list[str]:
    """Arguments that make a config instantiable here: the local tokenizer, and the CPU for GPU recipes."""
    args = ["--data.init_args.tokenizer", tokenizer_dir]
    if yaml.safe_load(config.read_text())["trainer"].get("accelerator") == "gpu":
        args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    return args


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_instantiates(config, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written into the repository
    cli = build_cli(["--config", str(config), *offline(config, tokenizer_dir)], run=False)
    assert isinstance(cli.model, LitSuperCLIP) and isinstance(cli.datamodule, ImageTextDataModule)
    raw = yaml.safe_load(config.read_text())
    assert cli.model.hparams.class_loss_weight == raw["model"]["class_loss_weight"]
    assert cli.model.hparams.backbone == raw["model"]["backbone"]
    assert cli.datamodule.image_size == cli.model.image_size  # linked from the model
    assert cli.trainer.max_steps == raw["trainer"]["max_steps"] > 0  # streaming: steps drive training


def flat(config: dict, prefix: str = "") -> dict:
    """A nested config as {dotted key: value}; lists of class specs (callbacks) flatten by position."""
    out = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for k, v in items:
        key = f"{prefix}{k}"
        out |= flat(v, key + ".") if isinstance(v, dict | list) and v else {key: v}
    return out


@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_a_clip_baseline_is_its_superclip_run_without_the_classification_loss(
    baseline, tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    run = CONFIGS / BASELINES[baseline]
    superclip = build_cli(["--config", str(run), *offline(run, tokenizer_dir)], run=False)
    clip = build_cli(
        ["--config", str(run), "--config", str(CONFIGS / baseline), *offline(run, tokenizer_dir)], run=False
    )
    weight = yaml.safe_load(run.read_text())["model"]["class_loss_weight"]  # the demo's is its own
    assert superclip.model.hparams.class_loss_weight == weight > 0 and superclip.model.model.head is not None
    assert clip.model.hparams.class_loss_weight == 0.0 and clip.model.model.head is None
    a, b = flat(superclip.config.as_dict()), flat(clip.config.as_dict())
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    # `config` lists the files given: one more for the baseline
    assert differ == {"model.class_loss_weight", "trainer.logger.init_args.name", "config.1"}


def test_paper_recipe_values():
    cfg = yaml.safe_load((CONFIGS / "vit_b16_datacomp_superclip.yaml").read_text())
    m, d, t = cfg["model"], cfg["data"]["init_args"], cfg["trainer"]
    assert (m["lr"], m["betas"], m["eps"], m["weight_decay"], m["warmup_steps"]) == (
        1e-3,
        [0.9, 0.98],
        1e-6,
        0.2,
        500,
    )
    assert d["global_batch_size"] == 16384 and t["max_steps"] * 16384 >= 512_000_000
    assert t["precision"] == "bf16-mixed" and m["gradient_checkpointing"] is True


@pytest.mark.parametrize("fragment", ["ddp.yaml", "fsdp2.yaml"])
def test_strategy_fragments_instantiate(fragment, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "--config",
        str(CONFIGS / "debug.yaml"),
        "--config",
        str(CONFIGS / "trainer" / fragment),
        "--data.init_args.tokenizer",
        tokenizer_dir,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.precision",
        "32-true",
    ]
    cli = build_cli(args, run=False)
    expected = {"ddp.yaml": DDPStrategy, "fsdp2.yaml": ModelParallelStrategy}[fragment]
    assert isinstance(cli.trainer.strategy, expected)
    assert cli.trainer.num_devices == 2


def test_fsdp_fragment_parses_and_wraps_encoder_layers(tokenizer_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fragment = CONFIGS / "trainer" / "fsdp.yaml"
    # FSDP refuses a CPU accelerator, so the full config is parsed and type-checked, and the strategy
    # is built on its own
    assert (
        main(["fit", "--config", str(CONFIGS / "debug.yaml"), "--config", str(fragment), "--print_config"])
        == 0
    )
    assert "FSDPStrategy" in capsys.readouterr().out
    init = yaml.safe_load(fragment.read_text())["trainer"]["strategy"]["init_args"]
    strategy = FSDPStrategy(
        auto_wrap_policy={CLIPEncoderLayer},
        activation_checkpointing_policy={CLIPEncoderLayer},
        sharding_strategy=init["sharding_strategy"],
        state_dict_type=init["state_dict_type"],
    )
    assert init["auto_wrap_policy"] == ["transformers.models.clip.modeling_clip.CLIPEncoderLayer"]
    assert strategy.sharding_strategy.name == "FULL_SHARD"


def test_mixed_captions_recipe_parses_into_weighted_sources(tokenizer_dir, tmp_path, monkeypatch):
    from superclip_pl.data import DataSource

    monkeypatch.chdir(tmp_path)
    config = CONFIGS / "vit_b16_mixed_captions_superclip.yaml"
    cli = build_cli(["--config", str(config), *offline(config, tokenizer_dir)], run=False)
    train = cli.datamodule.train
    assert isinstance(train, list) and all(isinstance(s, DataSource) for s in train)
    assert [(s.name, s.weight) for s in train] == [("web", 0.5), ("recap", 0.5)]
    assert train[1].text_column == {"txt": 0.5, "re_caption.txt": 0.5}
    assert train[0].image_column == ["jpg", "png", "webp"]
    assert cli.model.hparams.class_max_length == 128 == cli.datamodule.class_max_length


EVAL_FRAGMENTS = sorted((CONFIGS / "eval").glob("*.yaml"))
# DataComp's main metric per set where it is not top-1 (mlfoundations/datacomp tasklist.yml)
DATACOMP_NOT_TOP1 = {
    "caltech101": "mean_per_class_recall",
    "fgvc_aircraft": "mean_per_class_recall",
    "flowers": "mean_per_class_recall",
    "pets": "mean_per_class_recall",
    "flickr30k": "mean_R@1",
    "mscoco": "mean_R@1",
}


@pytest.mark.parametrize("fragment", EVAL_FRAGMENTS, ids=lambda p: p.name)
def test_eval_fragments_replace_the_run_callbacks_with_their_sets(
    fragment, tokenizer_dir, tmp_path, monkeypatch
):
    from superclip_pl.eval.evaluation import SetEvaluation

    monkeypatch.chdir(tmp_path)
    debug = CONFIGS / "debug.yaml"
    cli = build_cli(
        ["--config", str(debug), "--config", str(fragment), *offline(debug, tokenizer_dir)], run=False
    )
    evaluations = [c for c in cli.trainer.callbacks if isinstance(c, SetEvaluation)]
    listed = yaml.safe_load(fragment.read_text())["trainer"]["callbacks"]
    assert [(c.name, c.root) for c in evaluations] == [
        (spec["init_args"]["name"], spec["init_args"]["root"]) for spec in listed
    ]
    assert len({c.name for c in evaluations}) == len(evaluations)
    assert all(c.root.startswith(("clip-benchmark/wds_", "djghosh/wds_")) for c in evaluations)


def test_the_datacomp_suite_scores_each_set_as_datacomp_does(tokenizer_dir, tmp_path, monkeypatch):
    from superclip_pl import ZeroShotRetrieval

    monkeypatch.chdir(tmp_path)
    debug = CONFIGS / "debug.yaml"
    suite = CONFIGS / "eval" / "datacomp.yaml"
    cli = build_cli(
        ["--config", str(debug), "--config", str(suite), *offline(debug, tokenizer_dir)], run=False
    )
    evaluations = {c.name: c for c in cli.trainer.callbacks if hasattr(c, "main_metric")}
    assert len(evaluations) == 33 and {"imagenet1k", "mscoco", "flickr30k"} <= set(evaluations)
    for name, c in evaluations.items():
        assert c.main_metric == DATACOMP_NOT_TOP1.get(name, "top1"), name
        assert isinstance(c, ZeroShotRetrieval) == (name in ("flickr30k", "mscoco"))


@pytest.mark.parametrize("stage", sorted(SUPERCLASS))
def test_superclass_stages_instantiate_and_share_the_budget(
    stage, tokenizer_dir, tokenizer, tmp_path, monkeypatch
):
    from transformers import CLIPConfig, CLIPModel

    from conftest import MICRO

    monkeypatch.chdir(tmp_path)
    base, backbone = SUPERCLASS[stage]
    configs = [CONFIGS / base, CONFIGS / stage] if base else [CONFIGS / stage]
    args = [a for c in configs for a in ("--config", str(c))] + offline(configs[0], tokenizer_dir)
    if backbone:  # a stand-in for the first stage's export: an HF CLIP of our tokenizer
        ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
        text = {**MICRO["text_config"], "vocab_size": len(tokenizer), **ids}
        config = CLIPConfig(**{**MICRO, "text_config": text})
        CLIPModel(config).save_pretrained(tmp_path / "stage1")
        args += ["--model.backbone", str(tmp_path / "stage1")]
    model = build_cli(args, run=False).model
    hp, raw = model.hparams, yaml.safe_load((CONFIGS / stage).read_text())
    trainable = {n for n, p in model.model.clip.named_parameters() if p.requires_grad}
    if backbone:  # LiT: the image tower locked but its projection, no head, the text tower trained
        assert hp.lock_image and hp.lock_image_unlocked_layers == 1 and model.model.head is None
        assert {n for n in trainable if "vision" in n or "visual" in n} == {"visual_projection.weight"}
        assert "text_model.encoder.layers.0.mlp.fc1.weight" in trainable
    else:  # the class-only stage: the image tower and the head
        assert hp.contrastive_loss_weight == 0 and model.model.head is not None
        assert not any(n.startswith("text_") for n in trainable)
    if base:  # the demo's two stages share its budget: half each
        demo = yaml.safe_load((CONFIGS / base).read_text())["trainer"]["max_steps"]
        assert raw["trainer"]["max_steps"] * 2 == demo
    else:  # the reference's LiT stage: 512M samples at 16384, lr 5e-4 like its class-only stage
        first = yaml.safe_load((CONFIGS / "vit_b16_datacomp_superclass.yaml").read_text())
        for cfg in (raw, first):
            m, t = cfg["model"], cfg["trainer"]
            assert (m["lr"], m["warmup_steps"], t["max_steps"]) == (5e-4, 500, 31250)
            assert cfg["data"]["init_args"]["global_batch_size"] == 16384
