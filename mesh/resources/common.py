"""Spec pieces shared by the Istio kinds: selectors, target references, durations, string matches, ports.

Field names and value forms follow Istio's protos and CRD schemas, so Istio YAML loads unchanged. Checks
that only need one value (a duration string, a port number) run as pydantic validators; checks that need
the resource around them (the namespace of a target reference, mutual exclusion of fields) are plain
functions returning ``FieldError`` lists, called from each kind's ``semantic_errors``.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from istiopy.mesh.errors import FieldError
from istiopy.mesh.meta import Model

__all__ = [
    "Delegate",
    "Duration",
    "Percent",
    "PolicyTargetReference",
    "PortSelector",
    "PositiveDuration",
    "StringMatch",
    "WorkloadSelector",
    "WorkloadSelectorLabels",
    "check_enum",
    "duration_seconds",
    "export_to_errors",
    "is_cidr",
    "is_dns1123_label",
    "is_fqdn",
    "is_ip",
    "is_ip_or_cidr",
    "label_errors",
    "parse_duration",
    "port_errors",
    "regex_errors",
    "selector_label_errors",
    "string_match_errors",
    "target_ref_errors",
    "target_selection_errors",
]

E = TypeVar("E", bound=enum.Enum)

# ---------------------------------------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------------------------------------

# Go's time.ParseDuration grammar, which Kubernetes' CEL ``duration()`` (and so Istio's CRDs) accept:
# a sequence of decimal numbers each followed by a unit, e.g. ``1m30s``, ``1.5h``, ``100ms``.
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_DURATION_EXAMPLES = "e.g. 5s, 1m30s, 100ms"


def parse_duration(value: str) -> float:
    """Seconds in a Go-style duration string; ValueError when malformed (``5x``, ``5``, ``''``)."""
    if not isinstance(value, str) or not value:
        raise ValueError("empty duration")
    text = value[1:] if value[0] in "+-" else value
    sign = -1.0 if value[0] == "-" else 1.0
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise ValueError(f"malformed duration {value!r}")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"malformed duration {value!r}")
    return sign * total


def duration_seconds(value: str | None, default: float = 0.0) -> float:
    """Seconds of an already-validated duration field, ``default`` when unset (for generators)."""
    return default if value is None else parse_duration(value)


def _check_duration(value: str) -> str:
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(f"must be a valid duration ({_DURATION_EXAMPLES}), got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"must be a valid duration that is not negative, got {value!r}")
    return value


def _check_positive_duration(value: str) -> str:
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = -1.0
    if seconds < 1e-3:
        raise ValueError(f"must be a valid duration greater than 1ms ({_DURATION_EXAMPLES}), got {value!r}")
    # Envoy takes these in whole milliseconds; istiod's webhook refuses finer values rather than round them.
    if abs(seconds * 1000 - round(seconds * 1000)) > 1e-6:
        raise ValueError(f"only durations to ms precision are supported, got {value!r}")
    return value


# Kept as the string the user wrote (so YAML round-trips byte for byte); use ``duration_seconds`` to read.
Duration = Annotated[str, AfterValidator(_check_duration)]
"""A non-negative duration such as ``5s``; ``0s`` allowed (Istio uses it to mean "disabled")."""

PositiveDuration = Annotated[str, AfterValidator(_check_positive_duration)]
"""A duration of at least 1ms in whole milliseconds: Istio's rule for timeouts, intervals, ejection times."""


# ---------------------------------------------------------------------------------------------------------
# Enums
# ---------------------------------------------------------------------------------------------------------


def check_enum(cls: type[E]) -> Callable[[Any], Any]:
    """A before-validator giving the apiserver's wording for a bad enum value: ``Unsupported value: "X"``."""
    names = [m.value for m in cls]

    def check(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str) or value not in names:
            supported = ", ".join(f'"{n}"' for n in names)
            shown = f'"{value}"' if isinstance(value, str) else repr(value)
            raise ValueError(f"Unsupported value: {shown}: supported values: {supported}")
        return value

    return check


