"""The ``tlkit`` command. This module imports only the standard library: ``tlkit --help`` answers without loading
Lightning or timm, and each command imports what it needs (:mod:`tlkit.commands`) once it is chosen.

tlkit fit --config recipes/quickstart.yaml [--trainer.max_epochs 3 ...]
tlkit validate|test|predict --config ... --ckpt_path ...
tlkit backbones [--filter 'convnext*'] [--pretrained true]
tlkit extract --backbone resnet50 --data.source folder:imgs/ --out feats.safetensors
tlkit export --ckpt_path run/last.ckpt --format onnx|torchscript|safetensors [--fuse-bn]
tlkit plot-schedule --config recipes/quickstart.yaml -o lr.png [--trainer.max_epochs 10 ...]
tlkit lr-find --config recipes/quickstart.yaml [-o lr_find.png] [--apply tuned.yaml]
tlkit soup --ckpt_path a.ckpt b.ckpt ... [--greedy] [-o soup.ckpt] [--config recipe.yaml]
tlkit optimize --source folder:imgs/ --out shards/ [--max_side 512]
tlkit fewshot --backbone resnet50 --data.source folder:imgs/ --shots 1,5,10

A known user error (a bad value, a missing file, a bad spec, a missing optional dependency) prints one paragraph and
exits with status 2; ``--debug`` (or ``TLKIT_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

# Every command, with its line in `tlkit --help` (tests/test_startup.py checks this against what tlkit.commands runs).
COMMANDS = {
    "fit": "Train a model from a recipe: tlkit fit --config recipes/quickstart.yaml",
    "validate": "Evaluate a checkpoint on the validation split (--config recipe --ckpt_path run/best.ckpt)",
    "test": "Evaluate a checkpoint on the test split (--config recipe --ckpt_path run/best.ckpt)",
    "predict": "Classify images with a checkpoint and write predictions.csv (path, class, probability)",
    "backbones": "List the backbones tlkit can create (timm and torchvision/...) [--filter 'convnext*']",
    "extract": "Extract a backbone's features of a data set into one .safetensors file",
    "export": "Export a checkpoint, preprocessing included, to ONNX, TorchScript or safetensors",
    "plot-schedule": "Draw a recipe's learning rate per parameter group at every step, without training",
    "lr-find": "Learning-rate range test of a recipe: suggestions, loss-vs-LR plot, --apply tuned.yaml",
    "soup": "Average checkpoints of one model (uniform or --greedy) into a new checkpoint",
    "optimize": "Write a source as litdata shards for multi-node streaming (--source folder:<dir> --out <dir>)",
    "fewshot": "Few-shot accuracy (nearest class mean, k-NN) of a backbone's features: --shots 1,5,10",
}

# Commands that are one function each, parsed by jsonargparse from its signature and docstring ("module:function");
# the others read a recipe (tlkit.commands.run). `tlkit backbones` needs timm, not Lightning.
FUNCTION_COMMANDS = {
    "backbones": "tlkit.cli:backbones",
    "extract": "tlkit.commands:extract",
    "export": "tlkit.commands:export",
    "optimize": "tlkit.data.shards:optimize",
    "fewshot": "tlkit.commands:fewshot",
}

# Modules of the optional extras (pyproject.toml [project.optional-dependencies]), and what needs them.
OPTIONAL_MODULES = {
    "onnx": ("onnx", "ONNX export"),
    "onnxruntime": ("onnx", "Checking an ONNX export"),
    "nbclient": ("notebooks", "Running the notebooks"),
    "nbformat": ("notebooks", "Running the notebooks"),
    "ipykernel": ("notebooks", "Running the notebooks"),
    "peft": ("adapters", "LoRA adapters"),
}

DEBUG_HINT = "(Add --debug or set TLKIT_DEBUG=1 for the full traceback.)"
PACKAGE_DIR = Path(__file__).resolve().parent


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``tlkit`` console script.

    Args:
        args: the command line without the program name. Given from Python, errors propagate as exceptions; from
            the command line (``None``), a known user error prints one paragraph and exits with status 2.
    """
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    # Every fresh CPU batch of float images (38 MB for 64 images of 224 px) otherwise costs a page fault per 4 KiB,
    # making normalising on a CPU "device" 2-3x slower than the arithmetic. PyTorch's CPU allocator backs
    # allocations of 2 MB and more with transparent huge pages when this is set; it reads it once, at its first
    # allocation, so it is set here, before anything imports torch. The command is tlkit's own process; `import
    # tlkit` leaves a user's process alone. A value the user set (THP_MEM_ALLOC_ENABLE=0 to opt out) is kept.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    debug = "--debug" in args or os.environ.get("TLKIT_DEBUG", "0") not in ("", "0")
    args = [arg for arg in args if arg != "--debug"]
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    if args[0] == "--version":
        print(f"tlkit {importlib.import_module('tlkit').__version__}")
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        _exit_with(f"unknown command {command!r}. The commands are {', '.join(COMMANDS)}; see `tlkit --help`.")
    try:
        run(command, rest)
    except BrokenPipeError:  # `tlkit backbones | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail too
    except Exception as err:
        message = None if debug or not from_command_line else user_error_message(err)
        if message is None:
            raise
        _exit_with(f"{command}: {message}\n{DEBUG_HINT}")


