"""Corral's envd .proto files (written from the research notes) against the messages inside the real ``e2b`` SDK:
every message, field (number, type, label, oneof, optional) and RPC the SDK knows must be ours too, the same,
so both codecs (binary and JSON) agree byte for byte. And a message made by one side decodes on the other."""

from __future__ import annotations

import pytest
from e2b.envd.filesystem import filesystem_pb as sdk_fs
from e2b.envd.process import process_pb as sdk_proc
from google.protobuf import descriptor_pb2, json_format
from protobuf import Oneof

from corral.server.e2b.envd._pb import filesystem_pb2, process_pb2


def _shape(file: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(prefix: str, messages: object) -> None:
        for m in messages:  # type: ignore[attr-defined]
            name = f"{prefix}.{m.name}"
            oneofs = [o.name for o in m.oneof_decl]
            out[name] = sorted(
                (
                    f.name,
                    f.number,
                    f.type,
                    f.label,
                    f.type_name,
                    oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
                    f.proto3_optional,
                )
                for f in m.field
            )
            walk(name, m.nested_type)

    walk(file.package, file.message_type)
    for enum in file.enum_type:
        out[f"{file.package}.{enum.name}"] = sorted((v.name, v.number) for v in enum.value)
    for service in file.service:
        for method in service.method:
            out[f"{file.package}.{service.name}/{method.name}"] = (
                method.input_type,
                method.output_type,
                method.client_streaming,
                method.server_streaming,
            )
    return out


def _ours(module: object) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
    return proto


def _sdks(module: object) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(module.desc().proto.to_binary())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("ours", "sdk"), [(process_pb2, sdk_proc), (filesystem_pb2, sdk_fs)], ids=["process", "filesystem"]
)
def test_our_messages_are_the_sdks(ours: object, sdk: object) -> None:
    mine, theirs = _shape(_ours(ours)), _shape(_sdks(sdk))
    missing = {k: v for k, v in theirs.items() if k not in mine}
    assert not missing, f"in the SDK but not in our .proto: {missing}"
    different = {k: (mine[k], v) for k, v in theirs.items() if mine[k] != v}
    assert not different, different


def test_a_message_crosses_both_codecs() -> None:
    ours = process_pb2.StartResponse(
        event=process_pb2.ProcessEvent(
            end=process_pb2.ProcessEvent.EndEvent(
                exit_code=-1, exited=False, status="signal: killed", error="x"
            )
        )
    )
    theirs = sdk_proc.StartResponse.from_binary(ours.SerializeToString())
    assert theirs.event.event == Oneof("end", theirs.event.event.value)
    end = theirs.event.event.value
    assert (end.exit_code, end.exited, end.status, end.error) == (-1, False, "signal: killed", "x")
    again = sdk_proc.StartResponse.from_json(json_format.MessageToJson(ours, indent=None))
    assert again == theirs
    data = sdk_proc.ProcessEvent(
        event=Oneof("data", sdk_proc.ProcessEvent.DataEvent(output=Oneof("stdout", b"\x00\xff")))
    )
    parsed = process_pb2.ProcessEvent()
    json_format.Parse(data.to_json(), parsed)
    assert parsed.data.stdout == b"\x00\xff"
    entry = filesystem_pb2.EntryInfo(name="a", type=filesystem_pb2.FILE_TYPE_DIRECTORY, size=2**40)
    entry.modified_time.FromSeconds(1_800_000_000)
    back = sdk_fs.EntryInfo.from_json(json_format.MessageToJson(entry))
    assert back.size == 2**40 and back.type == sdk_fs.FileType.DIRECTORY and back.name == "a"
