"""The `convmixer` command: LightningCLI with stable run folders, safe evaluation defaults and the tools.

    convmixer fit|validate|test|predict --config FILE [--section.key value ...]
    convmixer export|serve|plots|benchmark|sweep [--config FILE] [--key value ...]
    convmixer --help; convmixer fit --help [model|data|trainer|...|all]

Every subcommand is parsed by the same jsonargparse parser: a tool's options are its command function's
parameters (`TOOLS`), so `--config` works for tools as for `fit`.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import importlib
import inspect
import logging
import os
import re
import signal
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, RichModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .callbacks import PerClassReport, PlotWriter, PredictionWriter, StopGuard, ThroughputCallback
from .callbacks.guards import TrainingStopped
from .checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    RunCheckpoint,
    check_compatible,
    check_hparams,
    check_resumable,
    check_writable,
    read_checkpoint,
    resolve_ckpt_path,
)
from .console import debugging, fail, run_entry_point, say
from .data import ImageDataModule
from .files import atomic_write
from .model import VARIANTS
from .module import ConvMixerClassifier
from .resume import ResumeState
from .speed import (
    ModelShape,
    choose_speed,
    cpu_fallback_precision,
    cpu_fallback_workers,
    default_choice,
    use_free_cpus,
)

SUBCOMMANDS = ("fit", "validate", "test", "predict")
TOOLS = ("export", "serve", "plots", "benchmark", "sweep")  # convmixer <tool>: convmixer_pl.<tool>.<tool>()


class ToolFinished(Exception):
    """A tool subcommand ran to the end (LightningCLI would go on to build a model and a trainer)."""


def tool_function(name: str):
    """The command function of `convmixer <name>`: its parameters are the tool's options."""
    return getattr(importlib.import_module(f"convmixer_pl.{name}"), name)


class CLIError(ValueError):
    """A bad command line or config value; the message says which and how to fix it."""


class NothingToDo(Exception):
    """The command has nothing left to do (a finished run asked to resume): said, and exit code 0."""


def default_loggers(root: str, version: int | None = None) -> list:
    """TensorBoard and CSV logs in one folder per run: <root>/lightning_logs/version_N/; a resumed run's `version`
    goes on in its own folder, its metrics.csv kept (CSVLogger would start it again)."""
    tensorboard = TensorBoardLogger(root, version=version)
    csv = CSVLogger(root, version=tensorboard.version)
    metrics = Path(csv.log_dir) / "metrics.csv"
    earlier = metrics.read_text() if version is not None and metrics.is_file() else ""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Experiment logs directory .* exists and is not empty")
        writer = csv.experiment  # opens the folder (and deletes metrics.csv there)
    if earlier:
        with atomic_write(metrics) as f:
            f.write(earlier)
        writer.metrics_keys = earlier.splitlines()[0].split(",")  # its header: the new rows are appended
    return [tensorboard, csv]


_held_locks: list = []  # the run folders this process writes, locked for as long as it runs


def lock_run_folder(folder: Path) -> None:
    """Refuse a second `convmixer fit` writing into the same run folder while this one runs."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".convmixer.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise CheckpointError(f"{folder}/ is being written by another `convmixer fit` ({owner}); wait for it to "
                              "end, or use another --name") from err
    handle.truncate(0)  # appended writes go to the (new) end
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _held_locks.append(handle)


FULL_HELP = {  # the overview's last lines: how to see a group's options in full (`--help GROUP`)
    "--help model": "the network, loss, optimizer, schedule and speed settings",
    "--help data": "the data modules to choose from",
    "--data.help CLASS": "one data module's options (augmentation, splits, loaders)",
    "--help trainer": "every option of Lightning's Trainer",
    "--help checkpoint": "which checkpoints the run keeps, and where",
    "--help reliability": "the stop on a signal, and the non-finite guard",
    "--help predictions": "the CSV that predict writes",
    "--help plots": "the pictures written after fit",
    "--help report": "the per-class report of test",
    "--help all": "every option at once",
}
OVERVIEW = """\
usage: {prog} [--config FILE] [options]

{description}

