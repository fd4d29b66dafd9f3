"""The official CIFAR-10 script beside `convmixer fit`, in one run, on the same real images (docs/real_cifar10.md).

The official script is `train.py` of a clone of github.com/locuslab/convmixer-cifar10 ($CONVMIXER_OFFICIAL_REPO),
patched at run time to train on the CIFAR-10 JPEG tarball's images ($CONVMIXER_CIFAR10_JPG) on the CPU or a GPU;
a changed upstream script fails in one line. The runners take turns for every seed (a slow spell hits both); each
run's wall time, training images/s and final test accuracy are printed, with their spread over seeds and ratios.

    python -m benchmarks.official --tarball cifar10-jpg.tar.gz --official_repo convmixer-cifar10 \\
        --recipe.hdim 128 --recipe.depth 6 --recipe.batch_size 128 --recipe.epochs 3 --seeds [0,1,2] --threads 2
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jsonargparse import CLI

from convmixer_pl.benchmark import cpu_name, run_metrics
from convmixer_pl.console import run_entry_point
from convmixer_pl.files import atomic_write
from convmixer_pl.sweep.trials import fit_command as convmixer_command  # also without the package installed

ENV_REPO, ENV_DATA = "CONVMIXER_OFFICIAL_REPO", "CONVMIXER_CIFAR10_JPG"
NOT_FOUND = f"no clone of github.com/locuslab/convmixer-cifar10: pass --official_repo DIR or set {ENV_REPO}"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
REPO = Path(__file__).resolve().parents[1]
CIFAR_MEAN, CIFAR_STD = "[0.4914,0.4822,0.4465]", "[0.2471,0.2435,0.2616]"  # the official script's


class OfficialNotFound(ValueError):
    """No clone of the official repository was given."""


class PatchError(ValueError):
    """A patch's text did not occur as often as expected: the upstream script changed."""


@dataclass(frozen=True)
class Recipe:
    """The official script's flags under its own names (`--conv-ks` is conv_ks) and defaults; both runners'."""

    batch_size: int = 512
    epochs: int = 25
    hdim: int = 256
    depth: int = 8
    psize: int = 2
    conv_ks: int = 5
    scale: float = 0.75
    reprob: float = 0.25
    ra_m: int = 8
    ra_n: int = 1
    jitter: float = 0.1
    lr_max: float = 0.01
    wd: float = 0.01
    workers: int = 2

    def official_flags(self) -> list[str]:
        """`--batch-size 512 --epochs 25 ...`: the script's own argparse names."""
        return [word for name, value in dataclasses.asdict(self).items()
                for word in (f"--{name.replace('_', '-')}", str(value))]

    def schedule_warning(self) -> str | None:
        """The official one-cycle breakpoints are integer epochs: the same as ours only for multiples of 5."""
        e = self.epochs
        return None if e % 5 == 0 else (
            f"epochs {e} is not a multiple of 5: the official one-cycle breakpoints are epochs {e * 2 // 5} and "
            f"{e * 4 // 5} (integer division), ours {e * 2 / 5:g} and {e * 4 / 5:g}, so the schedules differ")


def official_source(repo: str | os.PathLike | None = None) -> tuple[str, str]:
    """(the text of train.py, its path) from the clone `repo`, else $CONVMIXER_OFFICIAL_REPO."""
    repo = repo or os.environ.get(ENV_REPO)
    if not repo:
        raise OfficialNotFound(NOT_FOUND)
    script = Path(repo) / "train.py"
    if not script.is_file():
        raise OfficialNotFound(f"{NOT_FOUND} ({script} is not a file)")
    return script.read_text(), str(script)


Patch = namedtuple("Patch", "name why old new count", defaults=(1,))  # count: how many times `old` must occur


_DATASET = """{name} = torchvision.datasets.CIFAR10(root='./data', train={train},
{indent}download=True, transform={split}_transform)"""


