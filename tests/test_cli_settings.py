"""`kvbuffer serve` settings: generated flags, precedence (environment < file < flags), one-line errors."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kvbuffer.operator.settings import OperatorSettings
from kvbuffer.service.cli import build_parser, main, settings_values
from kvbuffer.service.engine.config import EngineConfig
from kvbuffer.service.server.client import GenerateSettings
from kvbuffer.service.server.settings import ServiceSettings, SettingsError, load_settings
from pydantic.fields import FieldInfo


def _leaf_settings(model: type, prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        nested = isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")
        names += _leaf_settings(field.annotation, f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return names


def _leaf_field(model: type, name: str) -> FieldInfo:
    *groups, leaf = name.split(".")
    for group in groups:
        model = model.model_fields[group].annotation
    return model.model_fields[leaf]


@pytest.mark.parametrize(("command", "model", "env_prefix"), [("serve", ServiceSettings, "KVBUFFER_"),
                                                              ("generate", GenerateSettings, "KVBUFFER_CLIENT_"),
                                                              ("operator", OperatorSettings, "KVBUFFER_OPERATOR_")])
def test_help_documents_every_setting(command: str, model: type, env_prefix: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in _leaf_settings(model):
        assert "--" + name.replace(".", "-").replace("_", "-") in help_text
        env_var = env_prefix + name.upper().replace(".", "__")
        assert env_var in help_text
        assert model.model_fields[name.split(".")[0]].description is not None
        # The setting's bracket of facts ends with its variable; the default it shows is the one the setting takes.
        facts = re.search(r"\[([^\[\]]*)env " + re.escape(env_var) + r"\]", help_text)
        assert facts, name
        shown = re.search(r"(?:^|; )default ([^;]*); ", facts.group(1))
        field = _leaf_field(model, name)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        assert (shown.group(1) if shown else None) == (None if default in (None, [], {}) else str(default)), name


def test_engine_settings_are_the_engine_config_vocabulary() -> None:
    for field in dataclasses.fields(EngineConfig):
        assert ServiceSettings.model_fields[field.name].default == field.default
    assert load_settings().engine_config() == EngineConfig()


def test_precedence_environment_then_file_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVBUFFER_BUFFER_SIZE", "48")
    monkeypatch.setenv("KVBUFFER_CHUNK_SIZE", "16")
    monkeypatch.setenv("KVBUFFER_PORT", "1001")
    monkeypatch.setenv("KVBUFFER_AUTH__TOKEN", "from-env")
    config = tmp_path / "kvbuffer.yaml"
    config.write_text("buffer_size: 40\nport: 1002\nauth:\n  token: from-file\n")
    args = build_parser().parse_args(["serve", "--config", str(config), "--port", "1003"])
    settings = load_settings(settings_values(args, ServiceSettings), args.config)
    assert (settings.buffer_size, settings.chunk_size, settings.port) == (40, 16, 1003)
    assert settings.auth.token is not None and settings.auth.token.get_secret_value() == "from-file"


def test_toml_file_with_nested_group(tmp_path: Path) -> None:
    config = tmp_path / "kvbuffer.toml"
    config.write_text('decode_mode = "recurrent"\n[auth]\ntoken = "t0ken"\n')
    settings = load_settings(config_file=config)
    assert settings.decode_mode == "recurrent"
    assert settings.auth.token is not None and settings.auth.token.get_secret_value() == "t0ken"


BAD_SETTINGS = [
    (["--buffer-size", "0"], {}, "buffer_size: Input should be greater than or equal to 1"),
    (["--port", "70000"], {}, "port: Input should be less than or equal to 65535"),
    (["--decode-mode", "fast"], {}, "decode_mode: Input should be 'kvbuffer' or 'recurrent'"),
    (["--chunk-size", "100"], {}, "chunk_size + speculative_num_draft_tokens (100 + 0) must be <= buffer_size (64)"),
    (["--speculative-algorithm", "ngram", "--speculative-num-draft-tokens", "40"], {},
     "speculative_num_draft_tokens: Input should be less than or equal to 16"),
    (["--speculative-algorithm", "ngram", "--decode-mode", "recurrent"], {},
     "speculative_algorithm: speculative decoding needs decode_mode=kvbuffer"),
    ([], {"KVBUFFER_MAX_RUNNING_REQUESTS": "0"}, "max_running_requests: Input should be greater than or equal to 1"),
    (["--cuda-graph-max-batch", "-1"], {}, "cuda_graph_max_batch: Input should be greater than or equal to 0"),
    (["--shutdown-grace-period-s", "-1"], {}, "shutdown_grace_period_s: Input should be greater than 0"),
    (["--tls-cert-file", "/nonexistent.pem"], {}, "tls.cert_file: Path does not point to a file"),
]


@pytest.mark.parametrize(("flags", "env", "message"), BAD_SETTINGS)
def test_bad_setting_is_one_line_naming_it(flags: list[str], env: dict[str, str], message: str,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvbuffer serve: error: {message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(("content", "suffix", "message"), [
    ("bufer_size: 64\n", ".yaml", "bufer_size: unknown setting"),
    ("buffer_size: [\n", ".yaml", "config file"),
    ("buffer_size = 64\n", ".ini", "unknown format (allowed: .yaml, .yml, .toml)"),
])
def test_bad_config_file(content: str, suffix: str, message: str, tmp_path: Path) -> None:
    config = tmp_path / f"kvbuffer{suffix}"
    config.write_text(content)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(config_file=config)


def test_entry_point_exits_2_without_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "kvbuffer.service.cli", "serve", "--max-context-length", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == ("kvbuffer serve: error: max_context_length: Input should be greater than or equal "
                             "to 1 (got '0')\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_is_one_line_naming_device() -> None:
    result = subprocess.run([sys.executable, "-m", "kvbuffer.service.cli", "serve", "--device", "cuda", "--port", "0",
                             "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode in (1, 2)
    assert result.stderr.startswith("kvbuffer serve: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "device: cuda requested but no CUDA device is available" in result.stderr
    assert "Traceback" not in result.stderr


def test_importing_the_cli_does_not_import_torch() -> None:
    """`kvbuffer --help` and `kvbuffer generate` need no torch (it takes seconds to import)."""
    result = subprocess.run([sys.executable, "-c", "import sys, kvbuffer.service.cli; print('torch' in sys.modules)"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
