"""The documentation builds and every example in it runs, so none drifts from the code.

Examples are the fenced ```bash and ```python blocks of README.md and docs/*.md. They all run in ONE subprocess (one
import of torch and Lightning for all of them), in document order (README first, then the pages in mkdocs.yml's
order), with its working directory a fresh temporary folder that holds a link to the repository's ``recipes/``:

- a shell block is one or more ``tlkit ...`` commands, each run in that process through ``tlkit.cli.main``;
- the Python blocks of one file share one namespace, in order, as the cells of a notebook would.

The README's main job (``tlkit fit --config recipes/quickstart.yaml``) runs first, and the later examples use its run
(``runs/quickstart/version_0/checkpoints/last.ckpt``). A block that cannot run here (it installs packages, needs
several nodes, a GPU, a network, or takes minutes) has ``<!-- not-run: <why> -->`` on the line before its fence; such
blocks are reported as skipped with their name and reason, so the list shows in every test run (``pytest -rs``). A
block that shows correct use but fails on a reported bug has ``<!-- known-bug: <what> -->``: it runs, is expected to
fail (xfail), and its test turns red once it passes, so the marker goes with the fix.
Training commands run shortened (FAST_OPTIONS, FAST_TRAINER below). ```yaml blocks are recipe excerpts: their
``init_args`` keys are checked against the classes they name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = re.compile(r"^<!-- not-run: (?P<why>.+?) -->$")
# An example that shows correct use but fails because of a reported bug: it runs, and its test expects the failure,
# so the bug shows as xfailed in every run, and the fix turns the test red until the marker goes.
KNOWN_BUG = re.compile(r"^<!-- known-bug: (?P<what>.+?) -->$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")

# The examples train as written, only shorter: these options are added to each `tlkit` command of that kind (where the
# command does not set the option itself) so that all examples together take well under a minute on 2 CPU cores: one
# epoch of two batches, evaluation on two batches, no sanity-check batches, no loader worker processes. Nothing else
# about a command changes: the same recipe, model, data, callbacks and files written.
FAST_OPTIONS = {
    "fit": {"--trainer.max_epochs": "1", "--trainer.limit_train_batches": "2", "--trainer.limit_val_batches": "2",
            "--trainer.num_sanity_val_steps": "0"},
    "validate": {"--trainer.limit_val_batches": "2"},
    "test": {"--trainer.limit_test_batches": "2"},
    "predict": {"--trainer.limit_predict_batches": "2"},
    "lr-find": {"--num_training": "10"},
}  # fmt: skip
RECIPE_COMMANDS = ("fit", "validate", "test", "predict", "plot-schedule", "lr-find")
NO_WORKERS = {"--data.init_args.num_workers": "0"}

# The same for the Trainers that Python examples (and commands such as `soup`) build themselves: every
# lightning.Trainer in the runner runs at most MAX_EPOCHS epochs of FAST_TRAINER's batches. (At most: the resume
# example's second epoch stays.)
MAX_EPOCHS = 2
# (Not limit_predict_batches: a LinearProbe extracts the features of all its images through a predict loop.)
FAST_TRAINER = dict(limit_train_batches=2, limit_val_batches=2, limit_test_batches=2, num_sanity_val_steps=0)

# Files the examples name as the user's own images: `my_photos/<class>/*.png` (two classes of six 40-px images).
USER_FOLDER = "my_photos"


@dataclass
class Block:
    file: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when the block is marked not-run
    known_bug: str | None = None  # the bug, when the block is marked known-bug

    @property
    def name(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files() -> list[Path]:
    """README.md, then the pages in the order of mkdocs.yml's nav (the reader's order)."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [ROOT / "README.md", *(ROOT / "docs" / page for page in _nav_pages(nav))]


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    items = nav.values() if isinstance(nav, dict) else nav
    return [page for item in items for page in _nav_pages(item)]


