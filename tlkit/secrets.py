"""What counts as a secret, and scrubbing it from anything a run writes.

The rule (documented in the README, "Runs, checkpoints and secrets"): a value is secret when it is

1. the value of an environment variable whose name looks secret (``WANDB_API_KEY``, ``*_TOKEN``, ``*_SECRET``...),
2. the value of a command-line option whose last key looks secret (``--x.api_key V``, ``--x.token=V``),
3. token-shaped, wherever it appears: credentials in a URL (``user:password@host``, ``?token=...``, ``&sig=...``),
   or a well-known token format (``hf_...``, ``ghp_...``, ``github_pat_...``, ``sk-...``, ``xoxb-...``, ``AKIA...``),
4. any string under a secret-looking key in a config (``api_key: ...``, ``password: ...``).

Each is replaced by ``***``, in place inside longer strings (``folder:/data/<token>`` -> ``folder:/data/***``).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

REDACTED = "***"
# Environment variables whose values must never reach a run directory (matched on the name, case-insensitive).
# Not SESSION or AUTHOR: DESKTOP_SESSION=ubuntu or GIT_AUTHOR_NAME would turn /home/ubuntu/data into /home/***/data.
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH(?!OR)|COOKIE|PRIVATE", re.IGNORECASE)
# "key" alone is too common a config name (e.g. "monitor_key"), so only compound names like api_key count.
SECRET_KEY = re.compile(r"(api|access|secret|private)_?key|token|passw|secret|credential", re.IGNORECASE)
# Token-shaped substrings: the secret part is group "secret" (the URL's user name or parameter name stays readable).
TOKEN_PATTERNS = (
    re.compile(r"://[^/:@\s]+:(?P<secret>[^/@\s]+)@"),  # scheme://user:password@host
    re.compile(r"[?&](?:[\w-]*(?:token|key|secret|signature|sig|password|passwd|auth))=(?P<secret>[^&#\s]+)", re.I),
    re.compile(r"(?<![\w-])(?P<secret>(?:hf|ghp|gho|ghs|ghu|github_pat|glpat|xox[abpsr]|sk|pk)[_-][A-Za-z0-9_-]{16,})"),
    re.compile(r"(?<![A-Z0-9])(?P<secret>(?:AKIA|ASIA)[A-Z0-9]{16})(?![A-Z0-9])"),
)
_MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would redact half the config without protecting anything


def secret_values(environ: dict[str, str] | None = None, argv: list[str] | None = None) -> dict[str, str]:
    """Secret values (rules 1 and 2 above) -> where each came from (the variable's name or the option).

    Args:
        environ: environment variables (default: ``os.environ``).
        argv: command line (default: ``sys.argv``).
    """
    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    found = {value: name for name, value in environ.items() if SECRET_NAME.search(name)}
    found |= {value: option for option, value in _options(argv) if SECRET_KEY.search(option.rsplit(".", 1)[-1])}
    return {value: name for value, name in found.items() if len(value) >= _MIN_SECRET_LENGTH}


def _options(argv: list[str]) -> list[tuple[str, str]]:
    """``(option, value)`` pairs of ``--option value`` and ``--option=value`` in a command line."""
    pairs = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            pairs.append(tuple(arg[2:].split("=", 1)))
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((arg[2:], argv[i + 1]))
    return pairs


def scrub_secrets(value: Any, secrets: dict[str, str] | None = None) -> Any:
    """A copy of ``value`` (nested dicts, lists, strings) with secrets replaced by ``"***"``; other objects
    (tensors, numbers) are returned as they are.

    Args:
        value: what to scrub.
        secrets: secret values (default: :func:`secret_values` of this process's environment and command line).

    Example:
        >>> scrub_secrets({"url": "https://x?token=abc123xyz"}, {})
        {'url': 'https://x?token=***'}
    """
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        scrubbed = {
            k: REDACTED if is_secret_key(k) and isinstance(v, str) and v else scrub_secrets(v, secrets)
            for k, v in value.items()
        }
        return scrubbed if type(value) is dict else _same_type(value, scrubbed)
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):  # not namedtuples: their fields differ
        return type(value)(scrub_secrets(v, secrets) for v in value)
    if isinstance(value, str):
        return scrub_string(value, secrets)
    return value


def scrub_string(text: str, secrets: dict[str, str]) -> str:
    """``text`` with the given secret values and token-shaped substrings replaced by ``"***"``."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pattern in TOKEN_PATTERNS:
        text = pattern.sub(lambda m: m.group(0).replace(m.group("secret"), REDACTED), text)
    return text


def is_secret_key(key: Any) -> bool:
    """Whether a config key names a secret (``api_key``, ``token``, ``password``...)."""
    return isinstance(key, str) and bool(SECRET_KEY.search(key))


def _same_type(original: dict, scrubbed: dict) -> dict:
    # Keep OrderedDict / AttributeDict, which checkpoints and hparams use, when the type can be built from a dict.
    try:
        return type(original)(scrubbed)
    except TypeError:
        return scrubbed


__all__ = ["REDACTED", "scrub_secrets", "scrub_string", "secret_values"]
