"""The recipe configs, the one-cycle schedule, weight EMA and `model.pretrained` through the CLI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import timm_to_official
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import nn
from torchvision.transforms import v2

from convmixer_pl.cli import ConvMixerCLI, main
from convmixer_pl.data import DigitsDataModule
from convmixer_pl.model import VARIANTS
from convmixer_pl.module import ConvMixerClassifier

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in ("digits.yaml", "ema.yaml"))
TINY_MODEL = ["--model.dim", "8", "--model.depth", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def data_args(config: str, cifar_root: Path, image_folder: Path) -> list[str]:
    data_class = yaml.safe_load((CONFIGS / config).read_text())["data"]["class_path"]
    if data_class.endswith("CIFARDataModule"):
        return ["--data.init_args.root", str(cifar_root), "--data.init_args.verify_checksums", "false",
                "--data.init_args.val_fraction", "0.1", "--data.init_args.batch_size", "8",
                "--data.init_args.num_workers", "0", "--data.init_args.pin_memory", "false"]
    return ["--data.init_args.root", str(image_folder), "--data.init_args.image_size", "28",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--data.init_args.pin_memory", "false"]


def write_release(path: Path, dim=8, depth=1, kernel_size=7, patch_size=7, num_classes=1000, act=nn.ReLU) -> Path:
    """A file in the official release layout (flat nn.Sequential keys), with random weights."""
    from convmixer_pl.model import ConvMixer

    model = ConvMixer(dim, depth, kernel_size, patch_size, num_classes=num_classes,
                      act="relu" if act is nn.ReLU else "gelu")
    torch.save(timm_to_official(model.state_dict()), path)
    return path


def test_recipe_list_is_complete():
    assert {"cifar10.yaml", "cifar10_25ep_92.yaml", "cifar10_100ep_94.yaml", "cifar10_paper_p1k9.yaml",
            "cifar100.yaml", "imagefolder.yaml", "imagenet_convmixer_1536_20.yaml", "imagenet_convmixer_768_32.yaml",
            "imagenet_convmixer_1024_20_ks9_p14.yaml", "finetune_imagefolder.yaml"} <= set(RECIPES)
    doc = (REPO / "docs" / "reproducing.md").read_text()
    assert all(f"configs/{name}" in doc for name in RECIPES)


@pytest.mark.parametrize("config", RECIPES)
def test_every_recipe_trains_one_step_on_cpu(config, cifar_root, image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    extra = []
    if config.startswith("finetune"):
        extra = ["--model.pretrained", str(write_release(tmp_path / "convmixer_8_1_ks7_p7_relu.pth.tar"))]
    cli = ConvMixerCLI(args=["fit", "--config", str(CONFIGS / config), *data_args(config, cifar_root, image_folder),
                             *TINY_MODEL, *extra, "--trainer.fast_dev_run", "1"])
    assert cli.trainer.global_step == 1
    # the recipe's values reached the objects that use them
    recipe = cli.config["fit"]
    assert cli.model.hparams.lr == recipe.model.lr and cli.model.hparams.opt_eps == recipe.model.opt_eps
    assert cli.trainer.gradient_clip_val == recipe.trainer.gradient_clip_val
    pipeline = {type(t): t for t in cli.datamodule.train_set.transform.transforms}
    ra_ops = recipe.data.init_args.augment.ra_num_ops
    assert (v2.RandAugment in pipeline) == (ra_ops > 0)
    if ra_ops:
        assert pipeline[v2.RandAugment].num_ops == ra_ops
    assert (cli.datamodule.mixer is not None) == (recipe.data.init_args.augment.mixup_alpha > 0)
    if config.startswith("finetune"):
        assert "the head is re-initialised" in capsys.readouterr().err


# the recipes that train a named variant (convmixer_pl.model.VARIANTS); the others state their own architecture
RECIPE_VARIANTS = {"cifar10.yaml": "convmixer_256_8", "cifar10_25ep_92.yaml": "convmixer_256_8",
                   "cifar10_100ep_94.yaml": "convmixer_256_8", "cifar100.yaml": "convmixer_256_8",
                   "imagenet_convmixer_1536_20.yaml": "convmixer_1536_20",
                   "imagenet_convmixer_768_32.yaml": "convmixer_768_32",
                   "imagenet_convmixer_1024_20_ks9_p14.yaml": "convmixer_1024_20_ks9_p14",
                   "finetune_imagefolder.yaml": "convmixer_768_32"}


@pytest.mark.parametrize("config, variant", sorted(RECIPE_VARIANTS.items()))
def test_recipe_architectures_are_their_named_variants(config, variant):
    model = yaml.safe_load((CONFIGS / config).read_text())["model"]
    resolved = {"act": "gelu", **VARIANTS.get(model.get("variant"), {}), **model}  # what model.variant gives
    expected = {"act": "gelu", **VARIANTS[variant]}
    expected.pop("num_classes", None)  # linked from the data module by the CLI
    assert {key: resolved.get(key) for key in expected} == expected


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_variant_flag_builds_that_variant(variant, tmp_path):
    """`--model.variant <variant>` builds exactly that architecture; other flags still apply."""
    cli = ConvMixerCLI(args=["--config", str(CONFIGS / "digits.yaml"), "--model.dim", "null", "--model.depth", "null",
                             "--model.kernel_size", "null", "--model.patch_size", "null", "--model.variant", variant,
                             "--model.lr", "0.02", "--trainer.default_root_dir", str(tmp_path)], run=False)
    hp = cli.model.hparams
    expected = {"act": "gelu", **VARIANTS[variant]}
    expected.pop("num_classes", None)
    assert {key: hp[key] for key in expected} == expected and hp.lr == 0.02
    assert hp.num_classes == 10 and hp.in_chans == 1  # from the digits data module, not the variant


def test_recipes_compose_with_trainer_configs(tmp_path):
    cli = ConvMixerCLI(args=["--config", str(CONFIGS / "cifar10_100ep_94.yaml"),
                             "--trainer", str(CONFIGS / "trainer" / "cpu.yaml"),
                             "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.trainer.max_epochs == 100  # from the recipe
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"  # from trainer/cpu.yaml
    assert cli.trainer.precision == "32-true"


@pytest.mark.parametrize("how", ["file", "flag"])
def test_ema_is_switched_on_from_yaml_or_command_line(how, tmp_path):
    ema = (["--config", str(CONFIGS / "ema.yaml")] if how == "file"
           else ["--trainer.callbacks+=EMAWeightAveraging", "--trainer.callbacks.decay", "0.99"])
    cli = ConvMixerCLI(args=["--config", str(CONFIGS / "digits.yaml"), *ema,
                             "--trainer.default_root_dir", str(tmp_path)], run=False)
    found = [c for c in cli.trainer.callbacks if isinstance(c, EMAWeightAveraging)]
    assert len(found) == 1
    average = found[0]._kwargs["avg_fn"](torch.tensor(0.0), torch.tensor(1.0), 1)  # decay * 0 + (1 - decay) * 1
    assert average.item() == pytest.approx(1 - (0.999 if how == "file" else 0.99))


class RecordSteps(ConvMixerClassifier):
    def training_step(self, batch, batch_idx):
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        return super().training_step(batch, batch_idx)


def tiny(cls=ConvMixerClassifier, **hparams):
    model = cls(dim=8, depth=1, kernel_size=3, patch_size=4, in_chans=1, num_classes=10, **hparams)
    model.lrs = []
    return model


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_one_cycle_lr_read_from_the_optimizer_matches_the_paper(tmp_path):
    """25 epochs of 2 steps: the lr of step i is interp((i+1)/2 epochs, [0, 10, 20, 25], [0, lr, lr/20, 0])."""
    model = tiny(RecordSteps, lr=0.05, weight_decay=0.005, opt_eps=1e-3)
    trainer(tmp_path, max_epochs=25, limit_train_batches=2, limit_val_batches=0).fit(model, DigitsDataModule(
        batch_size=32))
    steps_per_epoch, epochs = 2, 25
    expected = [float(np.interp((i + 1) / steps_per_epoch, [0, epochs * 2 // 5, epochs * 4 // 5, epochs],
                                [0, 0.05, 0.05 / 20, 0])) for i in range(epochs * steps_per_epoch)]
    assert len(model.lrs) == 50
    assert model.lrs == pytest.approx(expected, abs=1e-12)
    # the lr the CIFAR-10 script's README log prints at the end of epochs 0, 10, 19 and 24
    assert [model.lrs[2 * e + 1] for e in (0, 10, 19, 24)] == pytest.approx([0.005, 0.04525, 0.0025, 0.0], abs=1e-9)
    # AdamW with eps 1e-3; weight decay on conv and linear weights only
    optimizer = model.optimizers().optimizer
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["eps"] == 1e-3
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.005 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".weight") and p.ndim > 1 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}


class WeightsSeen(Callback):
    """Records the weights validation runs on, and the current and EMA weights at that moment's training step."""

    def __init__(self, ema: EMAWeightAveraging) -> None:
        self.ema, self.validated, self.current, self.averaged = ema, [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # callbacks run in order: the EMA callback (first in the list) has updated its average already
        self.current = [p.detach().clone() for p in pl_module.parameters()]
        self.averaged = [p.detach().clone() for p in self.ema._average_model.module.parameters()]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.validated.append(([p.detach().clone() for p in pl_module.parameters()], self.current,
                                   self.averaged))


def test_validation_runs_on_the_ema_weights(tmp_path):
    ema = EMAWeightAveraging(decay=0.5)
    seen = WeightsSeen(ema)
    model = tiny(lr=0.05)
    trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
            callbacks=[ema, seen]).fit(model, DigitsDataModule(batch_size=32))
    assert len(seen.validated) == 2
    for validated, current, averaged in seen.validated:
        assert all(torch.equal(v, a) for v, a in zip(validated, averaged, strict=True))
        assert not all(torch.equal(v, c) for v, c in zip(validated, current, strict=True))
    # after fit the model holds the average, which is what checkpoints and `test` then use
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), seen.validated[-1][2], strict=True))


