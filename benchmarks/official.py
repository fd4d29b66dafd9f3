"""The official CIFAR-10 script (locuslab/convmixer-cifar10 `train.py`), patched at run time to train on a local
folder of JPEG images on the CPU or a GPU, run with a time budget, and its per-epoch lines parsed.

The script is never stored in this project: it is read from a path (`--script`, or the environment variable
CONVMIXER_OFFICIAL_SCRIPT) or, where it exists, from a bare git mirror of locuslab/convmixer-cifar10 with
`git show HEAD:train.py` (/work/.mirror/locuslab+convmixer-cifar10/repo, or $CONVMIXER_OFFICIAL_MIRROR). The
patched copy goes into a temporary folder. Every patch is a textual replacement listed in `patches()`, with the
number of times its text must occur: a changed upstream script fails loudly (`PatchError`) instead of being
half-patched.

    python benchmarks/official.py --data-root DIR --device cpu --epochs 1 --hdim 128 --depth 6 --batch-size 128
    python benchmarks/official.py --data-root DIR --device cuda --train-subset 10000 --workers 8 --json out.json

DIR holds `train/<class>/*.jpg` and `test/<class>/*.jpg` (the layout of shared/data/cifar10-jpg.tar.gz; extract it
first, or use benchmarks/cifar10_side_by_side.py, which extracts it). Printed and returned: the wall time of the
whole command, the per-epoch times, training images/s and the final test accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV_SCRIPT = "CONVMIXER_OFFICIAL_SCRIPT"
# a bare git directory of locuslab/convmixer-cifar10, where this workplace has one
MIRROR = Path(os.environ.get("CONVMIXER_OFFICIAL_MIRROR", "/work/.mirror/locuslab+convmixer-cifar10/repo"))
NOT_FOUND = f"official train.py not found: set {ENV_SCRIPT}"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class OfficialScriptNotFound(RuntimeError):
    """Neither a path nor the mirror gave the script."""


class PatchError(RuntimeError):
    """A patch's text did not occur as often as expected: the upstream script changed."""


# -- the recipe ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """The official script's flags that both runners share; the defaults are the script's own."""

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
        flags = []
        for name, value in dataclasses.asdict(self).items():
            flags += [f"--{name.replace('_', '-')}", str(value)]
        return flags

    def schedule_warning(self) -> str | None:
        """The official breakpoints are epochs*2//5 and epochs*4//5 (integers); ours are 2T/5 and 4T/5 of the
        steps. They agree only when epochs is a multiple of 5."""
        if self.epochs % 5 == 0:
            return None
        return (f"--epochs {self.epochs} is not a multiple of 5: the official one-cycle breakpoints are epochs "
                f"{self.epochs * 2 // 5} and {self.epochs * 4 // 5} (integer division), ours {self.epochs * 2 / 5:g} "
                f"and {self.epochs * 4 / 5:g}, so the two learning-rate schedules differ")


def add_recipe_arguments(parser: argparse.ArgumentParser, defaults: Recipe = Recipe()) -> None:
    """The official script's flags, with its names, on another parser."""
    group = parser.add_argument_group("recipe (the official script's flags)")
    for f in dataclasses.fields(Recipe):
        default = getattr(defaults, f.name)
        group.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default, dest=f.name)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})


