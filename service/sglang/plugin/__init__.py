"""The SGLang plugin that makes the Gated DeltaNet layers of SGLang 0.5.17 decode with the KVBuffer kernels.

SGLang loads it in every process (`Engine`, each tensor-parallel scheduler, the detokenizer) through the entry
point group `sglang.srt.plugins` (name `kvbuffer`; allow-list it with `SGLANG_PLUGINS=kvbuffer`). `register`
makes the process dump its Python stacks on SIGUSR1 (SGLang uses no SIGUSR1), reads the settings (settings.py),
checks the SGLang version, registers the hooks (hooks.py), applies them and stops the process with one line if
any did not take.
"""

from __future__ import annotations

import logging
import pkgutil

from kvbuffer.service import stacks

from . import checks, hooks
from .settings import PluginSettings

logger = logging.getLogger(__name__)


def register() -> None:
    """The entry point SGLang's `load_plugins` calls."""
    import sglang
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    stacks.install()  # a stalled SGLang process shows where it is: `kvbuffer serve` sends SIGUSR1 (service/stacks.py)

    problem = checks.version_problem(sglang.__version__)
    if problem:
        raise checks.Refused(problem)
    try:
        settings = PluginSettings.from_env()
    except ValueError as e:
        raise checks.Refused(f"kvbuffer: {e}") from None
    hooks.SETTINGS = settings
    plan = hooks.targets(settings)
    before = {target: pkgutil.resolve_name(target) for target, _, _ in plan}
    for target, hook, kind in plan:
        HookRegistry.register(target, hook, HookType[kind])
    HookRegistry.apply_hooks()  # SGLang applies them again after every plugin ran: idempotent
    problem = checks.hooks_problem(before, {target: pkgutil.resolve_name(target) for target in before})
    if problem:
        raise checks.Refused(problem)
    logger.info("kvbuffer: plugin registered (%s)", settings)