def harvest(path: Path) -> list[Block]:
    """The fenced ```bash, ```python and ```yaml blocks of a Markdown file, each with its not-run marker, if any."""
    blocks, lines = [], path.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        if fence["lang"] in ("bash", "python", "yaml"):
            before = lines[index - 1] if index else ""
            not_run, known_bug = NOT_RUN.match(before), KNOWN_BUG.match(before)
            code = "\n".join(lines[index + 1 : end])
            blocks.append(Block(str(path.relative_to(ROOT)), index + 1, fence["lang"], code,
                                not_run and not_run["why"], known_bug and known_bug["what"]))  # fmt: skip
        index = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in harvest(path)]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, each split as the shell would."""
    joined = re.sub(r"\\\n", " ", code)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def fast_command(args: list[str]) -> list[str]:
    """A `tlkit` command's arguments with the FAST_OPTIONS of its kind added, except those the command sets itself (a
    resume example's `--trainer.max_epochs 2` stays 2)."""
    command = args[0]
    options = {**FAST_OPTIONS.get(command, {}), **(NO_WORKERS if command in RECIPE_COMMANDS else {})}
    given = {arg.split("=")[0] for arg in args}
    return args + [part for option, value in options.items() if option not in given for part in (option, value)]


# --- the runner: `python tests/test_docs.py <blocks.json>` in the temporary folder --------------------------------


def _shorten_trainers() -> None:
    import functools

    import lightning

    init = lightning.Trainer.__init__

    @functools.wraps(init)
    def short_init(self, *args, **kwargs):
        epochs = kwargs.get("max_epochs")
        # None: Lightning's 1000 epochs; -1: no limit
        epochs = MAX_EPOCHS if epochs is None or epochs < 0 else min(epochs, MAX_EPOCHS)
        init(self, *args, **{**kwargs, **FAST_TRAINER, "max_epochs": epochs})

    lightning.Trainer.__init__ = short_init


def _end_process_state() -> None:
    """What the end of a `tlkit` process does and an in-process call does not: shut W&B down (its service writes the
    offline run's files, the config among them, when the process exits)."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def run_blocks(blocks: list[Block]) -> None:
    """Runs the blocks in order and prints one JSON line per block: its name and the error, if any."""
    import traceback

    from tlkit.cli import main

    _shorten_trainers()
    namespaces: dict[str, dict] = {}
    done: set[str] = set()  # a command repeated on another page runs once (the README's main job, for one)
    for block in blocks:
        error, start = None, time.perf_counter()
        try:
            if block.lang == "python":
                namespace = namespaces.setdefault(block.file, {"__name__": "__main__"})
                exec(compile(block.code, block.name, "exec"), namespace)
            else:
                for args in shell_commands(block.code):
                    if shlex.join(args) in done:
                        continue
                    done.add(shlex.join(args))
                    if args[0] != "tlkit":
                        raise ValueError(f"{args[0]!r} is not a tlkit command: mark the block <!-- not-run: why -->")
                    main(fast_command(args[1:]))
                    _end_process_state()
        except BaseException:  # noqa: B036 - SystemExit included: a failing command must not end the run
            error = traceback.format_exc()
        seconds = round(time.perf_counter() - start, 1)
        print("BLOCK " + json.dumps({"name": block.name, "error": error, "seconds": seconds}), flush=True)


def write_user_folder(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in (("cat", 40), ("dog", 200)):
        (root / label).mkdir(parents=True)
        for index in range(6):
            pixels = colour + rng.integers(0, 30, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")


# --- the tests ----------------------------------------------------------------------------------------------------

BLOCKS = [block for block in all_blocks() if block.lang in ("bash", "python")]  # the examples that run
RECIPE_EXCERPTS = [block for block in all_blocks() if block.lang == "yaml"]


@pytest.fixture(scope="session")
def doc_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    """Runs every runnable block once; returns the working folder and each block's error (None: it ran)."""
    work = tmp_path_factory.mktemp("docs_examples")
    (work / "recipes").symlink_to(ROOT / "recipes")
    (work / "docs").mkdir()  # plot-schedule examples write their pictures to docs/
    write_user_folder(work / USER_FOLDER)
    runnable = [asdict(block) for block in BLOCKS if not block.not_run]
    (work / "blocks.json").write_text(json.dumps(runnable))
    # One intra-op thread (as conftest's one_thread fixture): on a shared 2-core machine two threads spinning against
    # each other made the first step of each new shape take seconds, the examples 100 s instead of 50.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run([sys.executable, __file__, str(work / "blocks.json")], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    (work / "runner.log").write_text(result.stdout + result.stderr)  # each block's time is in its BLOCK line
    errors = {}
    for line in result.stdout.splitlines():
        if line.startswith("BLOCK "):
            record = json.loads(line[len("BLOCK ") :])
            errors[record["name"]] = record["error"]
    assert len(errors) == len(runnable), (
        f"the example runner stopped (rc {result.returncode}):\n{result.stderr[-4000:]}"
    )
    return work, errors


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: f"{block.name}-{block.lang}")
def test_example_runs(block: Block, doc_run) -> None:
    if block.not_run:
        pytest.skip(f"{block.name} not-run: {block.not_run}")
    _, errors = doc_run
    if block.known_bug:
        assert errors[block.name] is not None, f"{block.name} runs now: remove its <!-- known-bug: --> marker"
        pytest.xfail(f"{block.name} known bug: {block.known_bug}")
    assert errors[block.name] is None, f"{block.name} ({block.lang}) failed:\n{block.code}\n\n{errors[block.name]}"


