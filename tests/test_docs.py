"""The user docs (README.md, docs/OPERATOR.md, METRICS.md, AUTOSCALING.md, the chart's README) show only what
exists: every `kvbuffer` command line in their code blocks parses and passes its settings check, every
KVBufferService and chart `services` entry they show passes the operator's check, and those on engine sglang pass
SGLang's real ServerArgs and the KVBuffer plugin's start-up checks (sglang 0.5.17 on the CPU, skipped where it is
not importable); the KVBUFFER_* variables and `sglang.*` settings they name exist; the operator's metrics are
those docs/METRICS.md lists."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvbuffer.operator import metrics
from kvbuffer.operator.settings import ENV_PREFIX as OPERATOR_ENV_PREFIX
from kvbuffer.operator.settings import OperatorSettings
from kvbuffer.operator.spec import parse_spec
from kvbuffer.service.cli import build_parser, settings_values
from kvbuffer.service.model import tiny
from kvbuffer.service.server.client import GenerateSettings
from kvbuffer.service.server.settings import ENV_PREFIX, ServiceSettings, SGLangSettings, load_settings
from kvbuffer.service.sglang.plugin.checks import server_args_problem
from kvbuffer.service.sglang.plugin.settings import PluginSettings
from kvbuffer.service.sglang.settings import PLUGIN_ENV_PREFIX, build_server_args, plugin_environment
from operator_emulator import free_port
from pydantic import BaseModel
from sglang_cpu import gpu_free_server_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *(ROOT / "docs" / name for name in ("OPERATOR.md", "METRICS.md", "AUTOSCALING.md")),
        ROOT / "deploy" / "helm" / "kvbuffer" / "README.md"]
SETTINGS = {"serve": ServiceSettings, "generate": GenerateSettings, "operator": OperatorSettings}
CLIENT_ENV_PREFIX = "KVBUFFER_CLIENT_"


def _code_blocks(language: str) -> Iterator[tuple[str, str]]:
    """(doc, block text) of every fenced block in that language."""
    for doc in DOCS:
        for block in re.findall(rf"^```{language}\n(.*?)^```", doc.read_text(), flags=re.MULTILINE | re.DOTALL):
            yield _name(doc), block


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def _commands() -> Iterator[tuple[str, list[str]]]:
    """(doc, words) of every shell command in the docs' bash and console blocks: continuations and quoted text
    over several lines joined, prompts and comments dropped, `a && b` split."""
    for language in ("bash", "console"):
        for doc, block in _code_blocks(language):
            pending = ""
            for line in block.replace("\\\n", " ").splitlines():
                pending += line.removeprefix("$ ") + "\n"
                try:
                    words = shlex.split(pending, comments=True)
                except ValueError:  # a quotation runs on to the next line
                    continue
                pending = ""
                while words:
                    command, words = (words[:words.index("&&")], words[words.index("&&") + 1:]) if "&&" in words \
                        else (words, [])
                    yield doc, command


def _kvbuffer_commands() -> list[tuple[str, dict[str, str], list[str]]]:
    """(doc name, environment assignments, arguments) of every `[VAR=value ...] kvbuffer ...` command."""
    found = []
    for doc, words in _commands():
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        if words and words[0] == "kvbuffer":
            found.append((doc, env, words[1:]))
    return found


def _settings(command: str, args: Any) -> BaseModel:
    values = settings_values(args, SETTINGS[command])
    return load_settings(values, args.config) if command == "serve" else SETTINGS[command](**values)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No KVBUFFER_* variable of this process leaks into the settings a documented command line makes."""
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_the_docs_show_kvbuffer_commands() -> None:
    commands = {(doc, " ".join(args[:1])) for doc, _env, args in _kvbuffer_commands()}
    assert {("README.md", "serve"), ("README.md", "generate"), ("docs/OPERATOR.md", "operator")} <= commands


@pytest.mark.parametrize(("doc", "env", "args"), [
    pytest.param(*command, id=f"{command[0]}: kvbuffer {shlex.join(command[2])}") for command in _kvbuffer_commands()])