def test_validate_released_weights_without_a_checkpoint(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    release = write_release(tmp_path / "release_relu.pth.tar", num_classes=3)
    args = ["--config", str(CONFIGS / "finetune_imagefolder.yaml"), *TINY_MODEL,
            *data_args("finetune_imagefolder.yaml", tmp_path, image_folder), "--model.pretrained", str(release)]
    cli = ConvMixerCLI(args=["validate", *args, "--name", "released"])
    assert "validate uses the weights of model.pretrained" in capsys.readouterr().err
    saved = torch.load(release)
    assert torch.equal(cli.model.model.stem[0].weight, saved["0.weight"])
    assert torch.equal(cli.model.model.head.weight, saved["6.weight"])  # 3 classes: the file's head is kept
    assert 0.0 <= cli.trainer.callback_metrics["val/acc1"].item() <= 1.0


def test_checkpoint_runs_do_not_need_the_pretrained_file_again(tmp_path, image_folder, monkeypatch):
    """Fine-tune, delete the released file, then test: the checkpoint alone holds the weights."""
    monkeypatch.chdir(tmp_path)
    release = write_release(tmp_path / "release.pth.tar")
    args = ["--config", str(CONFIGS / "finetune_imagefolder.yaml"), *TINY_MODEL,
            *data_args("finetune_imagefolder.yaml", tmp_path, image_folder), "--name", "ft",
            "--model.pretrained", str(release)]
    ConvMixerCLI(args=["fit", *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                       "--trainer.limit_val_batches", "1"])
    release.unlink()
    cli = ConvMixerCLI(args=["test", *args])
    assert cli.model.hparams.pretrained is None
    assert "test/acc1" in cli.trainer.callback_metrics


def test_console_script_fine_tunes_a_release(tmp_path, image_folder, convmixer):
    """End to end through the installed command: it trains, and says in one line that the head is new."""
    good = write_release(tmp_path / "good_relu.pth.tar")
    done = convmixer("fit", "--config", CONFIGS / "finetune_imagefolder.yaml", *TINY_MODEL,
                     *data_args("finetune_imagefolder.yaml", tmp_path, image_folder), "--trainer.fast_dev_run", "1",
                     "--model.pretrained", good, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    told = [line for line in done.stderr.splitlines() if "re-initialised" in line]
    assert told == [f"convmixer: model.pretrained {good}: the file has a 1000-class head, the model 3 classes: "
                    "the head is re-initialised"]


def test_a_release_that_does_not_fit_is_a_one_line_error(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    wrong = write_release(tmp_path / "k9_relu.pth.tar", kernel_size=9)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "finetune_imagefolder.yaml"), *TINY_MODEL,
              *data_args("finetune_imagefolder.yaml", tmp_path, image_folder), "--model.pretrained", str(wrong)])
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("convmixer: error:")]
    assert len(error) == 1 and "wrong shapes [blocks.0.0.fn.0.weight (8, 1, 9, 9) vs (8, 1, 7, 7)]" in error[0]
    assert "kernel_size 9" in error[0]