def run(command: str, args: list[str]) -> None:
    """Runs ``tlkit <command> <args>``, importing only what the command needs."""
    if command in FUNCTION_COMMANDS:
        from jsonargparse import CLI

        module, _, name = FUNCTION_COMMANDS[command].partition(":")
        function = getattr(importlib.import_module(module), name)
        CLI(function, args=flag_args(args), prog=f"tlkit {command}", exit_on_error=False)
    else:
        importlib.import_module("tlkit.commands").run(command, args)


def backbones(filter: str | None = None, pretrained: bool = False) -> None:
    """List the backbones tlkit can create.

    Args:
        filter: shell-style pattern, e.g. 'convnext*' or 'torchvision/res*'.
        pretrained: only those with pretrained weights.
    """
    names = [name for name in backbone_names(pretrained) if filter is None or fnmatch.fnmatch(name, filter)]
    print("\n".join(names) if names else f"No backbone matches {filter!r}.")


def backbone_names(pretrained: bool = False) -> list[str]:
    """:func:`tlkit.list_backbones` for the installed timm and torchvision, kept in the user's cache.

    timm's registry exists only once timm has imported every model definition (2-3x the time of ``import torch``),
    and it changes only with the installed timm and torchvision; so the names are read once and kept in a file whose
    name holds both versions and their ``models`` folders' modification times: another install is another file.
    """
    path = backbone_names_cache()
    key = "pretrained" if pretrained else "all"
    try:
        return json.loads(path.read_text())[key]
    except (OSError, ValueError, KeyError):  # not cached yet (or a damaged file): ask timm
        pass
    from tlkit.backbones import list_backbones

    names = {"all": list_backbones(), "pretrained": list_backbones(pretrained=True)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(names, tmp)
        os.replace(tmp.name, path)  # atomic: a command started meanwhile reads the whole file or none
    except OSError:
        pass  # a read-only cache: list the names all the same
    return names[key]


def backbone_names_cache() -> Path:
    """``$XDG_CACHE_HOME/tlkit/backbones-timm-<version>-<mtime>-torchvision-<version>-<mtime>.json``."""
    from importlib import metadata, util

    parts = []
    for package in ("timm", "torchvision"):
        spec = util.find_spec(package)  # finds, does not import
        models = Path(spec.submodule_search_locations[0]) / "models"
        parts.append(f"{package}-{metadata.version(package)}-{models.stat().st_mtime_ns}")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tlkit"
    return root / f"backbones-{'-'.join(parts)}.json"


def flag_args(args: list[str]) -> list[str]:
    """Accept ``--fuse-bn`` for ``--fuse_bn true``: dashes in option names, and bare boolean flags."""
    fixed = []
    for i, arg in enumerate(args):
        if arg.startswith("--") and "=" not in arg:
            arg = "--" + arg[2:].replace("-", "_")
            bare = i + 1 == len(args) or args[i + 1].startswith("--")
            arg = f"{arg}=true" if bare and arg not in ("--help", "--print_config") else arg
        fixed.append(arg)
    return fixed


def usage() -> str:
    """``tlkit --help``: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items()]
    return "\n".join(
        [
            "usage: tlkit <command> [options]   (tlkit <command> --help for the command's options)",
            "",
            "Transfer learning for image models on PyTorch Lightning.",
            "",
            "commands:",
            *lines,
            "",
            "--debug (or TLKIT_DEBUG=1) shows the full traceback of an error.",
        ]
    )


def _exit_with(message: str) -> None:
    print(f"tlkit {message}", file=sys.stderr)
    sys.exit(2)


def user_error_message(err: BaseException) -> str | None:
    """One paragraph for an error the user can fix, or None for a bug (whose traceback is shown).

    Library layers wrap the real error (jsonargparse reports a recipe's bad value as "Does not validate against
    any of the Union subtypes", with the hint tlkit gave nested inside), so this walks the chain of causes, outermost
    first, and takes the first one that is tlkit's own error, a missing file, a missing optional dependency, or a
    bad command-line value.
    """
    chain = _causes(err)
    for cause in chain:
        if isinstance(cause, ModuleNotFoundError):
            continue  # a bare `import` in tlkit's code; below, the missing package is named
        if isinstance(cause, ValueError | TypeError | ImportError | KeyError) and _raised_by_tlkit(cause):
            return _one_paragraph(str(cause.args[0]) if isinstance(cause, KeyError) and cause.args else str(cause))
        if isinstance(cause, FileNotFoundError | IsADirectoryError | NotADirectoryError):
            return _one_paragraph(str(cause))
    missing = next((c for c in chain if isinstance(c, ModuleNotFoundError)), None)
    if missing is not None:
        return missing_dependency_message(missing)
    parse_error = next((c for c in chain if type(c).__name__ == "ArgumentError"), None)
    return None if parse_error is None else bad_argument_message(chain[chain.index(parse_error) :])


def missing_dependency_message(err: ModuleNotFoundError) -> str | None:
    """ "ONNX export needs onnx: pip install 'tlkit[onnx]'" for a module of an optional extra; any other missing
    third-party module is a core dependency (or one of theirs) that a partial install lacks; a missing tlkit module is
    a bug (None: its traceback is shown)."""
    module = (err.name or "").partition(".")[0]
    if module in OPTIONAL_MODULES:
        extra, purpose = OPTIONAL_MODULES[module]
        return f"{purpose} needs {module}: pip install 'tlkit[{extra}]'"
    if not module or module == __package__:
        return None
    return f"{module} is not installed, and tlkit needs it: pip install tlkit (in a checkout: pip install -e .)"


def bad_argument_message(chain: list[BaseException]) -> str:
    """A parse error as ``--model.lr: Expected a <class 'float'>. Got value: abc``: the keys named along the chain
    joined into the option the user wrote, and the innermost reason (below jsonargparse's Union wrappers)."""
    keys, reason = [], ""
    for cause in chain:
        text = str(cause)
        match = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
        if match:
            keys.append(match.group(1))
            text = match.group(2)
        if not text.startswith(("Does not validate against any of the Union subtypes", "Problem with given")):
            reason = text
    option = f"--{'.'.join(_dedupe_nested(keys))}: " if keys else ""
    return _one_paragraph(f"{option}{reason}")


def _dedupe_nested(keys: list[str]) -> list[str]:
    """jsonargparse names a key in full and then again inside its own parser: ``model``, ``lr`` -> ``model.lr``,
    but ``trainer.max_epochs``, ``trainer.max_epochs`` -> ``trainer.max_epochs``."""
    joined: list[str] = []
    for key in keys:
        if not joined or not ".".join(joined).endswith(key):
            joined.append(key)
    return joined


def _causes(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _raised_by_tlkit(err: BaseException) -> bool:
    """Whether the ``raise`` was in tlkit's own code, where messages name the value and the fix (elsewhere a
    ValueError may be an internal failure whose traceback is needed)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


def _one_paragraph(text: str) -> str:
    """jsonargparse indents nested errors over several lines; one line reads better in a terminal."""
    return re.sub(r"\s*\n\s*", " ", text.strip())


def __getattr__(name: str) -> Any:
    """``tlkit.cli.PredictionCSVWriter`` (a recipe's ``class_path``), ``from tlkit.cli import recipe_lr_schedule``:
    names defined in :mod:`tlkit.commands` before it was split off, imported when first used."""
    if name.startswith("__"):  # probes such as __wrapped__ or __path__ need not import Lightning
        raise AttributeError(name)
    commands = importlib.import_module("tlkit.commands")
    try:
        return getattr(commands, name)
    except AttributeError:
        raise AttributeError(f"module 'tlkit.cli' has no attribute {name!r}") from None


if __name__ == "__main__":
    main()
