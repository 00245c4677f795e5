"""The kvbuffer.v1 API: committed stubs match kvbuffer.proto, and every element of the proto is documented."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto() -> None:
    assert _generator().stale_stubs() == [], "run `python proto/generate.py` and commit the stubs"


def _elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, source path) of every message, field, oneof, enum, enum value, service and method."""
    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...]) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield e.name, path
        for i, value in enumerate(e.value):
            yield f"{e.name}.{value.name}", (*path, 2, i)

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...]) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield m.name, path
        for i, field in enumerate(m.field):
            yield f"{m.name}.{field.name}", (*path, 2, i)
        for i, oneof in enumerate(m.oneof_decl):
            if not oneof.name.startswith("_"):  # proto3 `optional` makes a synthetic oneof
                yield f"{m.name}.{oneof.name}", (*path, 8, i)
        for i, nested in enumerate(m.nested_type):
            yield from message(nested, (*path, 3, i))
        for i, nested_enum in enumerate(m.enum_type):
            yield from enum(nested_enum, (*path, 4, i))

    for i, m in enumerate(file.message_type):
        yield from message(m, (4, i))
    for i, e in enumerate(file.enum_type):
        yield from enum(e, (5, i))
    for i, service in enumerate(file.service):
        yield service.name, (6, i)
        for j, method in enumerate(service.method):
            yield f"{service.name}.{method.name}", (6, i, 2, j)


def test_every_element_of_the_proto_is_documented(tmp_path: Path) -> None:
    from grpc_tools import protoc

    out = tmp_path / "kvbuffer.pb"
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", "--include_source_info", f"--descriptor_set_out={out}",
                        str(ROOT / "proto" / "kvbuffer" / "v1" / "kvbuffer.proto")]) == 0
    file = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    documented = {tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()}
    elements = list(_elements(file))
    assert len(elements) > 50
    assert [name for name, path in elements if path not in documented] == []