def patches(device: str) -> list[Patch]:
    """Every change made to the script, for `device` ('cpu', 'cuda' or 'cuda:N')."""
    cpu = device == "cpu"
    found = [
        Patch("imports", "modules the patches below use",
              "import argparse\n", "import argparse\nimport contextlib\nimport os\nimport random\n"),
        Patch("flags", "the image folder to read, and a seed (the script seeds nothing)",
              "parser.add_argument('--workers', default=2, type=int)\n",
              "parser.add_argument('--workers', default=2, type=int)\nparser.add_argument('--data-root', "
              "required=True)\nparser.add_argument('--seed', default=0, type=int)\n"),
        Patch("seed", "the same initial weights, order and augmentation for a given seed; the device",
              "args = parser.parse_args()\n", "args = parser.parse_args()\ntorch.manual_seed(args.seed)\n"
              f"np.random.seed(args.seed)\nrandom.seed(args.seed)\nDEVICE = torch.device({device!r})\n"),
        *(Patch(f"{split}-images", "the local JPEG folder instead of the CIFAR-10 download; ImageFolder yields PIL "
                "images as CIFAR10 does, so the script's transforms stay as they are",
                _DATASET.format(name=name, train=split == "train", indent=" " * (len(name) + 32), split=split),
                f"{name} = torchvision.datasets.ImageFolder(os.path.join(args.data_root, '{split}'), "
                f"transform={split}_transform)") for split, name in (("train", "trainset"), ("test", "testset"))),
        Patch("model-device", "the chosen device; nn.DataParallel only on a GPU (on the CPU it does nothing)",
              "model = nn.DataParallel(model).cuda()",
              "model = model.to(DEVICE)" if cpu else "model = nn.DataParallel(model).to(DEVICE)"),
        Patch("batch-device", "the chosen device", "X, y = X.cuda(), y.cuda()", "X, y = X.to(DEVICE), y.to(DEVICE)",
              count=2),
        Patch("train-time", "the training loop's own time: the printed Time also holds the test pass",
              "    model.eval()\n    test_acc, m = 0, 0\n",
              "    train_time = time.time() - start\n    model.eval()\n    test_acc, m = 0, 0\n"),
        Patch("train-time-line", "print it, with the number of images trained on, after the script's own line",
              ", lr: {lr:.6f}')", ", lr: {lr:.6f}')\n    print(f'[{args.name}] Epoch: {epoch} | Train Time: "
              "{train_time:.3f}, Train Images: {n}')"),
    ]
    if cpu:  # the CPU has no fp16 autocast: fp32, and a disabled scaler is the identity
        found += [Patch("autocast-fp32", "fp32 on the CPU (fp16 AMP exists only on CUDA)",
                        "with torch.cuda.amp.autocast():", "with contextlib.nullcontext():", count=2),
                  Patch("scaler-off", "no loss scaling in fp32: a disabled GradScaler passes everything through",
                        "scaler = torch.cuda.amp.GradScaler()",
                        "scaler = torch.amp.GradScaler('cpu', enabled=False)")]
    return found


def patch_source(source: str, device: str) -> str:
    """`source` with every patch applied; PatchError names the first that does not match."""
    for patch in patches(device):
        if source.count(patch.old) != patch.count:
            raise PatchError(f"patch {patch.name!r}: expected {patch.count} occurrence(s) of {patch.old!r} in the "
                             f"official train.py, found {source.count(patch.old)}; the upstream script changed, "
                             "update benchmarks/official.py")
        source = source.replace(patch.old, patch.new)
    return source


def image_root(tarball: str | None, root: str | None, work: Path) -> Path:
    """A folder with train/ and test/: `root`, else `tarball` (or $CONVMIXER_CIFAR10_JPG) extracted in `work`."""
    if root:
        return Path(root).resolve()
    tarball = tarball or os.environ.get(ENV_DATA)
    if not tarball or not Path(tarball).is_file():
        raise ValueError(f"no CIFAR-10 JPEG tarball{f' at {tarball}' if tarball else ''}: pass --tarball FILE or "
                         f"--data_root DIR, or set {ENV_DATA}")
    dest, start = work / "data", time.perf_counter()
    with tarfile.open(tarball) as archive:
        archive.extractall(dest, filter="data")  # no absolute paths or links out of dest
    for found in (dest, *sorted(p for p in dest.iterdir() if p.is_dir())):
        if (found / "train").is_dir() and (found / "test").is_dir():
            print(f"extracted {tarball} in {time.perf_counter() - start:.1f} s")
            return found
    raise ValueError(f"{tarball}: no train/ and test/ folders in it")


def _images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def count_images(folder: Path) -> int:
    return sum(len(_images(c)) for c in Path(folder).iterdir() if c.is_dir())