# -- finding and patching the script ------------------------------------------------------------------------------
def find_official_script(path: str | os.PathLike | None = None, mirror: Path | None = MIRROR) -> tuple[str, str]:
    """(source text, where it came from): `path`, else $CONVMIXER_OFFICIAL_SCRIPT, else the mirror's HEAD."""
    path = path or os.environ.get(ENV_SCRIPT)
    if path:
        if not Path(path).is_file():
            raise OfficialScriptNotFound(f"{NOT_FOUND} ({path} is not a file)")
        return Path(path).read_text(), str(path)
    if mirror is not None and Path(mirror).is_dir():
        proc = subprocess.run(["git", "-C", str(mirror), "show", "HEAD:train.py"], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout:
            return proc.stdout, f"{mirror} (git show HEAD:train.py)"
    raise OfficialScriptNotFound(NOT_FOUND)


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    old: str
    new: str
    count: int = 1  # how many times `old` must occur


_TRAINSET = """trainset = torchvision.datasets.CIFAR10(root='./data', train=True,
                                        download=True, transform=train_transform)"""
_TESTSET = """testset = torchvision.datasets.CIFAR10(root='./data', train=False,
                                       download=True, transform=test_transform)"""


def patches(device: str) -> list[Patch]:
    """Every change made to the script, for `device` ('cpu', 'cuda' or 'cuda:N')."""
    cpu = device == "cpu"
    found = [
        Patch("imports", "modules the patches below use",
              "import argparse\n", "import argparse\nimport contextlib\nimport os\nimport random\n"),
        Patch("flags", "the image folder to read, and a seed (the script seeds nothing)",
              "parser.add_argument('--workers', default=2, type=int)\n",
              "parser.add_argument('--workers', default=2, type=int)\n"
              "parser.add_argument('--data-root', required=True)\n"
              "parser.add_argument('--seed', default=0, type=int)\n"),
        Patch("seed", "the same initial weights, order and augmentation for a given seed; the device",
              "args = parser.parse_args()\n",
              "args = parser.parse_args()\n"
              "torch.manual_seed(args.seed)\nnp.random.seed(args.seed)\nrandom.seed(args.seed)\n"
              f"DEVICE = torch.device({device!r})\n"),
        Patch("train-images", "the local JPEG folder instead of the CIFAR-10 download; ImageFolder yields PIL images "
              "as CIFAR10 does, so the script's transforms stay as they are",
              _TRAINSET, "trainset = torchvision.datasets.ImageFolder(os.path.join(args.data_root, 'train'), "
                         "transform=train_transform)"),
        Patch("test-images", "likewise for the test set",
              _TESTSET, "testset = torchvision.datasets.ImageFolder(os.path.join(args.data_root, 'test'), "
                        "transform=test_transform)"),
        Patch("model-device", "the chosen device; nn.DataParallel only on a GPU (on the CPU it does nothing)",
              "model = nn.DataParallel(model).cuda()",
              "model = model.to(DEVICE)" if cpu else "model = nn.DataParallel(model).to(DEVICE)"),
        Patch("batch-device", "the chosen device", "X, y = X.cuda(), y.cuda()", "X, y = X.to(DEVICE), y.to(DEVICE)",
              count=2),
        Patch("train-time", "the training loop's own time: the printed Time also holds the test pass",
              "    model.eval()\n    test_acc, m = 0, 0\n",
              "    train_time = time.time() - start\n    model.eval()\n    test_acc, m = 0, 0\n"),
        Patch("train-time-line", "print it, with the number of images trained on, after the script's own line",
              ", lr: {lr:.6f}')",
              ", lr: {lr:.6f}')\n"
              "    print(f'[{args.name}] Epoch: {epoch} | Train Time: {train_time:.3f}, Train Images: {n}')"),
    ]
    if cpu:  # the CPU has no fp16 autocast: fp32, and a disabled scaler is the identity
        found += [
            Patch("autocast-fp32", "fp32 on the CPU (fp16 AMP exists only on CUDA)",
                  "with torch.cuda.amp.autocast():", "with contextlib.nullcontext():", count=2),
            Patch("scaler-off", "no loss scaling in fp32: a disabled GradScaler passes everything through",
                  "scaler = torch.cuda.amp.GradScaler()", "scaler = torch.amp.GradScaler('cpu', enabled=False)"),
        ]
    return found


def patch_source(source: str, device: str) -> str:
    """`source` with every patch applied; PatchError names the first that does not match."""
    for patch in patches(device):
        found = source.count(patch.old)
        if found != patch.count:
            raise PatchError(f"patch {patch.name!r}: expected {patch.count} occurrence(s) of {patch.old!r} in the "
                             f"official train.py, found {found}; the upstream script changed, update "
                             "benchmarks/official.py")
        source = source.replace(patch.old, patch.new)
    return source


def write_patched(source: str, folder: Path, device: str) -> Path:
    """The patched script, written as `folder/train_patched_<device>.py`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train_patched_{device.replace(':', '_')}.py"
    path.write_text(patch_source(source, device))
    return path


# -- data folders -------------------------------------------------------------------------------------------------
def _images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def count_images(folder: Path) -> int:
    return sum(len(_images(c)) for c in Path(folder).iterdir() if c.is_dir())


def subset_root(data_root: Path, n: int, seed: int, dest: Path) -> Path:
    """`dest` with `train/` holding a fixed seeded subset of `n` training images (links; stratified: every class
    gets n // classes, the first n % classes classes one more) and `test/` linking the whole test set. The same
    (n, seed) gives the same images, so every runner trains on the same subset."""
    data_root = Path(data_root).resolve()
    classes = sorted(c.name for c in (data_root / "train").iterdir() if c.is_dir())
    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(classes):
        files = _images(data_root / "train" / name)
        rng.shuffle(files)
        take = n // len(classes) + (i < n % len(classes))
        if take > len(files):
            raise ValueError(f"--train-subset {n}: class {name} has only {len(files)} training images")
        folder = dest / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for file in sorted(files[:take]):
            (folder / file).symlink_to(data_root / "train" / name / file)
    if not (dest / "test").exists():
        (dest / "test").symlink_to(data_root / "test", target_is_directory=True)
    return dest


# -- running a command with a time budget ------------------------------------------------------------------------
@dataclass
class CommandResult:
    command: list[str]
    wall_s: float
    returncode: int | None
    timed_out: bool
    log: str  # path of the file holding stdout and stderr


def run_command(command: list[str], log: Path, timeout_s: float | None = None, env: dict | None = None,
                cwd: Path | None = None, grace_s: float = 20) -> CommandResult:
    """Run `command`, stdout and stderr into `log`, and time it. Past `timeout_s` its whole process group gets
    SIGTERM (our fit saves and stops; the official script just stops), then SIGKILL `grace_s` later."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)  # its own group: loader workers are stopped with it
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _stop(proc, signal.SIGKILL)
                proc.wait()
    return CommandResult([str(c) for c in command], time.perf_counter() - start, proc.returncode, timed_out, str(log))


def _stop(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def tail(path: str | Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def child_env(threads: int | None = None) -> dict[str, str]:
    """The environment of a training subprocess: unbuffered output (lines survive a kill), and the intra-op
    thread count where one is given."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


# -- parsing and summarising the script's output ------------------------------------------------------------------
_EPOCH = re.compile(r"Epoch: (\d+) \| Train Acc: ([\d.]+), Test Acc: ([\d.]+), Time: ([\d.]+), lr: ([-\d.e]+)")
_TRAIN_TIME = re.compile(r"Epoch: (\d+) \| Train Time: ([\d.]+), Train Images: (\d+)")


def parse_epochs(text: str) -> list[dict]:
    """One dict per epoch line: epoch, train_acc, test_acc, time_s (the script's Time: training and testing),
    lr, and where the train-time patch printed them train_time_s and train_images."""
    epochs: dict[int, dict] = {}
    for match in _EPOCH.finditer(text):
        epochs[int(match[1])] = {"epoch": int(match[1]), "train_acc": float(match[2]), "test_acc": float(match[3]),
                                 "time_s": float(match[4]), "lr": float(match[5])}
    for match in _TRAIN_TIME.finditer(text):
        if int(match[1]) in epochs:
            epochs[int(match[1])].update(train_time_s=float(match[2]), train_images=int(match[3]))
    return [epochs[e] for e in sorted(epochs)]


def steady(values: list[float]) -> float | None:
    """The median over the epochs after the first (which pays for warm-up), or the one value there is."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


@dataclass
class OfficialRun:
    device: str
    seed: int
    recipe: dict
    data_root: str
    command: list[str] = field(default_factory=list)
    wall_s: float | None = None
    returncode: int | None = None
    timed_out: bool = False
    epochs: list[dict] = field(default_factory=list)
    epoch_times_s: list[float] = field(default_factory=list)  # the script's Time: training + test pass
    train_times_s: list[float] = field(default_factory=list)  # the training loop alone (patch train-time)
    train_images_per_sec: float | None = None  # median over epochs after the first, training loop alone
    images_per_sec_from_epoch_time: float | None = None  # the same, from the script's Time (test pass included)
    final_test_acc: float | None = None
    error: str | None = None
    log: str | None = None


def summarise(run: OfficialRun, text: str) -> OfficialRun:
    run.epochs = parse_epochs(text)
    run.epoch_times_s = [e["time_s"] for e in run.epochs]
    run.train_times_s = [e.get("train_time_s") for e in run.epochs]
    rates = [e["train_images"] / e["train_time_s"] for e in run.epochs if e.get("train_time_s")]
    run.train_images_per_sec = steady(rates)
    images = [e.get("train_images") for e in run.epochs]
    run.images_per_sec_from_epoch_time = steady([n / e["time_s"] for n, e in zip(images, run.epochs, strict=True)
                                                 if n and e["time_s"] > 0])
    run.final_test_acc = run.epochs[-1]["test_acc"] if run.epochs else None
    return run


def run_official(source: str, recipe: Recipe, data_root: Path, device: str = "cpu", seed: int = 0,
                 work_dir: Path | None = None, time_budget_s: float | None = None, threads: int | None = None,
                 train_subset: int | None = None, subset_seed: int = 0, grace_s: float = 20) -> OfficialRun:
    """Patch the script for `device`, run it on `data_root` (or a `train_subset` of its training images) and
    parse what it printed. A run past `time_budget_s` is stopped; the epochs it finished are kept."""
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="convmixer_official_")).resolve()
    script = write_patched(source, work_dir, device)
    data_root = Path(data_root).resolve()  # the script runs in work_dir
    if train_subset:
        data_root = subset_root(data_root, train_subset, subset_seed, work_dir / f"subset_{train_subset}_{subset_seed}")
    command = [sys.executable, str(script), "--data-root", str(data_root), "--seed", str(seed),
               *recipe.official_flags()]
    run = OfficialRun(device, seed, dataclasses.asdict(recipe), str(data_root), command)
    result = run_command(command, work_dir / f"official_seed{seed}.log", time_budget_s, child_env(threads),
                         cwd=work_dir, grace_s=grace_s)
    run.wall_s, run.returncode, run.timed_out, run.log = result.wall_s, result.returncode, result.timed_out, result.log
    summarise(run, Path(result.log).read_text(errors="replace"))
    if result.timed_out:
        run.error = f"stopped after the time budget of {time_budget_s:.0f} s ({len(run.epochs)} epoch(s) finished)"
    elif result.returncode != 0:
        run.error = f"exit code {result.returncode}: {tail(result.log, 5)}"
    return run


def describe(run: OfficialRun) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"official ({run.device}, seed {run.seed}): wall {num(run.wall_s, '.1f')} s, "
             f"{len(run.epochs)} epoch(s), train images/s {num(run.train_images_per_sec, '.1f')} "
             f"(from the script's epoch Time: {num(run.images_per_sec_from_epoch_time, '.1f')}), "
             f"final test acc {num(run.final_test_acc, '.4f')}"]
    for e in run.epochs:
        lines.append(f"  epoch {e['epoch']}: Time {e['time_s']:.1f} s, training loop "
                     f"{num(e.get('train_time_s'), '.2f')} s, train acc {e['train_acc']:.4f}, "
                     f"test acc {e['test_acc']:.4f}")
    if run.error:
        lines.append(f"  error: {run.error}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", help=f"the official train.py (default: ${ENV_SCRIPT}, else the mirror {MIRROR})")
    p.add_argument("--data-root", required=True, help="folder with train/<class>/ and test/<class>/ images")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, help="train on a fixed seeded subset of this many training images")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of that subset (the same for every runner)")
    p.add_argument("--time-budget-s", type=float, help="stop the run after this many seconds")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the run (default: torch's own choice)")
    p.add_argument("--work-dir", help="where the patched script and the log go (default: a new temporary folder)")
    p.add_argument("--show-patches", action="store_true", help="list the patches and exit")
    p.add_argument("--json", help="also write the result to this file")
    add_recipe_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> OfficialRun | None:
    args = parse_args(argv)
    if args.show_patches:
        for patch in patches(args.device):
            print(f"{patch.name} (x{patch.count}): {patch.why}\n  - {patch.old!r}\n  + {patch.new!r}")
        return None
    source, origin = find_official_script(args.script)
    recipe = recipe_from_args(args)
    print(f"official script: {origin}")
    run = run_official(source, recipe, Path(args.data_root), args.device, args.seed,
                       Path(args.work_dir) if args.work_dir else None, args.time_budget_s, args.threads,
                       args.train_subset, args.subset_seed)
    print(describe(run))
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(run), indent=1))
    return run


if __name__ == "__main__":
    try:
        main()
    except (OfficialScriptNotFound, PatchError) as err:
        sys.exit(f"official.py: error: {err}")
