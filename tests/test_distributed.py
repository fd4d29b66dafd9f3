"""DDP on two CPU processes (gloo) through the installed `convmixer` command, plus the scale-out configs.

One `fit` launch (2 epochs) feeds every DDP check; `fit --ckpt_path` (resume), `test` and `predict` then run at
the same time, each with its own port and log folder. `RankProbe` is a callback the ranks import from this file
(PYTHONPATH=tests/): every rank writes what it saw (its shard of the training set, the learning rate of each step,
the metrics it holds) to JSON, and the tests compare the ranks with each other and with a one-process evaluation
of the same checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, convmixer_command
from lightning.pytorch.plugins import TorchSyncBatchNorm
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.modules.batchnorm import _BatchNorm

from convmixer_pl.checkpoints import best_or_last
from convmixer_pl.cli import CLIError, ConvMixerCLI, main
from convmixer_pl.data import DigitsDataModule
from convmixer_pl.model import ConvMixer
from convmixer_pl.module import ConvMixerClassifier, one_cycle

WORLD, BATCH, EPOCHS, IMAGE, LR = 2, 64, 2, 8, 0.01
SMALL = ["--config", str(CONFIGS / "digits.yaml"), "--trainer", str(CONFIGS / "trainer" / "ddp_cpu.yaml"),
         "--model.dim", "16", "--model.depth", "1", "--model.kernel_size", "3", "--model.lr", str(LR),
         "--data.image_size", str(IMAGE), "--data.batch_size", str(BATCH), "--trainer.max_epochs", str(EPOCHS),
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--plots.enabled", "false"]


class RankProbe(L.Callback):
    """Test-only: each rank writes `<out_dir>/<stage>-rank<N>.json` with what it trained on and the metrics it holds."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen = {"shards": {}, "lrs": [], "test_samples": 0}

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen["start_step"] = trainer.global_step
        self.seen["norms"] = sorted({type(m).__name__ for m in pl_module.modules() if isinstance(m, _BatchNorm)})

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # the training sampler yields (epoch, index): the index picks the image, both seed its augmentation
        self.seen["shards"][trainer.current_epoch] = [int(i) for _, i in trainer.train_dataloader.sampler]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen["lrs"].append(trainer.optimizers[0].param_groups[0]["lr"])  # the lr this step uses

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["test_samples"] += len(batch[1])

    def on_fit_end(self, trainer, pl_module) -> None:
        self._dump(trainer, "fit", global_step=trainer.global_step, stepping=trainer.estimated_stepping_batches)

    def on_test_end(self, trainer, pl_module) -> None:
        self._dump(trainer, "test", ckpt_path=str(trainer.ckpt_path))

    def _dump(self, trainer, stage: str, **extra) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.split("/")[0] in ("train", "val",
                                                                                                   "test")}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {**self.seen, **extra, "metrics": metrics}
        (self.out_dir / f"{stage}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args, cwd: Path, probe: Path | None = None) -> subprocess.Popen:
    """Start the installed `convmixer` command; DDP ranks re-run the same command line."""
    command = convmixer_command()
    probe_args = ["--trainer.callbacks+=test_distributed.RankProbe", "--trainer.callbacks.out_dir", probe] if probe \
        else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "COLUMNS": "200"}
    env.pop("CONVMIXER_DEBUG", None)
    return subprocess.Popen([command, *map(str, args), *map(str, probe_args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launch's own group: rank 0 and the ranks it started
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"convmixer {result.args[1]} failed ({result.returncode}):\n{result.stderr[-3000:]}"


def _ranks(folder: Path, stage: str) -> list[dict]:
    files = sorted(folder.glob(f"{stage}-rank*.json"))
    assert [f.name for f in files] == [f"{stage}-rank{r}.json" for r in range(WORLD)], files
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    """`convmixer fit` under DDP, then resume, test and predict of its checkpoints, all with 2 CPU processes."""
    root = tmp_path_factory.mktemp("ddp")
    run = root / "checkpoints" / "ddp"
    fit = _finish(_launch("fit", *SMALL, "--name", "ddp", "--checkpoint.save_top_k", "-1", cwd=root,
                          probe=root / "probe_fit"))
    _succeeded(fit)
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())  # before the next runs add logs
    jobs = {
        "resume": _launch("fit", *SMALL, "--name", "resumed", "--ckpt_path", run / "epoch000.ckpt", cwd=root,
                          probe=root / "probe_resume"),
        "test": _launch("test", *SMALL, "--name", "ddp", "--trainer.default_root_dir", root / "test_logs", cwd=root,
                        probe=root / "probe_test"),
        "predict": _launch("predict", *SMALL, "--name", "ddp", "--trainer.default_root_dir", root / "predict_logs",
                           "--predictions.output", root / "predictions" / "predictions.csv", cwd=root),
    }
    results = {name: _finish(proc) for name, proc in jobs.items()}  # each test checks its own job succeeded
    return {"root": root, "run": run, "files": files, "fit": fit, **results}


def _train_size() -> int:
    data = DigitsDataModule(image_size=IMAGE)
    data.setup("fit")
    return len(data.train_set)


def _evaluate(ckpt: Path, split: str) -> tuple[float, float, torch.Tensor]:
    """Top-1 accuracy, mean loss and probabilities of one process over a whole split: the reference for DDP."""
    model = ConvMixerClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    data = DigitsDataModule(image_size=IMAGE)
    data.setup()
    dataset = getattr(data, f"{split}_set")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(images)
    targets = dataset.targets
    return (logits.argmax(1) == targets).double().mean().item(), F.cross_entropy(logits, targets).item(), \
        logits.softmax(1)


def test_fit_shards_data_steps_schedule_and_writes_once(ddp):
    n = _train_size()
    steps_per_epoch = math.ceil(n / WORLD) // BATCH  # batch size per process; drop_last on each rank's shard
    assert steps_per_epoch < n // BATCH  # one process would take more steps: the shards are really halves
    total = steps_per_epoch * EPOCHS
    ranks = _ranks(ddp["root"] / "probe_fit", "fit")

    # each rank trains on its own half of the training set, a new split each epoch
    for epoch in map(str, range(EPOCHS)):
        shards = [set(rank["shards"][epoch]) for rank in ranks]
        assert len(shards[0]) == len(shards[1]) == math.ceil(n / WORLD)
        assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(n))
    assert ranks[0]["shards"]["0"] != ranks[0]["shards"]["1"]

    # the one-cycle schedule is sized by the steps one process really takes (Lightning counts its shard)
    expected_lrs = [pytest.approx(LR * one_cycle(step + 1, total)) for step in range(total)]
    for rank in ranks:
        assert rank["global_step"] == rank["stepping"] == total
        assert rank["lrs"] == expected_lrs
        assert rank["norms"] == ["BatchNorm2d"]  # sync_batchnorm is off by default

    # metrics are synced: every rank holds the same values, and validation equals one process on the whole split
    keys = [k for k in ranks[0]["metrics"] if k.startswith(("val/", "train/loss", "train/acc1"))]
    assert {"val/acc1", "val/loss", "train/loss_epoch", "train/acc1"} <= set(keys)
    assert all(ranks[0]["metrics"][k] == ranks[1]["metrics"][k] for k in keys)
    rates = [rank["metrics"]["train/images_per_sec"] for rank in ranks]  # one figure for the run, synced
    assert rates[0] == rates[1] > 0
    assert "sync_dist" not in ddp["fit"].stderr  # no warning that an epoch-level metric is left unsynced
    acc1, loss, _ = _evaluate(ddp["run"] / "last.ckpt", "val")
    assert ranks[0]["metrics"]["val/acc1"] == pytest.approx(acc1, abs=1e-6)
    assert ranks[0]["metrics"]["val/loss"] == pytest.approx(loss, rel=1e-5)

    # checkpoints, logs and the config exist once: rank 0 wrote them, no other rank added its own
    state = torch.load(ddp["run"] / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == total and state["epoch"] == EPOCHS - 1
    ckpts = [f for f in ddp["files"] if f.endswith(".ckpt")]
    assert ckpts == ["epoch000.ckpt", "epoch001.ckpt", "last.ckpt"]
    assert [f for f in ddp["files"] if f.endswith("config.yaml")] == ["lightning_logs/version_0/config.yaml"]
    assert {Path(f).parts[1] for f in ddp["files"] if f.startswith("lightning_logs/")} == {"version_0"}


def test_resume_under_ddp_continues_the_run(ddp):
    _succeeded(ddp["resume"])
    total = _ranks(ddp["root"] / "probe_fit", "fit")[0]["global_step"]
    ranks = _ranks(ddp["root"] / "probe_resume", "fit")
    for rank in ranks:
        assert rank["start_step"] == total // EPOCHS  # restored after epoch 0, not started afresh
        assert list(rank["shards"]) == ["1"]
        expected = [pytest.approx(LR * one_cycle(step + 1, total)) for step in range(total // EPOCHS, total)]
        assert rank["lrs"] == expected  # the schedule picks up where it stopped
    resumed = ddp["root"] / "checkpoints" / "resumed"
    assert sorted(p.name for p in resumed.glob("*.ckpt")) == ["epoch001.ckpt", "last.ckpt"]
    # the same weights as the run that was never interrupted (sharding and order depend on seed and epoch only)
    a = torch.load(ddp["run"] / "epoch001.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "last.ckpt", map_location="cpu", weights_only=False)
    assert b["global_step"] == a["global_step"] == total
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key])


def test_test_under_ddp_equals_one_process(ddp):
    _succeeded(ddp["test"])
    ranks = _ranks(ddp["root"] / "probe_test", "test")
    ckpt = best_or_last(ddp["run"])
    assert all((ddp["root"] / rank["ckpt_path"]).resolve() == ckpt.resolve() for rank in ranks)
    acc1, loss, _ = _evaluate(ckpt, "test")
    data = DigitsDataModule(image_size=IMAGE)
    data.setup()
    # every test image evaluated exactly once across the ranks (Lightning's default would repeat one of 359)
    assert sum(rank["test_samples"] for rank in ranks) == len(data.test_set) == 359
    for rank in ranks:
        assert rank["metrics"]["test/acc1"] == pytest.approx(acc1, abs=1e-6)
        assert rank["metrics"]["test/loss"] == pytest.approx(loss, rel=1e-5)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]


def test_predict_under_ddp_writes_one_ordered_file(ddp):
    _succeeded(ddp["predict"])
    outputs = sorted(p.name for p in (ddp["root"] / "predictions").iterdir())
    assert outputs == ["predictions.csv"]
    with open(ddp["root"] / "predictions" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    _, _, probs = _evaluate(best_or_last(ddp["run"]), "test")
    assert [int(row["index"]) for row in rows] == list(range(len(probs)))  # complete, in sample order, no repeats
    top = probs.max(1)
    assert [int(row["class1"]) for row in rows] == top.indices.tolist()
    assert [float(row["prob1"]) for row in rows] == pytest.approx(top.values.tolist(), abs=2e-6)
    assert ddp["predict"].stderr.count("predictions written to") == 1


def test_sync_batchnorm_converts_every_batchnorm(tmp_path, monkeypatch):
    """`trainer.sync_batchnorm: true` gives the DDP strategy Lightning's TorchSyncBatchNorm, which converts all
    2*depth+1 BatchNorm layers and keeps the state-dict keys (checkpoints load with or without it)."""
    monkeypatch.chdir(tmp_path)
    cli = ConvMixerCLI(args=["--config", str(CONFIGS / "digits.yaml"), "--trainer",
                             str(CONFIGS / "trainer" / "ddp_cpu.yaml"), "--trainer.sync_batchnorm", "true",
                             "--model.dim", "16", "--model.depth", "3", "--trainer.logger", "false"], run=False)
    layer_sync = cli.trainer.strategy._layer_sync
    assert isinstance(layer_sync, TorchSyncBatchNorm)
    keys = cli.model.state_dict().keys()
    converted = layer_sync.apply(cli.model)
    norms = [type(m) for m in converted.modules() if isinstance(m, _BatchNorm)]
    assert norms == [torch.nn.SyncBatchNorm] * (2 * 3 + 1)
    assert converted.state_dict().keys() == keys


def test_fsdp_config_wraps_the_blocks_of_convmixer_1536_20():
    """configs/trainer/fsdp.yaml builds an FSDPStrategy with full checkpoints whose wrap policy makes the stem and
    every block an FSDP unit and leaves only the head in the root. (Running FSDP needs GPUs.)"""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    parser.add_argument("--accelerator", type=str)
    parser.add_argument("--devices", type=int)
    parser.add_argument("--precision", type=str)
    strategy = parser.instantiate(parser.parse_path(CONFIGS / "trainer" / "fsdp.yaml")).strategy
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)

    with torch.device("meta"):  # the real 51.6M-parameter shape, without allocating it
        model = ConvMixer(1536, 20, kernel_size=9, patch_size=7)
    wrapped = [name for name, m in model.named_modules() if name and policy(module=m, recurse=False,
                                                                              nonwrapped_numel=0)]
    assert "stem" in wrapped and all(f"blocks.{i}" in wrapped for i in range(20))
    in_units = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("stem.", "blocks.")))
    assert sum(p.numel() for p in model.parameters()) - in_units == 1536 * 1000 + 1000  # the head alone


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without a GPU")
def test_gpu_only_configs_without_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--config", str(CONFIGS / "digits.yaml"), "--model.dim", "8", "--model.depth", "1",
            "--data.image_size", "8", "--trainer.enable_progress_bar", "false", "--plots.enabled", "false",
            "--overwrite", "true"]
    # FSDP: one CPU process, said in one line
    main(["fit", *tiny, "--trainer", str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.fast_dev_run", "1"])
    err = capsys.readouterr().err
    assert "no GPU found; falling back: accelerator gpu -> cpu, devices -1 -> 1, strategy FSDPStrategy -> auto" in err
    # multi-node: a clear refusal, not a process waiting forever for the other nodes
    with pytest.raises(CLIError, match="trainer.num_nodes is 2 with accelerator gpu, but this machine has no GPU"):
        ConvMixerCLI(args=["fit", *tiny, "--trainer", str(CONFIGS / "trainer" / "multinode.yaml")])
    # FSDP asked for on the CPU: Lightning's own message, as a one-line error
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny, "--trainer", str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.accelerator", "cpu",
              "--trainer.devices", "2"])
    assert exit_info.value.code == 2
    assert "convmixer: error: The strategy `fsdp` requires a GPU accelerator" in capsys.readouterr().err



def test_non_finite_loss_stops_every_process_with_one_message(tmp_path):
    """The loss check and the signal check share one all-reduce per step: both processes agree and stop."""
    result = _finish(_launch("fit", *SMALL, "--name", "nan", "--model.lr", "1e30", "--model.scheduler", "constant",
                             "--trainer.gradient_clip_val", "null", "--trainer.max_epochs", "1", cwd=tmp_path),
                     timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("convmixer: error: the training loss is") == 1, result.stderr[-3000:]