def subset_root(root: Path, n: int, seed: int, dest: Path) -> Path:
    """`dest` with `train/` linking a fixed seeded subset of `n` training images (stratified: each class gets
    n // classes, the first n % classes one more) and `test/` linking the whole test set."""
    classes = sorted(c.name for c in (root / "train").iterdir() if c.is_dir())
    rng = random.Random(seed)
    for i, name in enumerate(classes):
        files = _images(root / "train" / name)
        rng.shuffle(files)
        take = n // len(classes) + (i < n % len(classes))
        if take > len(files):
            raise ValueError(f"--train_subset {n}: class {name} has only {len(files)} training images")
        (dest / "train" / name).mkdir(parents=True, exist_ok=True)
        for file in sorted(files[:take]):
            (dest / "train" / name / file).symlink_to(root / "train" / name / file)
    if not (dest / "test").exists():
        (dest / "test").symlink_to(root / "test", target_is_directory=True)
    return dest


@dataclass
class Run:
    """One training command (the official script or `convmixer fit`) and what it gave."""

    runner: str
    seed: int
    command: list[str]
    log: str
    wall_s: float | None = None
    returncode: int | None = None
    timed_out: bool = False
    epochs: list[dict] = field(default_factory=list)  # epoch, images_per_sec, test_acc, ...
    train_images_per_sec: float | None = None  # median over the epochs after the first
    final_test_acc: float | None = None
    error: str | None = None
    notes: dict = field(default_factory=dict)  # more figures of this run

    def execute(self, timeout_s: float | None = None, env: dict | None = None, cwd: Path | None = None,
                grace_s: float = 20, in_process: bool = False) -> Run:
        """Run the command, output into the log, timed; past `timeout_s` its process group gets SIGTERM (ours saves
        and stops), then SIGKILL `grace_s` later. `in_process`: `convmixer` here (no start-up, no time limit)."""
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.log, "w") as out:  # its own group: loader workers are stopped with it
            if in_process:
                self.returncode = _convmixer_here(self.command[3:], out, cwd)
            else:
                proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                        start_new_session=True)
                for sig, wait_s in ((None, timeout_s), (signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
                    if sig is not None:  # past its time: the whole group (gone already: nothing to stop)
                        self.timed_out = True
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.returncode = proc.wait(timeout=wait_s)
                        break
        self.wall_s = time.perf_counter() - start
        if self.timed_out:
            self.error = f"stopped at its time budget of {timeout_s:.0f} s"
        elif self.returncode != 0:
            lines = tail(self.log, 200).splitlines()
            self.error = f"exit code {self.returncode}: " + next(
                (line.strip() for line in reversed(lines) if "error:" in line.lower()), " | ".join(lines[-5:]))
        return self

    def summarise(self, epochs: list[dict]) -> Run:
        self.epochs = epochs
        self.train_images_per_sec = steady([e.get("images_per_sec") for e in epochs])
        self.final_test_acc = epochs[-1].get("test_acc") if epochs else None
        return self

    def describe(self) -> str:
        num = lambda value, fmt: "unknown" if value is None else format(value, fmt)  # noqa: E731
        lines = [f"{self.runner} (seed {self.seed}): wall {num(self.wall_s, '.1f')} s, {len(self.epochs)} epoch(s), "
                 f"train images/s {num(self.train_images_per_sec, '.1f')}, final test acc "
                 f"{num(self.final_test_acc, '.4f')}"]
        lines += [f"  epoch {e['epoch']}: " + ", ".join(f"{k} {num(v, '.4g')}" for k, v in e.items() if k != "epoch")
                  for e in self.epochs] + [f"  {key}: {value}" for key, value in self.notes.items()]
        return "\n".join(lines + ([f"  error: {self.error}"] if self.error else []))


def _convmixer_here(args: list[str], out, cwd: Path | None) -> int:
    """`convmixer <args>` in this process, its output into `out`; its exit code."""
    from convmixer_pl.cli import main

    for name in ("lightning.pytorch", "lightning.fabric"):  # their handlers write to the terminal, not to `out`
        logging.getLogger(name).setLevel(logging.WARNING)
    here = os.getcwd()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            os.chdir(cwd or here)
            main(args)
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except Exception:  # noqa: BLE001 -- the run's failure, with the traceback in its log
            traceback.print_exc()
            return 1
        finally:
            os.chdir(here)
    return 0


def tail(path: str | Path, lines: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:]) if Path(path).is_file() else ""


def child_env(threads: int | None = None) -> dict[str, str]:
    """A training subprocess's environment: unbuffered output (lines survive a kill), the intra-op threads."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else env


def steady(values: list[float | None]) -> float | None:
    """The median over the epochs after the first (which pays for warm-up), or the one value there is."""
    values = [v for v in values if v is not None]
    return statistics.median(values[1:] if len(values) > 1 else values) if values else None


_EPOCH = re.compile(r"Epoch: (\d+) \| Train Acc: ([\d.]+), Test Acc: ([\d.]+), Time: ([\d.]+), lr: [-\d.e]+")
_TRAIN_TIME = re.compile(r"Epoch: (\d+) \| Train Time: ([\d.]+), Train Images: (\d+)")


def parse_epochs(text: str) -> list[dict]:
    """One dict per epoch line of the script: epoch, train_acc, test_acc, time_s (its Time: training and test
    pass) and, from the train-time patch, train_time_s, train_images and images_per_sec (the training loop's)."""
    epochs = {int(m[1]): {"epoch": int(m[1]), "train_acc": float(m[2]), "test_acc": float(m[3]),
                          "time_s": float(m[4])} for m in _EPOCH.finditer(text)}
    for m in _TRAIN_TIME.finditer(text):
        if int(m[1]) in epochs and float(m[2]) > 0:
            epochs[int(m[1])].update(train_time_s=float(m[2]), train_images=int(m[3]),
                                     images_per_sec=int(m[3]) / float(m[2]))
    return [epochs[e] for e in sorted(epochs)]


def run_official(source: str, recipe: Recipe, root: Path, work: Path, device: str = "cpu", seed: int = 0,
                 time_budget_s: float | None = None, threads: int | None = None, grace_s: float = 20) -> Run:
    """Patch the script for `device`, run it on the images of `root` and parse what it printed; a run stopped at
    `time_budget_s` keeps the epochs it finished."""
    work.mkdir(parents=True, exist_ok=True)
    script = work / f"train_patched_{device.replace(':', '_')}.py"
    with atomic_write(script) as f:
        f.write(patch_source(source, device))
    command = [sys.executable, str(script), "--data-root", str(root.resolve()), "--seed", str(seed),
               *recipe.official_flags()]
    run = Run("official", seed, command, str(work / f"official_seed{seed}.log"))
    run.execute(time_budget_s, child_env(threads), cwd=work, grace_s=grace_s)
    return run.summarise(parse_epochs(tail(run.log, 100_000)))


def convmixer_env(threads: int | None = None) -> dict[str, str]:
    env = child_env(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("CONVMIXER_DEBUG", None)
    return env


def fit_args(recipe: Recipe, root: Path, run_dir: Path, device: str, seed: int, options: Sequence[str] = ()
             ) -> list[str]:
    """`fit` on configs/cifar10.yaml with ImageFolderDataModule and every recipe value set from `recipe`, so the
    config's own values do not matter; validation on the test set (data.val_fraction 0), as the official script;
    bf16-mixed; then `options` (speed options), which override any of these."""
    r = recipe
    return [
        "fit", "--config", str(REPO / "configs" / "cifar10.yaml"), "--name", run_dir.name, "--checkpoint.dirpath",
        str(run_dir), "--seed_everything", str(seed), "--data", "ImageFolderDataModule", "--data.root", str(root),
        "--data.image_size", "32", "--data.crop_pct", "1.0", "--data.interpolation", "bilinear", "--data.mean",
        CIFAR_MEAN, "--data.std", CIFAR_STD, "--data.val_fraction", "0", "--data.augment.scale", f"[{r.scale},1.0]",
        "--data.augment.ratio", "[1.0,1.0]", "--data.augment.hflip", "0.5", "--data.augment.ra_num_ops", str(r.ra_n),
        "--data.augment.ra_magnitude", str(r.ra_m), "--data.augment.color_jitter", str(r.jitter),
        "--data.augment.re_prob", str(r.reprob), "--data.augment.re_mode", "const", "--data.augment.mixup_alpha", "0",
        "--data.augment.cutmix_alpha", "0", "--data.batch_size", str(r.batch_size), "--data.num_workers",
        str(r.workers), "--data.seed", str(seed), "--model.dim", str(r.hdim), "--model.depth", str(r.depth),
        "--model.kernel_size", str(r.conv_ks), "--model.patch_size", str(r.psize), "--model.act", "gelu",
        "--model.optimizer", "adamw", "--model.lr", str(r.lr_max), "--model.weight_decay", str(r.wd),
        "--model.opt_eps", "1e-8", "--model.label_smoothing", "0", "--model.scheduler", "onecycle",
        "--trainer.accelerator", "cpu" if device == "cpu" else "gpu", "--trainer.devices", "1",
        "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", str(r.epochs), "--trainer.benchmark",
        str(device != "cpu").lower(), "--trainer.gradient_clip_val", "null", "--trainer.enable_progress_bar", "false",
        "--plots.enabled", "false", *options]  # the official script draws no pictures


def ours_epochs(run_dir: Path) -> list[dict]:
    """Per epoch: train/images_per_sec (first batch to epoch end, validation left out) and val/acc1 (the test
    set) of the run's metrics.csv."""
    metrics = run_metrics(run_dir)
    rates, accs = metrics.get("train/images_per_sec", {}), metrics.get("val/acc1", {})
    return [{"epoch": e, "images_per_sec": rates.get(e), "test_acc": accs.get(e)} for e in sorted({*rates, *accs})]


def run_ours(recipe: Recipe, root: Path, work: Path, device: str, seed: int, options: Sequence[str] = (),
             time_budget_s: float | None = None, threads: int | None = None, test: bool = False,
             name: str = "ours", in_process: bool = False) -> Run:
    run_dir = work / f"{name}_seed{seed}"
    args = fit_args(recipe, root, run_dir, device, seed, options)
    run = Run(name, seed, convmixer_command(*args), str(work / f"{name}_seed{seed}.log"))
    run.execute(time_budget_s, convmixer_env(threads), work, in_process=in_process).summarise(ours_epochs(run_dir))
    if test and run.returncode == 0:
        tested = Run("ours test", seed, convmixer_command("test", *args[1:], "--ckpt_path", "last"),
                     str(work / f"ours_seed{seed}_test.log")).execute(time_budget_s, convmixer_env(threads), work)
        run.notes.update(convmixer_test_acc1=run_metrics(run_dir).get("test/acc1", {}).get(0),
                         convmixer_test_wall_s=tested.wall_s, convmixer_test_error=tested.error)
    return run


def spread(values: list[float | None]) -> dict:
    """n, mean, sample standard deviation (None for one value)."""
    v = [x for x in values if x is not None]
    return {"n": len(v), "mean": statistics.fmean(v) if v else None, "sd": statistics.stdev(v) if len(v) > 1 else None}


def compare(official_side: dict, ours: dict) -> dict:
    """Wall time official/ours, images/s ours/official, the accuracy difference ours - official and, with a spread
    over seeds on both sides, that difference in standard errors of the difference of the two means."""
    out = {name: a[key]["mean"] / b[key]["mean"] for name, key, a, b in (
        ("wall_official_over_ours", "wall_s", official_side, ours),
        ("images_per_sec_ours_over_official", "train_images_per_sec", ours, official_side))
        if a[key]["mean"] and b[key]["mean"]}
    a, b = ours["final_test_acc"], official_side["final_test_acc"]
    if a["mean"] is not None and b["mean"] is not None:
        out["acc_ours_minus_official"] = a["mean"] - b["mean"]
        if a["sd"] and b["sd"]:
            out["acc_difference_in_standard_errors"] = out["acc_ours_minus_official"] / math.sqrt(
                a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
    return out


def print_summary(summary: dict, ratios: dict) -> None:
    def cell(s: dict, fmt: str) -> str:
        if s["mean"] is None:
            return "not measured (see the runs above)"
        sd = "" if s["sd"] is None else f" ± {s['sd']:{fmt}}"
        return f"{s['mean']:{fmt}}{sd} [n={s['n']}]"

    print("\n| runner | wall time of the command, s | training images/s | final test accuracy |\n|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {cell(s['wall_s'], '.1f')} | {cell(s['train_images_per_sec'], '.1f')} | "
              f"{cell(s['final_test_acc'], '.4f')} |")
    print("(mean ± sample standard deviation over seeds; differences between the runners: docs/real_cifar10.md)")
    for name, value in ratios.items():
        print(f"{name}: {value:.4g}")


def side_by_side(tarball: str | None = None, data_root: str | None = None, official_repo: str | None = None,
                 recipe: Recipe = Recipe(), ours: str = "", ours_test: bool = False,  # noqa: B008
                 seeds: tuple[int, ...] = (0,), runners: str = "official,ours", device: Literal["cpu", "cuda"] = "cpu",
                 threads: int | None = None, train_subset: int | None = None, subset_seed: int = 0,
                 time_budget_s: float | None = None, work_dir: str | None = None, output: str | None = None,
                 show_patches: bool = False) -> dict | None:
    """The official CIFAR-10 script and `convmixer fit`, side by side on the same real images.

    Args:
        tarball: The CIFAR-10 JPEG tarball (default: $CONVMIXER_CIFAR10_JPG).
        data_root: An extracted folder with train/ and test/ instead of the tarball.
        official_repo: A clone of github.com/locuslab/convmixer-cifar10 (default: $CONVMIXER_OFFICIAL_REPO).
        recipe: The official script's flags, for both runners.
        ours: More `convmixer fit` options for our side, after the recipe's and bf16-mixed (which they
            override), e.g. "--trainer.precision 32-true --data.device_pipeline true".
        ours_test: Also run `convmixer test --ckpt_path last` on our side and report its test/acc1.
        seeds: One run of each runner per seed.
        runners: Comma-separated subset of official,ours.
        device: cpu or cuda.
        threads: OMP_NUM_THREADS of both runners (default: torch's own choice).
        train_subset: Train both on the same fixed seeded subset of this many training images (all test images).
        subset_seed: The subset's seed.
        time_budget_s: Stop any one run after this many seconds.
        work_dir: Runs, logs and the extracted images (default: a new temporary folder).
        output: Also write every number to this JSON file.
        show_patches: List the patches made to the official script and stop.
    """
    if show_patches:
        for p in patches(device):
            print(f"{p.name} (x{p.count}): {p.why}\n  - {p.old!r}\n  + {p.new!r}")
        return None
    chosen = runners.split(",")
    if not chosen or set(chosen) - {"official", "ours"}:
        raise ValueError(f"--runners {runners!r}: give official, ours or official,ours")
    source, origin = official_source(official_repo) if "official" in chosen else (None, None)
    work = Path(work_dir or tempfile.mkdtemp(prefix="convmixer_side_by_side_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = image_root(tarball, data_root, work)
    if train_subset:
        root = subset_root(root, train_subset, subset_seed, work / f"subset_{train_subset}_{subset_seed}")
    if recipe.schedule_warning():
        print(f"warning: {recipe.schedule_warning()}")
    print(f"official script: {origin}\ndata: {root} ({count_images(root / 'train')} training, "
          f"{count_images(root / 'test')} test images)\nrecipe: {' '.join(recipe.official_flags())}; seeds "
          f"{list(seeds)}; {device}, {cpu_name()}, threads {threads or 'default'}; ours: {ours}", flush=True)
    runs: dict[str, list[Run]] = {name: [] for name in chosen}
    for seed in seeds:
        if "official" in runs:
            runs["official"].append(run_official(source, recipe, root, work / "official", device, seed,
                                                          time_budget_s, threads))
        if "ours" in runs:
            runs["ours"].append(run_ours(recipe, root, work, device, seed, shlex.split(ours), time_budget_s,
                                         threads, ours_test))
        for name in runs:
            print(runs[name][-1].describe(), flush=True)
    summary = {name: {key: spread([getattr(r, key) for r in done]) for key in
                      ("wall_s", "train_images_per_sec", "final_test_acc")} for name, done in runs.items()}
    ratio = compare(summary["official"], summary["ours"]) if len(summary) == 2 else {}
    print_summary(summary, ratio)
    result = {"recipe": dataclasses.asdict(recipe), "ours_options": ours, "seeds": list(seeds),
              "data_root": str(root), "train_images": count_images(root / "train"), "official_script": origin,
              "runs": {name: [dataclasses.asdict(r) for r in done] for name, done in runs.items()},
              "summary": summary, "ratios": ratio, "machine": {"cpu": cpu_name(), "platform": platform.platform()}}
    if output:
        with atomic_write(output) as f:
            json.dump(result, f, indent=1)
    if not work_dir and not data_root:  # our own temporary folder: drop the extracted images, keep the logs
        shutil.rmtree(work / "data", ignore_errors=True)
    print(f"runs and logs: {work}")
    return result


if __name__ == "__main__":
    run_entry_point(lambda: CLI(side_by_side), prog="benchmarks.official")