The options used most (each is a config key too: --model.lr 0.01 is `model: {{lr: 0.01}}`):
  --config FILE               a YAML config (configs/*.yaml); the options after it override it
  --print_config              print the config that the options make, and exit
  --ckpt_path last|best|FILE  last.ckpt (fit resumes it), the best epoch (the evaluation default), a file
  --name NAME                 the run, whose checkpoints and logs are in checkpoints/<name>/
  --overwrite true            fit: start over where a run is (deletes its checkpoints)
  --seed_everything SEED      the seed of everything random (unset: PL_GLOBAL_SEED, else 0)
  --model.variant NAME        {variants}
  --model.dim N               channels of every layer (ConvMixer-dim/depth)
  --model.depth N             mixing blocks
  --model.kernel_size K       the depthwise kernel size
  --model.patch_size P        the patch size (the stem's stride)
  --model.lr LR               peak learning rate
  --data CLASS                DigitsDataModule (default), CIFARDataModule, ImageFolderDataModule, ...
  --data.root DIR             where the CIFAR files or the image folders are
  --data.batch_size N         images per batch and process
  --data.num_workers N        loader processes (0: load in the training process)
  --data.device_pipeline true hold the splits on the training device, augment whole batches there
  --trainer.max_epochs N      epochs to train
  --trainer.accelerator NAME  cpu, gpu or auto (with no GPU a gpu config runs on the CPU)
  --trainer.devices N         devices to run on (one process each)
  --trainer.precision P       32-true, bf16-mixed, 16-mixed; unset: fit measures the fastest here

Every option of a group:
"""


class GroupHelp(argparse._HelpAction):
    """`--help`: the overview; `--help GROUP`: that group's options in full; `--help all`: every option."""

    def __call__(self, parser, namespace, group, option_string=None):
        prog = parser.prog.replace(" [options]", "")
        if group is None:
            text = OVERVIEW.format(prog=prog, description=parser.description.split(". ")[0].rstrip(".") + ".",
                                   variants=", ".join(VARIANTS))
            text += "".join(f"  {prog} {command:<18}  {what}\n" for command, what in FULL_HELP.items())
        else:
            shown = copy.copy(parser)  # the parser itself keeps all its groups
            shown._action_groups = parser._action_groups if group == "all" else [parser.groups[group]]
            text = shown.format_help()
        sys.stdout.write(text)
        parser.exit()


def shorten_help(parser) -> None:
    """`--help` a person can scan: an overview of the options used most (`GroupHelp`), the Lightning Trainer's
    options by their first sentence, and this command's own meaning of --ckpt_path."""
    parser.usage = f"{parser.prog.replace(' [options]', '')} [--config FILE] [options]"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            action.__class__, action.nargs, action.metavar = GroupHelp, "?", "GROUP"
            action.choices = [command.split()[1] for command in FULL_HELP if command.startswith("--help ")]
            action.help = "the options used most; GROUP: that group's options in full"
        elif action.dest == "ckpt_path":
            action.help = ("A .ckpt file written by `convmixer fit`, or `last` (the run's last.ckpt: fit resumes "
                           "from it) or `best` (the best epoch by val/acc1); validate, test and predict use the run's "
                           "best checkpoint when it is not given. The run is checkpoints/<name>/.")
        elif action.dest.startswith("trainer.") and action.help and action.help != argparse.SUPPRESS:
            action.help = " ".join(action.help.split()).split(". ")[0].rstrip(".") + "."


def check_unfinished(path: str, checkpoint: dict, trainer) -> None:
    """Resuming a run that already trained to the end: nothing to do (NothingToDo, exit 0)."""
    loops = checkpoint.get("loops") or {}
    epochs = (((loops.get("fit_loop") or {}).get("epoch_progress") or {}).get("current") or {}).get("processed")
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps") or -1
    if max_epochs is None and max_steps == -1:
        max_epochs = 1000  # Lightning's default
    if isinstance(epochs, int) and max_epochs not in (None, -1) and epochs >= max_epochs:
        raise NothingToDo(f"{path} has trained {epochs} epoch(s), trainer.max_epochs is {max_epochs}: nothing left "
                          "to train (raise --trainer.max_epochs to train on)")
    if max_steps > 0 and checkpoint.get("global_step", 0) >= max_steps:
        raise NothingToDo(f"{path} has trained {checkpoint['global_step']} step(s), trainer.max_steps is "
                          f"{max_steps}: nothing left to train (raise --trainer.max_steps to train on)")


class ConvMixerParser(LightningArgumentParser):
    """A bad key or value is one line naming it (not the whole usage text); exit code 2 as before."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debugging():
            return super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        named = re.search(rf"\b({'|'.join(TOOLS)})\.", message)  # a required option of a tool: `serve.ckpt_path`
        prog = f"convmixer {named.group(1)}" if named and prog == "convmixer" else prog
        tool = prog if prog.split()[-1] in TOOLS else "convmixer"  # a tool's errors name it, as its own do
        fail(f"{' '.join(message.split())} (`{prog} --help` lists the options)", tool)


class ConvMixerCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        self._checkpoint: tuple[str, dict] | None = None  # the --ckpt_path file, read once to check it
        argv = sys.argv[1:] if args is None else args
        # the tools' options are built (their modules imported) only when a tool or the overview is asked for
        self._with_tools = not isinstance(argv, dict) and not any(str(arg) in SUBCOMMANDS for arg in argv)
        super().__init__(
            ConvMixerClassifier,
            ImageDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=ConvMixerParser,
            parser_kwargs={"prog": "convmixer",
                           "description": "Train, evaluate, export, serve and sweep ConvMixer. `convmixer SUBCOMMAND "
                                          "--help` lists a subcommand's options."},
            # images/s in every fit's logs; every process's RNG states in every checkpoint (exact resume)
            # precision None: measured on this machine for fit (convmixer_pl.speed), else Lightning's 32-true
            trainer_defaults={"callbacks": [ThroughputCallback(), ResumeState()], "precision": None},
            # AdamW + one-cycle are the module's (configure_optimizers); no --optimizer/--lr_scheduler to replace them
            auto_configure_optimizers=False,
            args=args,
            run=run,  # False: parse and instantiate only, as LightningCLI's
        )

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"convmixer-pl {version('convmixer-pl')}")
        return parser

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        for subparser in self._subcommand_parsers.values():
            shorten_help(subparser)
        if not self._with_tools:
            return
        subcommands = parser._subcommands_action  # jsonargparse's, made by add_subcommands() in the call above
        for name in TOOLS:
            function = tool_function(name)
            tool = self.init_parser(description=inspect.getdoc(function).split("\n\n")[0],
                                    usage=f"convmixer {name} [--config FILE] [options]")  # the options list them
            tool.add_function_arguments(function, fail_untyped=True)
            subcommands.add_subcommand(name, tool, help=inspect.getdoc(function).split("\n")[0])

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str, default="default",
                            help="Run name: checkpoints and logs go to checkpoints/<name>/ unless "
                                 "checkpoint.dirpath says otherwise")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: start over in a run folder that already holds a run, deleting its "
                                 "checkpoints (its logs stay)")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(StopGuard, "reliability")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(PlotWriter, "plots")
        parser.add_lightning_class_args(PerClassReport, "report")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc1",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "epoch{epoch:03d}",
            "checkpoint.auto_insert_metric_name": False,
            "data": {"class_path": "convmixer_pl.data.DigitsDataModule"},
        })
        # the preprocessing and classes, as one object; a data module that does not know them (a folder to
        # predict) has no data_config, and the model keeps its own (a checkpoint's)
        parser.link_arguments("data.data_config", "model.data_config", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        if subcommand in TOOLS:
            self._run_tool(subcommand)
        if subcommand is None:
            return
        config = self.config[subcommand]
        if (config.checkpoint.dirpath is None and subcommand != "fit" and config.name == "default"
                and config.ckpt_path not in (None, "last", "best") and Path(config.ckpt_path).is_file()):
            config.checkpoint.dirpath = str(Path(config.ckpt_path).parent)  # evaluated beside the run it evaluates
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path("checkpoints") / config.name)
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = config.checkpoint.dirpath
        try:
            config.ckpt_path = resolve_ckpt_path(subcommand, config.ckpt_path, Path(config.checkpoint.dirpath))
        except CheckpointError:
            if not config.model.get("pretrained"):
                raise
            # no checkpoint of this run: evaluate the released weights that model.pretrained names
            say(f"{subcommand} uses the weights of model.pretrained {config.model.pretrained}")
        self._check_checkpoint_and_folders(subcommand, config)
        self._fall_back_to_cpu(config.trainer, config.get("data"))
        if subcommand == "fit" and rank_zero_only.rank == 0:  # the job's first process speaks for the folder
            self._claim_run_folder(config)

    @staticmethod
    def _claim_run_folder(config) -> None:
        """One run per folder: a new fit where a run is stops (or, with --overwrite, deletes its checkpoints)."""
        folder = Path(config.checkpoint.dirpath)
        lock_run_folder(folder)
        existing = sorted(folder.glob("*.ckpt"))
        if config.ckpt_path is None and existing and not config.overwrite:
            raise CheckpointError(f"{folder}/ already holds a run ({', '.join(p.name for p in existing[:3])}): "
                                  "resume it with --ckpt_path last, start another with --name NEW_NAME, or start "
                                  "over with --overwrite true (deletes its checkpoints)")
        if config.ckpt_path is None and existing:
            for path in existing:
                path.unlink()
            say(f"--overwrite: deleted the {len(existing)} checkpoint(s) of the earlier run in {folder}/")

    def _run_tool(self, name: str) -> None:
        function = tool_function(name)
        options = self.parser.instantiate_classes(self.config)[name]
        kwargs = {key: options[key] for key in inspect.signature(function).parameters if key in options}
        wrote = run_entry_point(lambda: function(**kwargs), prog=f"convmixer {name}")
        if wrote is not None:
            print(f"convmixer {name}: wrote {wrote}", file=sys.stderr, flush=True)
        raise ToolFinished

    def _parse_ckpt_path(self) -> None:
        """Lightning's: the model's config takes the checkpoint's hyper-parameters (architecture, data config), read
        once through `read_checkpoint` (memory-mapped, checked, older checkpoints upgraded)."""
        if self._checkpoint is None:
            return
        # classes, channels, size: the data config's (its or the data module's); check_compatible names a mismatch
        hparams = {key: value for key, value in (self._checkpoint[1].get("hyper_parameters") or {}).items()
                   if key not in ("_instantiator", "num_classes", "in_chans", "image_size")}
        if hparams:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def _check_checkpoint_and_folders(self, subcommand: str, config) -> None:
        """Refuse, in one line, a --ckpt_path that is not a usable checkpoint and a folder that cannot be written."""
        if config.ckpt_path is not None:  # before Lightning reads it (right after this method)
            checkpoint = read_checkpoint(config.ckpt_path)
            if subcommand == "fit":
                check_resumable(config.ckpt_path, checkpoint)
                check_unfinished(config.ckpt_path, checkpoint, config.trainer)
            self._checkpoint = (config.ckpt_path, checkpoint)
            saved = check_hparams(config.ckpt_path, checkpoint)
            differ = [f"{key} {saved[key]} (not {config.model.get(key)})" for key in
                      ("dim", "depth", "kernel_size", "patch_size", "act")
                      if key in saved and config.model.get(key) is not None and saved[key] != config.model.get(key)]
            if differ:
                say(f"the model is built as {config.ckpt_path} was trained: " + ", ".join(differ))
        if subcommand == "fit":
            check_writable(config.checkpoint.dirpath, "checkpoint.dirpath")
        if config.trainer.get("logger") is not False:
            check_writable(config.trainer.default_root_dir, "trainer.default_root_dir")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        if config.get("ckpt_path") and config.model.get("pretrained"):
            config.model.pretrained = None  # the checkpoint holds the weights; don't read the file again
        if self.config.get("subcommand") == "predict":
            # predict logs no metrics: no log folder (and no config.yaml in one) per call; its output is the CSV
            self.save_config_callback = None
            if config.trainer.get("logger") is None:
                config.trainer.logger = False

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self._checkpoint is not None and self.model is not None:
            check_compatible(*self._checkpoint, self.model)  # e.g. another class count: one line, not a traceback

    def instantiate_trainer(self, **kwargs):
        """Default TensorBoard + CSV loggers, a learning-rate monitor, a model summary down to the blocks and the
        atomic checkpoint writer; a logger, summary, monitor or plugin that the config or command line sets wins."""
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("logger") in (None, True):
            kwargs.setdefault("logger", default_loggers(trainer.get("default_root_dir") or os.getcwd(),
                                                        self._resumed_log_version()))
        if trainer.get("logger") is not False and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor())
        if trainer.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary)
                                                                         for c in callbacks):
            # Lightning's own choice, Rich where installed, one level deeper: stem, blocks, pooling, head; the
            # Trainer's own default summary is then switched off (else it says it skipped it)
            callbacks.append(RichModelSummary(max_depth=2) if _RICH_AVAILABLE else ModelSummary(max_depth=2))
            kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("callbacks", callbacks)
        if not trainer.get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        if self.subcommand == "fit":
            kwargs.update(self._measured_speed(trainer))
        return super().instantiate_trainer(**kwargs)

    def _measured_speed(self, trainer) -> dict:
        """The precision, memory format and depthwise path measured for this model on this machine (cached), where
        the config leaves them unset (`convmixer_pl.speed`); the precision for the Trainer."""
        accelerator = str(trainer.get("accelerator") or "auto")
        if accelerator not in ("cpu", "gpu", "cuda", "auto") or not hasattr(self.datamodule, "data_config"):
            return {}
        # without a GPU, a gpu config was set to cpu (`_fall_back_to_cpu`)
        device = torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")
        hp = self.model.hparams
        given = {"precision": trainer.get("precision"), "channels_last": hp.channels_last,
                 "fast_depthwise_grad": hp.fast_depthwise_grad, "compile": hp.compile}
        # a resumed run trains as it was trained (exact resume); CONVMIXER_SPEED=default: no measurement
        saved = (self._checkpoint[1].get("speed") or {}) if self._checkpoint else {}
        given = {key: value if value is not None else saved.get(key) for key, value in given.items()}
        measuring = os.environ.get("CONVMIXER_SPEED") != "default"
        one_process = str(trainer.get("devices") or 1) in ("1", "auto") and (trainer.get("num_nodes") or 1) == 1
        if measuring and device.type == "cpu" and one_process:
            use_free_cpus(saved.get("threads"))
        if not measuring or all(value is not None for value in given.values()):
            choice = default_choice(device, hp.kernel_size, **given)
        else:
            crop = getattr(self.datamodule.augment, "crop_size", None) or self.datamodule.data_config.image_size
            shape = ModelShape.of(self.model.model, crop, self.datamodule.batch_size)
            choice = choose_speed(shape, device, **given, measure_now=one_process and rank_zero_only.rank == 0)
        self.model.use_speed(choice.channels_last, choice.fast_depthwise_grad, choice.precision)
        return {"precision": choice.precision}

    def _resumed_log_version(self) -> int | None:
        """The log version of the run `fit --ckpt_path` resumes, if it was written in this folder."""
        if self.subcommand != "fit" or self._checkpoint is None:
            return None
        states = self._checkpoint[1].get("callbacks") or {}
        return next((state.get("log_version") for key, state in states.items() if key.startswith("RunCheckpoint")
                     and isinstance(state.get("log_version"), int)), None)

    @staticmethod
    def _fall_back_to_cpu(trainer, data=None) -> None:
        """Run a GPU config on a machine without one, saying what changed, instead of crashing."""
        if torch.cuda.is_available() or trainer.accelerator not in ("gpu", "cuda"):
            return
        if (trainer.num_nodes or 1) > 1:  # one CPU process per node would wait for GPU ranks that never come
            raise CLIError(f"trainer.num_nodes is {trainer.num_nodes} with accelerator {trainer.accelerator}, but "
                           "this machine has no GPU: launch multi-node runs on the GPU nodes "
                           "(docs/distributed.md), or set --trainer.accelerator cpu for CPU processes")
        changes = [f"accelerator {trainer.accelerator} -> cpu"]
        trainer.accelerator = "cpu"
        if trainer.devices not in (1, "1"):
            changes.append(f"devices {trainer.devices} -> 1")
            trainer.devices = 1
        if trainer.strategy not in ("auto", None):
            strategy = getattr(trainer.strategy, "class_path", trainer.strategy)  # a name or a class_path
            changes.append(f"strategy {str(strategy).rsplit('.', 1)[-1]} -> auto")
            trainer.strategy = "auto"
        if trainer.precision is not None and cpu_fallback_precision(trainer.precision) is None:
            changes.append(f"precision {trainer.precision} -> measured on this CPU")  # never emulated bf16 or fp16
            trainer.precision = None
        if data is not None and (data.get("init_args") or {}).get("num_workers"):
            workers = cpu_fallback_workers(data.init_args.num_workers)
            if workers != data.init_args.num_workers:
                changes.append(f"data.num_workers {data.init_args.num_workers} -> {workers}")
                data.init_args.num_workers = workers
        say("no GPU found; falling back: " + ", ".join(changes))


def _run_cli(args) -> None:
    try:
        ConvMixerCLI(args=args)
    except ToolFinished:
        return
    except NothingToDo as done:
        say(str(done))
    except TrainingStopped as err:  # a signal or a non-finite loss: the message says what was saved
        if debugging():
            raise
        say(str(err))  # decided by all processes together, so once for the job
        sys.exit(err.exit_code)
    except SIGTERMException:  # Lightning's own stop: SIGTERM before training began, or a second one
        say("stopped by SIGTERM without saving a checkpoint")
        sys.exit(128 + signal.SIGTERM)
    finally:
        while _held_locks:  # the run folder is free for the next command (also when run in-process)
            _held_locks.pop().close()


def quiet_known_noise() -> None:
    """Leave out what a user cannot act on: Lightning's tips for its cloud services, a deprecation inside its own
    code and its warning that no seed_everything seeds 0 ("Seed set to 0" stays), and torch's "No CUDA runtime" note
    when it compiles the CPU depthwise kernel on a machine with CUDA's headers but no GPU."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.getMessage()).startswith("💡 Tip:"))
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not str(record.getMessage()).startswith("No CUDA runtime is found"))
    warnings.filterwarnings("ignore", "No seed found, seed set to")
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")


def main(args: list[str] | None = None) -> None:
    quiet_known_noise()
    run_entry_point(lambda: _run_cli(args))


if __name__ == "__main__":
    main()
