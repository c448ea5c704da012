"""Our protos against upstream Istio's generated Go types, field by field.

istiopy's ``.proto`` files are written from the published field numbers, not copied. This fills every field
of every message we send or receive (WDS ``Address``, WADS ``Authorization``, ZDS, the CA request and
response) with a distinct value, serializes it with our generated code and has ``tools/wirecheck`` (a small
Go program importing upstream's ``workloadapi``, ``workloadapi/security``, ``zdsapi`` and the CA API from the
Go module proxy) decode it: it must know every field, and its protojson rendering must equal ours. A wrong
number, type, enum value or name cannot pass. Each member of a oneof gets a sample of its own.

The other way round, the tool fills every field of upstream's types; our code must parse them with no
unknown field (nothing upstream sends is lost on us) and the same values.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from istiopy.api.gen import authorization_pb2, ca_pb2, workload_pb2, zds_pb2
from istiopy.testing.tools import built_tool

ROOT = Path(__file__).resolve().parents[2]

MESSAGES: list[type[Message]] = [
    workload_pb2.Address,
    authorization_pb2.Authorization,
    zds_pb2.WorkloadRequest,
    zds_pb2.WorkloadResponse,
    zds_pb2.ZdsHello,
    ca_pb2.IstioCertificateRequest,
    ca_pb2.IstioCertificateResponse,
]


def wirecheck() -> Path:
    return built_tool(ROOT / "tools" / "wirecheck" / "build.sh")


class _Filler:
    """Distinct, valid values for every field; ``choice`` picks which member of each oneof is set."""

    def __init__(self, choice: dict[str, str]) -> None:
        self.choice = choice
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n

    def scalar(self, fd: FieldDescriptor) -> object:
        n = self.next()
        t = fd.type
        if t == FieldDescriptor.TYPE_STRING:
            return f"{fd.name}-{n}"
        if t == FieldDescriptor.TYPE_BYTES:
            return bytes([n % 256, 1, 2])
        if t == FieldDescriptor.TYPE_BOOL:
            return True
        if t == FieldDescriptor.TYPE_ENUM:
            values = fd.enum_type.values
            return values[-1].number if len(values) > 1 else values[0].number
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return n + 0.5
        return n  # every integer type; small and positive fits them all

    def fill(self, msg: Message, depth: int = 0) -> None:
        desc: Descriptor = msg.DESCRIPTOR
        if desc.full_name == "google.protobuf.Any" or depth > 6:
            return
        if desc.full_name == "google.protobuf.Struct":
            msg.update({"k": "v"})  # type: ignore[attr-defined]
            return
        for fd in desc.fields:
            oneof = fd.containing_oneof
            if oneof is not None and self.choice.get(oneof.full_name, oneof.fields[0].name) != fd.name:
                continue
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                key_fd, val_fd = (
                    fd.message_type.fields_by_name["key"],
                    fd.message_type.fields_by_name["value"],
                )
                key = self.scalar(key_fd)
                target = getattr(msg, fd.name)
                if val_fd.message_type is not None:
                    self.fill(target[key], depth + 1)
                else:
                    target[key] = self.scalar(val_fd)
            elif fd.is_repeated:
                field = getattr(msg, fd.name)
                for _ in range(2):
                    if fd.message_type is not None:
                        self.fill(field.add(), depth + 1)
                    else:
                        field.append(self.scalar(fd))
            elif fd.message_type is not None:
                sub = getattr(msg, fd.name)
                sub.SetInParent()
                self.fill(sub, depth + 1)
            else:
                setattr(msg, fd.name, self.scalar(fd))


def _oneofs(desc: Descriptor, seen: set[str] | None = None) -> Iterator[tuple[str, str]]:
    """(oneof full name, member name) for every oneof reachable from ``desc``."""
    seen = seen if seen is not None else set()
    if desc.full_name in seen:
        return
    seen.add(desc.full_name)
    for oneof in desc.oneofs:
        for fd in oneof.fields:
            yield oneof.full_name, fd.name
    for fd in desc.fields:
        if fd.message_type is not None and not fd.message_type.full_name.startswith("google.protobuf"):
            yield from _oneofs(fd.message_type, seen)


def samples(cls: type[Message]) -> Iterator[tuple[str, Message]]:
    """One sample with the first member of every oneof, then one per other member."""
    variants: list[dict[str, str]] = [{}]
    variants += [{oneof: member} for oneof, member in _oneofs(cls.DESCRIPTOR)]
    for choice in variants:
        msg = cls()
        _Filler(choice).fill(msg)
        yield ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in choice.items()) or "first", msg


def _as_istio_names(full_name: str, ours: dict[str, Any]) -> dict[str, Any]:
    """Our Authorization uses upstream ztunnel's field names (``rules``/``clauses``); istio's Go copy calls
    the same fields 1 and 5 ``groups``/``rules`` (shared/reference/ambient.md 1.3). Same wire, other JSON."""
    if full_name != "istio.security.Authorization" or "rules" not in ours:
        return ours
    out = {k: v for k, v in ours.items() if k != "rules"}
    out["groups"] = [{"rules": rule["clauses"]} if "clauses" in rule else {} for rule in ours["rules"]]
    return out


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.DESCRIPTOR.full_name)
def test_upstream_go_types_decode_every_field_we_encode_alike(cls: type[Message]) -> None:
    tool = wirecheck()
    checked = 0
    for label, msg in samples(cls):
        res = subprocess.run(
            [str(tool), cls.DESCRIPTOR.full_name],
            input=msg.SerializeToString(),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert res.returncode == 0, f"{label}: {res.stderr.decode()}"
        upstream = json.loads(res.stdout)
        ours = _as_istio_names(cls.DESCRIPTOR.full_name, json_format.MessageToDict(msg))
        assert upstream == ours, f"{cls.DESCRIPTOR.full_name} ({label}) decodes differently upstream"
        checked += 1
    assert checked >= 1


def _unknown(msg: Message, path: str) -> list[str]:
    """Paths of fields our types did not know, recursively."""
    out = [f"{path}#{f.field_number}" for f in unknown_fields.UnknownFieldSet(msg)]
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            has_messages = fd.message_type.fields_by_name["value"].message_type is not None
            subs = list(value.values()) if has_messages else []
        else:
            subs = list(value) if fd.is_repeated else [value]
        for sub in subs:
            out += _unknown(sub, f"{path}.{fd.name}")
    return out


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.DESCRIPTOR.full_name)
def test_every_field_upstream_fills_is_known_to_us_with_the_same_value(cls: type[Message]) -> None:
    tool = wirecheck()
    name = cls.DESCRIPTOR.full_name
    for variant in range(4):  # every member of oneofs of up to four members
        data = subprocess.run(
            [str(tool), "--fill", name, str(variant)], capture_output=True, timeout=30, check=True
        ).stdout
        msg = cls()
        msg.ParseFromString(data)
        assert _unknown(msg, name) == [], f"variant {variant}: upstream fields we do not know"
        upstream = json.loads(
            subprocess.run([str(tool), name], input=data, capture_output=True, timeout=30, check=True).stdout
        )
        assert _as_istio_names(name, json_format.MessageToDict(msg)) == upstream, f"variant {variant}"