def test_every_kvbuffer_command_line_passes_its_settings_check(doc: str, env: dict[str, str], args: list[str],
                                                               clean_environment: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        clean_environment.setenv(name, value)
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exit_info:  # --version, --help
        assert exit_info.code == 0, f"{doc}: kvbuffer {shlex.join(args)}"
        return
    _settings(parsed.command, parsed)


def _documented_services() -> Iterator[tuple[str, dict[str, Any]]]:
    """(doc name, KVBufferService spec) of every KVBufferService, chart `services` entry (values files and
    `--set-json services=...`) the docs show."""
    for doc, block in _code_blocks("yaml"):
        document = yaml.safe_load(block)
        if document.get("kind") == "KVBufferService":
            yield doc, document["spec"]
        for service in document.get("services", []):
            yield doc, {key: value for key, value in service.items() if key != "name"}
    for doc, words in _commands():
        for option, argument in itertools.pairwise(words):
            if option == "--set-json" and argument.startswith("services="):
                for service in json.loads(argument.removeprefix("services=")):
                    yield doc, {key: value for key, value in service.items() if key != "name"}


def _sglang_settings() -> list[tuple[str, dict[str, Any]]]:
    """(where, settings as `kvbuffer serve` reads them) of every documented configuration on engine sglang."""
    found = []
    for doc, spec in _documented_services():
        settings = parse_spec(spec).server_settings()  # what the operator writes into the pods' config file
        if settings["engine"] == "sglang":
            found.append((f"{doc}: {spec['model']}", settings))
    for doc, env, args in _kvbuffer_commands():
        if args[:1] == ["serve"]:
            parsed = build_parser().parse_args(args)
            flags = settings_values(parsed, ServiceSettings)
            from_env = {name.removeprefix(ENV_PREFIX).lower(): value for name, value in env.items()}
            if "sglang" in (flags.get("engine"), from_env.get("engine")):
                found.append((f"{doc}: kvbuffer {shlex.join(args)}", {"env": env, "flags": flags}))
    return found


def test_every_documented_kvbuffer_service_passes_the_operators_check() -> None:
    services = list(_documented_services())
    assert {doc for doc, _spec in services} >= {"README.md", "docs/OPERATOR.md", "deploy/helm/kvbuffer/README.md"}
    for _doc, spec in services:
        parse_spec(spec)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3-Next model directory's config.json, what SGLang's ServerArgs reads of a model."""
    path = tmp_path_factory.mktemp("qwen3-next")
    (path / "config.json").write_text(json.dumps({**tiny.CONFIG, "full_attention_interval": 4,
                                                  "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}))
    return path


@pytest.mark.parametrize(("where", "source"), [pytest.param(*found, id=found[0]) for found in _sglang_settings()])
def test_every_documented_sglang_configuration_passes_sglang_and_the_plugin(
        where: str, source: dict[str, Any], model_dir: Path, tmp_path: Path,
        clean_environment: pytest.MonkeyPatch) -> None:
    with gpu_free_server_args():
        for name, value in source.get("env", {}).items():
            clean_environment.setenv(name, value)
        values = source.get("flags", source)
        settings = load_settings({**values, "model": str(model_dir)})  # the model as a directory SGLang can read
        server_args = build_server_args(settings)
        plugin = PluginSettings.from_env(plugin_environment(settings, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}))
        assert server_args_problem(server_args, plugin) is None, where


def _inline_code() -> Iterator[tuple[str, str]]:
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", doc.read_text(),
                                                         flags=re.MULTILINE | re.DOTALL)):
            yield _name(doc), span


def _environment_variables() -> set[str]:
    """Every variable the code reads: the settings models' (as their flags' help names them) and the plugin's."""
    names = {f"{ENV_PREFIX}CONFIG", *(PLUGIN_ENV_PREFIX + name.upper() for name in
                                      ("decode_mode", "buffer_size", "chunk_size", "speculative_num_draft_tokens"))}
    for prefix, model in ((ENV_PREFIX, ServiceSettings), (CLIENT_ENV_PREFIX, GenerateSettings),
                          (OPERATOR_ENV_PREFIX, OperatorSettings)):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            names |= ({f"{prefix}{name.upper()}__{leaf.upper()}" for leaf in annotation.model_fields} if nested
                      else {prefix + name.upper()})
    return names


def test_the_variables_and_settings_the_docs_name_exist() -> None:
    variables = _environment_variables()
    for doc in DOCS:
        for name in re.findall(r"\bKVBUFFER_[A-Z0-9_]*[A-Z0-9]\b", doc.read_text()):
            assert name in variables, f"{_name(doc)} names {name}, which nothing reads"
    for doc, span in _inline_code():
        group = re.fullmatch(r"sglang\.([a-z_]+)", span)
        if group:
            assert group.group(1) in SGLangSettings.model_fields, f"{doc} names the setting {span}"


def _documented_operator_metrics() -> dict[str, set[str]]:
    """docs/METRICS.md's operator metrics: Prometheus name -> label names."""
    rows = re.findall(r"^\| `(kvbuffer_operator_[a-z_]+)` \| [a-z]+ \| ((?:[^|\\]|\\\|)*) \|",
                      (ROOT / "docs" / "METRICS.md").read_text(), flags=re.MULTILINE)
    return {name: {re.findall(r"`([a-z_]+)`", label)[0] for label in labels.split(",")} for name, labels in rows}


def test_the_operators_metrics_are_those_documented() -> None:
    """Scraped from the operator's own endpoint, with one series of each recorded for a service of this test's."""
    namespace, name = "docs-test", f"svc-{free_port()}"
    metrics.desired_replicas.labels(namespace, name).set(2)
    metrics.ready_replicas.labels(namespace, name).set(1)
    metrics.scaling_events.labels(namespace, name, "up").inc()
    server = metrics.serve(free_port())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=10) as response:
            exposition = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        metrics.forget(namespace, name)
    families = set(re.findall(r"^# TYPE (\S+) ", exposition, flags=re.MULTILINE))
    exported = {}
    for sample, labels in re.findall(r"^(kvbuffer_operator_[a-z_]+)\{([^}]*)\} ", exposition, flags=re.MULTILINE):
        # prometheus_client's _created series are the counters' creation times, not metrics of the operator's
        if sample in families and not sample.endswith("_created") and f'kvbufferservice="{name}"' in labels:
            exported[sample] = set(re.findall(r"([a-z_]+)=", labels))
    assert exported == _documented_operator_metrics()