def test_main_job_leaves_the_run_directory_the_readme_lists(doc_run) -> None:
    work, errors = doc_run
    run = work / "runs" / "quickstart" / "version_0"
    listed = ["config.yaml", "metrics.csv", "val_confusion_matrix.png", "val_misclassified.png",
              "checkpoints/last.ckpt", "checkpoints/best-epoch=0.ckpt"]  # fmt: skip
    assert [name for name in listed if not (run / name).is_file()] == []
    readme = (ROOT / "README.md").read_text()
    assert all(Path(name).name.split("=")[0] in readme for name in listed)


def test_every_shell_example_is_a_tlkit_command_or_marked_not_run() -> None:
    for block in BLOCKS:
        if block.lang == "bash" and not block.not_run:
            assert [args[0] for args in shell_commands(block.code)] == ["tlkit"] * len(shell_commands(block.code)), (
                f"{block.name}: only `tlkit` commands run here; mark the block <!-- not-run: why -->"
            )


def test_the_docs_have_examples_and_few_are_not_run() -> None:
    """Guards the harvest itself (a parser that found nothing would pass everything) and keeps not-run the exception."""
    files = {block.file for block in BLOCKS}
    assert {"README.md", "docs/python-api.md", "docs/data.md", "docs/features.md"} <= files
    not_run = [block for block in BLOCKS if block.not_run]
    assert len(not_run) <= len(BLOCKS) // 3, [f"{block.name}: {block.not_run}" for block in not_run]


def test_fast_options_append_to_training_commands_only() -> None:
    assert fast_command(["fit", "--config", "r.yaml"])[:3] == ["fit", "--config", "r.yaml"]
    assert "--trainer.max_epochs" in fast_command(["fit", "--config", "r.yaml"])
    resume = fast_command(["fit", "--config", "r.yaml", "--trainer.max_epochs", "2"])
    assert resume.count("--trainer.max_epochs") == 1 and "--trainer.limit_train_batches" in resume
    assert fast_command(["fit", "--trainer.max_epochs=2"]).count("--trainer.max_epochs") == 0
    assert fast_command(["export", "--ckpt_path", "x.ckpt"]) == ["export", "--ckpt_path", "x.ckpt"]


def test_readme_is_the_first_screen() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("block", RECIPE_EXCERPTS, ids=lambda block: block.name)
def test_recipe_excerpts_name_real_arguments(block: Block) -> None:
    """A ```yaml block shows (part of) a recipe; every `init_args` key it gives must be an argument of its class."""
    import importlib
    import inspect

    recipe = yaml.safe_load(block.code)
    default_class = {"model": "tlkit.TransferClassifier", "data": "tlkit.ImageDataModule"}  # an excerpt may omit it
    for section in ("model", "data"):
        if section in recipe:
            module, _, name = recipe[section].get("class_path", default_class[section]).rpartition(".")
            parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
            assert sorted(set(recipe[section]["init_args"]) - set(parameters)) == [], f"{block.name} {section}"


def test_every_public_name_has_an_api_reference_page() -> None:
    """The API reference is generated from docstrings, one `::: tlkit.<name>` per public name (tlkit.__all__)."""
    import tlkit

    reference = "\n".join(page.read_text() for page in (ROOT / "docs" / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: tlkit\.(\w+)$", reference, flags=re.MULTILINE))
    assert sorted(set(tlkit.__all__) - documented) == []
    assert sorted(documented - set(tlkit.__all__)) == []


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "models" / "index.html").is_file()


if __name__ == "__main__":
    run_blocks([Block(**block) for block in json.loads(Path(sys.argv[1]).read_text())])