# ---------------------------------------------------------------------------------------------------------
# Address and name forms
# ---------------------------------------------------------------------------------------------------------

# Istio's label form (``pkg/config/labels``) accepts upper case, unlike Kubernetes object names.
_DNS1123_LABEL = re.compile(r"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
_FQDN_LABEL = _DNS1123_LABEL
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def is_dns1123_label(value: str) -> bool:
    """A DNS label as Istio checks subset, port and namespace names: alphanumerics and ``-``, <= 63."""
    return len(value) <= 63 and bool(_DNS1123_LABEL.match(value))


def label_errors(path: str, labels: Mapping[str, str]) -> list[FieldError]:
    """Kubernetes label syntax for label maps Istio validates (subset, endpoint, sourceLabels)."""
    errors: list[FieldError] = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if not name or len(name) > 63 or not _LABEL_NAME.match(name) or (prefix and not is_fqdn(prefix)):
            errors.append(FieldError(f"{path}[{key}]", f"invalid label key {key!r}"))
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(FieldError(f"{path}[{key}]", f"invalid label value {value!r}"))
    return errors


def is_fqdn(value: str, allow_wildcard: bool = False) -> bool:
    """A DNS name (``reviews``, ``svc.ns.svc.cluster.local``). With ``allow_wildcard``, the first label
    may be ``*`` or start with ``*`` (``*.example.com``, ``*x``), as Istio's wildcard-domain check allows."""
    if not value or len(value) > 255:
        return False
    labels = value.removesuffix(".").split(".")
    if allow_wildcard and labels[0].startswith("*"):
        rest = labels[0][1:]
        if rest and not _FQDN_LABEL.match(rest):
            return False
        labels = labels[1:]
        if not labels:
            return True
    return all(len(label) <= 63 and _FQDN_LABEL.match(label) for label in labels)


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def is_cidr(value: str) -> bool:
    """``10.0.0.0/8`` or ``2001:db8::/32`` (host bits may be set, as Envoy and Istio allow)."""
    if "/" not in value:
        return False
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def is_ip_or_cidr(value: str) -> bool:
    return is_ip(value) or is_cidr(value)


def port_errors(path: str, port: int, what: str = "port") -> list[FieldError]:
    """Ports are uint32 in the protos; the webhook narrows them to the TCP range."""
    if not 1 <= port <= 65535:
        return [FieldError(path, f"{what} must be between 1-65535, got {port}")]
    return []


# ---------------------------------------------------------------------------------------------------------
# Shared messages
# ---------------------------------------------------------------------------------------------------------


class WorkloadSelector(Model):
    """``istio.type.v1beta1.WorkloadSelector``: the pods/VMs a policy applies to, by labels."""

    match_labels: dict[str, str] = Field(default_factory=dict)


class WorkloadSelectorLabels(Model):
    """``networking.v1alpha3.WorkloadSelector`` (ServiceEntry, Sidecar): ``labels``, not matchLabels."""

    labels: dict[str, str] = Field(default_factory=dict)


def selector_label_errors(path: str, labels: Mapping[str, str]) -> list[FieldError]:
    """Selector keys must be non-empty and neither keys nor values may hold wildcards (Istio's rules)."""
    errors: list[FieldError] = []
    for key, value in labels.items():
        if not key:
            errors.append(FieldError(f"{path}[]", f"empty key is not supported in selector (={value})"))
        if "*" in key or "*" in value:
            errors.append(
                FieldError(f"{path}[{key}]", f"wildcard is not supported in selector ({key}={value})")
            )
        elif len(value) > 63:
            errors.append(FieldError(f"{path}[{key}]", "selector value may not be longer than 63 characters"))
    return errors


_GROUP_RE = re.compile(r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_KIND_RE = re.compile(r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")


class PolicyTargetReference(Model):
    """``istio.type.v1beta1.PolicyTargetReference``: a Service, ServiceEntry, Gateway... a policy binds to.

    ``group`` and ``kind`` default to empty so that schema errors name the missing field rather than
    failing on construction; ``target_ref_errors`` enforces the CRD's required/pattern rules.
    """

    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""

    @property
    def group_kind(self) -> tuple[str, str]:
        """(group, kind) with the core group spelled ``""`` whether the user wrote ``""`` or ``core``."""
        return ("" if self.group == "core" else self.group, self.kind)


def target_ref_errors(
    path: str, ref: PolicyTargetReference, allowed: Iterable[tuple[str, str]] | None = None
) -> list[FieldError]:
    """The CRD rules for one target reference; ``allowed`` lists the (group, kind) pairs a kind supports."""
    errors: list[FieldError] = []
    if not ref.kind:
        errors.append(FieldError(f"{path}.kind", "Required value"))
    elif not _KIND_RE.match(ref.kind) or len(ref.kind) > 63:
        errors.append(FieldError(f"{path}.kind", f"{path}.kind in body should match {_KIND_RE.pattern}"))
    if not _GROUP_RE.match(ref.group) or len(ref.group) > 253:
        errors.append(FieldError(f"{path}.group", f"{path}.group in body should match {_GROUP_RE.pattern}"))
    if not ref.name:
        errors.append(FieldError(f"{path}.name", "Required value"))
    elif len(ref.name) > 253:
        errors.append(FieldError(f"{path}.name", "must be at most 253 characters"))
    if ref.namespace:
        errors.append(
            FieldError(f"{path}.namespace", "cross namespace referencing is not currently supported")
        )
    if allowed is not None and not errors and ref.kind:
        allowed = list(allowed)
        if ref.group_kind not in allowed:
            names = ", ".join(f"{g or 'core'}/{k}" for g, k in allowed)
            errors.append(FieldError(path, f"Support kinds are {names}"))
    return errors


def target_selection_errors(
    selector: WorkloadSelector | None,
    target_ref: PolicyTargetReference | None,
    target_refs: list[PolicyTargetReference],
    allowed: Iterable[tuple[str, str]] | None = None,
) -> list[FieldError]:
    """``selector``, ``targetRef`` and ``targetRefs`` are mutually exclusive; each must be well formed."""
    errors: list[FieldError] = []
    present = [n for n, v in (("selector", selector), ("targetRef", target_ref)) if v is not None]
    if target_refs:
        present.append("targetRefs")
    if len(present) > 1:
        errors.append(
            FieldError(
                f"spec.{present[1]}",
                f"only one of targetRefs or selector can be set (found {' and '.join(present)})",
            )
        )
    if selector is not None:
        errors.extend(selector_label_errors("spec.selector.matchLabels", selector.match_labels))
    allowed_list = list(allowed) if allowed is not None else None
    if target_ref is not None:
        errors.extend(target_ref_errors("spec.targetRef", target_ref, allowed_list))
    for i, ref in enumerate(target_refs):
        errors.extend(target_ref_errors(f"spec.targetRefs[{i}]", ref, allowed_list))
    return errors


class PortSelector(Model):
    """``networking.v1alpha3.PortSelector``: a port by number."""

    number: int = 0


class Percent(Model):
    """``networking.v1alpha3.Percent``: a percentage in [0, 100]; ``0.1`` is one in a thousand."""

    value: float = 0.0

    @model_validator(mode="after")
    def _range(self) -> Percent:
        if not 0.0 <= self.value <= 100.0:
            raise ValueError(f"percentage must be in range 0..100, got {self.value}")
        return self


class StringMatch(Model):
    """``networking.v1alpha3.StringMatch``: at most one of exact, prefix or regex (RE2 syntax)."""

    # ``{}`` is allowed (for header matches it means "present"). Regex syntax is checked where the match
    # is used (``string_match_errors``), because ``withoutHeaders`` gives ``regex: "*"`` its own meaning.
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StringMatch:
        set_ = [n for n in ("exact", "prefix", "regex") if getattr(self, n) is not None]
        if len(set_) > 1:
            raise ValueError(f"only one of exact, prefix or regex may be set (found {', '.join(set_)})")
        return self

    @property
    def is_empty(self) -> bool:
        return self.exact is None and self.prefix is None and self.regex is None


# RE2 (Envoy's regex engine) has no look-around or back-references; Python's ``re`` lacks \p classes.
_RE2_UNSUPPORTED = re.compile(r"\(\?<?[=!]|\\[1-9]|\(\?P=")
_RE2_ONLY = re.compile(r"\\[pPCz]|\[\[:")


def regex_errors(path: str, pattern: str) -> list[FieldError]:
    """RE2 regex checks as istiod makes them: non-empty, at most 1024 characters, compilable."""
    if not pattern:
        return [FieldError(path, "regex string match should not be empty")]
    if len(pattern) > 1024:
        return [FieldError(path, "regex is too large, max length allowed is 1024")]
    if _RE2_UNSUPPORTED.search(pattern):
        return [FieldError(path, f"invalid regex {pattern!r}: look-around and back-references are not RE2")]
    try:
        re.compile(pattern)
    except re.error as err:
        if not _RE2_ONLY.search(pattern):
            return [FieldError(path, f"invalid regex {pattern!r}: {err}; Istio uses RE2 syntax")]
    return []


def string_match_errors(
    path: str, m: StringMatch | None, allow_empty_prefix: bool = False
) -> list[FieldError]:
    """A used StringMatch: prefixes non-empty (except for URIs, where Envoy allows ``""``), regexes valid."""
    if m is None:
        return []
    if m.prefix == "" and not allow_empty_prefix:
        return [FieldError(f"{path}.prefix", "prefix string match should not be empty")]
    if m.regex is not None:
        return regex_errors(f"{path}.regex", m.regex)
    return []


class Delegate(Model):
    """``networking.v1alpha3.Delegate``: the VirtualService an HTTP route hands its traffic to."""

    name: str = ""
    namespace: str = ""


def export_to_errors(path: str, export_to: list[str], namespace: str) -> list[FieldError]:
    """``exportTo``: ``.`` (own namespace), ``*`` (all), ``~`` (none) or namespace names. No duplicates
    (``.`` and the own namespace's name count as the same), and ``*`` or ``~`` must stand alone."""
    errors: list[FieldError] = []
    seen: set[str] = set()
    for i, value in enumerate(export_to):
        key = namespace if value == "." and namespace else value
        if key in seen:
            errors.append(FieldError(f"{path}[{i}]", f'Duplicate value: "{value}"'))
        seen.add(key)
        if value not in (".", "*", "~") and not is_dns1123_label(value):
            errors.append(
                FieldError(f"{path}[{i}]", f"invalid namespace {value!r} (expected ., *, ~ or a name)")
            )
    if len(export_to) > 1 and "*" in export_to:
        errors.append(FieldError(path, "cannot have both public (*) and non-public exportTo values"))
    if len(export_to) > 1 and "~" in export_to:
        errors.append(FieldError(path, "cannot export to no one (~) and someone"))
    return errors


def _nonempty(value: str) -> str:
    if not value:
        raise ValueError("should be at least 1 chars long")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_nonempty)]
"""A string with the CRD's ``minLength: 1``."""


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("must be of type object, got null")
    return value


NotNull = BeforeValidator(_not_null)


def _yaml_flow_ipv6(value: Any) -> Any:
    """Undo a PyYAML quirk: in a flow list ``[1.2.3.4, 2001:db8::]`` it reads ``2001:db8::`` as the mapping
    ``{"2001:db8:": None}`` (a trailing ``:`` taken as a key indicator). Go's YAML (and so kubectl and
    istiod) reads the string; the original text is the key plus the eaten colon."""
    if isinstance(value, dict) and len(value) == 1:
        key, val = next(iter(value.items()))
        if val is None and isinstance(key, str) and ":" in key:
            return f"{key}:"
    return value


AddressStr = Annotated[str, BeforeValidator(_yaml_flow_ipv6)]
"""An IP/CIDR string, tolerant of how PyYAML reads IPv6 addresses ending in ``::`` inside flow lists."""
"""Gives list entries that are YAML ``null`` the apiserver's wording instead of pydantic's."""
