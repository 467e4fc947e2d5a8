"""Loggers that keep secrets out of runs: a W&B logger that goes offline by itself, and scrubbing for any logger.

- :class:`WandbLogger`: Lightning's ``WandbLogger``, offline (with one line saying how to upload later) when no
  API key is configured, quiet, and scrubbing secrets from what it logs as config and from the command line W&B
  records with the run.
- :func:`scrub_logged_hyperparameters`: the same scrubbing of hyperparameters for a logger of any class.

Lightning's own ``WandbLogger`` only creates its run on global rank 0, so a DDP job has one W&B run.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from tlkit.secrets import scrub_secrets


def wandb_credentials_found() -> bool:
    """Whether W&B could authenticate without asking: ``WANDB_API_KEY``, an identity token file, or ``wandb login``
    (an entry for the W&B host in ``~/.netrc``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` that never blocks: offline unless W&B credentials are configured.

    With ``offline=None`` (the default) the run goes online only when an API key is configured (``WANDB_API_KEY``
    or ``wandb login``) or ``WANDB_MODE`` says so; otherwise it is written to ``<save_dir>/wandb/offline-run-*`` and
    one line says how to upload it (``wandb sync <dir>``). W&B's own console output is silenced unless
    ``quiet=False``. Hyperparameters are scrubbed of secrets (:func:`~tlkit.secrets.scrub_secrets`) before they are
    logged.

    Args:
        project: W&B project.
        name: display name of the run.
        save_dir: folder that holds the ``wandb/`` run folders.
        version: run id, to resume a run.
        offline: ``True``/``False`` to force; ``None`` decides from the credentials (see above).
        log_model: upload checkpoints as artifacts: ``True`` (at the end, the best and last), ``"all"`` (as they are
            saved) or ``False``.
        entity: W&B team or user.
        group: group of runs (e.g. a sweep).
        tags: run tags.
        quiet: silence W&B's own console messages.
        **kwargs: passed to ``wandb.init``.

    Example:
        >>> logger = WandbLogger(project="tlkit", save_dir="runs/quickstart_wandb")  # offline without an API key
    """

    def __init__(
        self,
        project: str | None = "tlkit",
        name: str | None = None,
        save_dir: str = ".",
        version: str | None = None,
        offline: bool | None = None,
        log_model: bool | Literal["all"] = False,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        quiet: bool = True,
        **kwargs: Any,
    ):
        self.auto_offline = offline is None and not os.environ.get("WANDB_MODE") and not wandb_credentials_found()
        if (self.auto_offline or offline) and kwargs.get("mode") is None:
            # wandb's own offline mode rather than Lightning's `offline=True`, which refuses `log_model`: offline
            # runs keep their artifacts, and `wandb sync` uploads them with the rest.
            kwargs["mode"] = "offline"
        self.mode = kwargs.get("mode")  # the wandb.init mode this logger asks for (None: wandb's own choice)
        if quiet and kwargs.get("settings") is None:  # the CLI passes every wandb.init argument, None if unset
            import wandb

            kwargs["settings"] = wandb.Settings(silent=True)
        Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to a temp dir if it does not exist
        extra = {k: v for k, v in dict(entity=entity, group=group, tags=tags).items() if v is not None}
        # wandb.init's own arguments (notes, name, tags, config...) go to the .wandb log as they are.
        name, extra, kwargs = scrub_secrets((name, extra, kwargs))
        super().__init__(
            name=name,
            save_dir=save_dir,
            version=version,
            offline=False,
            project=project,
            log_model=log_model,
            **extra,
            **kwargs,
        )
        # Lightning always passes `anonymous` to wandb.init (None when unset), and wandb warns that the setting has
        # no effect. Lightning has no public way to leave an init argument out, so it is taken out of the arguments
        # Lightning keeps for wandb.init (its private `_wandb_init`).
        self._wandb_init.pop("anonymous", None)
        self._announced = False  # the "saved offline" line is said once, when the run is first created

    @property
    def offline(self) -> bool:
        """Whether the run is (or will be) written offline, by this logger's choice or ``WANDB_MODE``."""
        return (self.mode or os.environ.get("WANDB_MODE")) in ("offline", "dryrun")

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        with _scrubbed_argv():  # wandb records the command line with the run
            run = super().experiment
        if not self._announced and getattr(run, "offline", False) and getattr(run, "dir", None):
            run_dir = os.path.relpath(Path(run.dir).parent)
            why = "no API key found, " if self.auto_offline else ""
            rank_zero_info(f"W&B: {why}run saved offline to {run_dir}; upload it later with: wandb sync {run_dir}")
        self._announced = True
        return run

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        super().log_hyperparams(scrub_secrets(as_dict(params)))


@contextlib.contextmanager
def _scrubbed_argv() -> Iterator[None]:
    original = sys.argv
    sys.argv = scrub_secrets(list(original))
    try:
        yield
    finally:
        sys.argv = original


def as_dict(params: Any) -> Any:
    """Hyperparameters as a plain dict where they come as a jsonargparse ``Namespace`` or another mapping."""
    if hasattr(params, "as_dict"):  # jsonargparse Namespace
        return params.as_dict()
    return dict(params) if not isinstance(params, dict) and hasattr(params, "keys") else params


def scrub_logged_hyperparameters(logger: Logger) -> Logger:
    """Makes ``logger.log_hyperparams`` scrub secrets first (for any logger: Lightning logs the module's and data
    module's hyperparameters itself, e.g. into CSV's ``hparams.yaml``); returns the logger."""
    if isinstance(logger, WandbLogger) or getattr(logger.log_hyperparams, "scrubs_secrets", False):
        return logger  # already scrubs
    log_hyperparams = logger.log_hyperparams

    # An instance attribute, not a subclass: it works for whatever logger class a recipe names.
    def scrubbed(params: Any, *args: Any, **kwargs: Any) -> Any:
        return log_hyperparams(scrub_secrets(as_dict(params)), *args, **kwargs)

    scrubbed.scrubs_secrets = True
    logger.log_hyperparams = scrubbed
    return logger


__all__ = ["WandbLogger", "as_dict", "scrub_logged_hyperparameters", "wandb_credentials_found"]
