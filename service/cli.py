"""The `kvbuffer` command: `serve` runs the gRPC server, `generate` streams a completion to the terminal,
`operator` runs the Kubernetes operator (needs the `operator` extra).

Every flag is generated from a settings model (ServiceSettings, GenerateSettings), so `--help` lists each
setting with its description, default, allowed values and environment variable, and nothing is declared
twice. Bad settings end the command with one line naming the setting (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import io
import logging
import os
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from kvbuffer.operator.settings import ENV_PREFIX as OPERATOR_ENV_PREFIX
from kvbuffer.operator.settings import OperatorSettings
from kvbuffer.service.server.client import GenerateSettings
from kvbuffer.service.server.settings import (
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    ServiceSettings,
    SettingsError,
    describe_errors,
    load_settings,
)
from kvbuffer.v1 import kvbuffer_pb2 as pb
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

EXIT_USAGE = 2
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))  # pydantic's constraint metadata


def _settings_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted name, field) of every leaf setting; nested models become `tls.cert_file`."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _settings_fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _without_none(annotation: Any) -> Any:
    """`int | None` -> int: optional settings take the same flag as required ones."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _help(field: FieldInfo, env_var: str) -> str:
    annotation = _without_none(field.annotation)
    facts = []
    if typing.get_origin(annotation) is typing.Literal:
        facts.append("one of " + ", ".join(str(a) for a in typing.get_args(annotation)))
    facts += [f"{sign} {bound}" for m in field.metadata for attribute, sign in _BOUNDS
              if (bound := getattr(m, attribute, None)) is not None]
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if default not in (None, [], {}):  # an empty list or dict means "none given": the description says what then
        facts.append(f"default {default}")
    facts.append(f"env {env_var}")
    return f"{field.description or ''} [{'; '.join(facts)}]".replace("%", "%%")


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseModel], env_prefix: str) -> None:
    """One flag per setting: `--buffer-size`, `--tls-cert-file`; values are validated by the model, not argparse."""
    group = parser.add_argument_group("settings", f"Each flag is also read from the environment ({env_prefix}NAME, "
                                                  f"nested {env_prefix}GROUP{ENV_NESTED_DELIMITER}NAME); flags "
                                                  "win over the environment.")
    for dotted, field in _settings_fields(model):
        annotation = _without_none(field.annotation)
        env_var = env_prefix + dotted.upper().replace(".", ENV_NESTED_DELIMITER)
        kwargs: dict[str, Any] = {"dest": dotted, "default": argparse.SUPPRESS, "help": _help(field, env_var)}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:
            kwargs.update(action="append", metavar="VALUE")
        else:
            kwargs["metavar"] = dotted.rsplit(".", 1)[-1].upper()
        group.add_argument("--" + dotted.replace(".", "-").replace("_", "-"), **kwargs)


def settings_values(namespace: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The settings given as flags, as the nested dict the model takes."""
    given = vars(namespace)
    values: dict[str, Any] = {}
    for dotted, _field in _settings_fields(model):
        if dotted in given:
            *groups, name = dotted.split(".")
            target = values
            for group in groups:
                target = target.setdefault(group, {})
            target[name] = given[dotted]
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbuffer", description="KVBuffer inference service.")
    parser.add_argument("--version", action="version", version=f"kvbuffer {importlib.metadata.version('kvbuffer')}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server", description=(
        "Serve the kvbuffer.v1 gRPC API (with grpc.health.v1 and reflection) and Prometheus metrics. SIGTERM "
        "or Ctrl-C drains: health NOT_SERVING, new requests refused, in-flight ones finish within the grace period "
        "(those still running then end with finish reason CANCELLED); a second signal exits at once."))
    serve.add_argument("--config", type=Path, default=os.environ.get(f"{ENV_PREFIX}CONFIG"), metavar="FILE",
                       help="YAML (.yaml, .yml) or TOML (.toml) file of settings, keyed like the flags' names "
                            "with underscores (buffer_size: 64; tls: {cert_file: ...}); overrides the "
                            f"environment, overridden by flags [env {ENV_PREFIX}CONFIG]")
    add_settings_flags(serve, ServiceSettings, ENV_PREFIX)
    generate = commands.add_parser("generate", help="stream a completion to the terminal", description=(
        "Stream a completion from a kvbuffer server to stdout; usage and KVBuffer statistics go to stderr."))
    generate.add_argument("prompt", help="prompt text")
    add_settings_flags(generate, GenerateSettings, "KVBUFFER_CLIENT_")
    operator = commands.add_parser("operator", help="run the Kubernetes operator", description=(
        "Reconcile KVBufferService resources into Deployments, ConfigMaps and Services and autoscale them from "
        "their replicas' telemetry (docs/OPERATOR.md). Needs the `operator` extra: pip install 'kvbuffer[operator]'."))
    add_settings_flags(operator, OperatorSettings, OPERATOR_ENV_PREFIX)
    return parser


def _serve(args: argparse.Namespace) -> int:
    """Serves until drained; then the process ends at once (it does not return)."""
    from kvbuffer.service import stacks
    from kvbuffer.service.server.app import StartupError, exit_now, serve

    settings = load_settings(settings_values(args, ServiceSettings), args.config)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stacks.install()  # `kill -USR1 PID`: every thread's stack to stderr, also while the server is stuck
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"kvbuffer serve: error: {exc}", file=sys.stderr)
        return 1
    exit_now(0)  # everything is stopped and flushed: nothing is left for the interpreter's teardown to do


async def _stream(settings: GenerateSettings, prompt: str) -> None:
    """Text to stdout as it arrives; the final response's usage and KVBuffer statistics to stderr."""
    final = pb.GenerateResponse()
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")  # model text on a terminal that cannot show every character
    async with settings.client() as client:
        async for response in client.generate(prompt, timeout=settings.timeout_s, **settings.sampling()):
            sys.stdout.write(response.text)
            sys.stdout.flush()
            final = response
    usage, stats = final.usage, final.stats
    print(f"\n[{final.request_id}] finish={pb.FinishReason.Name(final.finish_reason).removeprefix('FINISH_REASON_')} "
          f"prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
          f"stateless={stats.stateless_tokens} buffered={stats.buffered_tokens} recurrent={stats.recurrent_tokens} "
          f"flushes={stats.flushes} drafted={stats.drafted_tokens} accepted={stats.accepted_tokens}",
          file=sys.stderr)


def _generate(args: argparse.Namespace) -> int:
    try:
        settings = GenerateSettings(**settings_values(args, GenerateSettings))
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None
    try:
        asyncio.run(_stream(settings, args.prompt))
    except grpc.aio.AioRpcError as exc:
        print(f"\nkvbuffer generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def _operator(args: argparse.Namespace) -> int:
    try:
        options = OperatorSettings(**settings_values(args, OperatorSettings))
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None
    try:
        from kvbuffer.operator.main import main as run_operator
    except ImportError as exc:
        print(f"kvbuffer operator: error: {exc.name} is missing: pip install 'kvbuffer[operator]'", file=sys.stderr)
        return 1
    run_operator(options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"serve": _serve, "generate": _generate, "operator": _operator}[args.command](args)
    except SettingsError as exc:
        for line in str(exc).splitlines():
            print(f"kvbuffer {args.command}: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
