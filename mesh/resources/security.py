"""``security.istio.io``: AuthorizationPolicy, PeerAuthentication and RequestAuthentication.

Field names, defaults and enum values follow Istio's protos (``security/v1beta1/*.proto``); v1 and v1beta1
share one schema upstream, so one class serves both versions. ``semantic_errors`` mirrors the rules of
Istio's validating webhook and CRD CEL expressions, each error naming its field path, so a policy we
accept is one istiod accepts and vice versa.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Annotated, ClassVar
from urllib.parse import urlparse

from pydantic import BeforeValidator, Field

from istiopy.mesh.errors import FieldError
from istiopy.mesh.kinds import register
from istiopy.mesh.meta import Model, Resource
from istiopy.mesh.resources.common import (
    AddressStr,
    NonEmptyStr,
    NotNull,
    PolicyTargetReference,
    PositiveDuration,
    WorkloadSelector,
    check_enum,
    is_ip_or_cidr,
    selector_label_errors,
    target_selection_errors,
)

__all__ = [
    "Action",
    "AuthorizationPolicy",
    "AuthorizationPolicySpec",
    "ClaimToHeader",
    "Condition",
    "ExtensionProvider",
    "JWTHeader",
    "JWTRule",
    "MtlsMode",
    "MutualTLS",
    "Operation",
    "PeerAuthentication",
    "PeerAuthenticationSpec",
    "RequestAuthentication",
    "RequestAuthenticationSpec",
    "Rule",
    "RuleFrom",
    "RuleTo",
    "Source",
    "is_valid_condition_key",
]

_SECURITY = "security.istio.io"
_VERSIONS = ("v1", "v1beta1")

# Kinds a policy's targetRef(s) may name (istiod's webhook list), as (group, kind); core group is "".
POLICY_TARGET_KINDS: tuple[tuple[str, str], ...] = (
    ("", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
)


# ---------------------------------------------------------------------------------------------------------
# AuthorizationPolicy
# ---------------------------------------------------------------------------------------------------------


class Action(enum.StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


class Source(Model):
    """Who sends the request. Every list is OR-ed; fields are AND-ed; ``not*`` lists are exclusions."""

    principals: list[str] = Field(default_factory=list)
    not_principals: list[str] = Field(default_factory=list)
    request_principals: list[str] = Field(default_factory=list)
    not_request_principals: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    not_namespaces: list[str] = Field(default_factory=list)
    service_accounts: list[str] = Field(default_factory=list)
    not_service_accounts: list[str] = Field(default_factory=list)
    ip_blocks: list[AddressStr] = Field(default_factory=list)
    not_ip_blocks: list[AddressStr] = Field(default_factory=list)
    remote_ip_blocks: list[AddressStr] = Field(default_factory=list)
    not_remote_ip_blocks: list[AddressStr] = Field(default_factory=list)
    trust_domains: list[str] = Field(default_factory=list)
    not_trust_domains: list[str] = Field(default_factory=list)


class Operation(Model):
    """What the request does: hosts, ports, methods, paths (HTTP fields need a waypoint in ambient)."""

    hosts: list[str] = Field(default_factory=list)
    not_hosts: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    not_ports: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    not_methods: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    not_paths: list[str] = Field(default_factory=list)


class RuleFrom(Model):
    source: Source | None = None


class RuleTo(Model):
    operation: Operation | None = None


class Condition(Model):
    """An extra attribute test: ``key`` (see ``is_valid_condition_key``) against values / notValues."""

    key: str = ""
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)


class Rule(Model):
    """Matches when every present part matches; an empty rule ``{}`` matches every request."""

    # An empty ``from``/``to``/``when`` list means the same as an absent one ("any"): istiod reads JSON
    # ``[]`` into a nil repeated field, so its "must not be empty" checks never fire for YAML input.

    from_: list[Annotated[RuleFrom, NotNull]] = Field(default_factory=list, alias="from")
    to: list[Annotated[RuleTo, NotNull]] = Field(default_factory=list)
    when: list[Annotated[Condition, NotNull]] = Field(default_factory=list)


class ExtensionProvider(Model):
    """The ext-authz provider of a CUSTOM policy, by its name in MeshConfig ``extensionProviders``."""

    name: str = ""


class AuthorizationPolicySpec(Model):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    rules: list[Annotated[Rule, NotNull]] = Field(default_factory=list)
    action: Annotated[Action, BeforeValidator(check_enum(Action))] = Action.ALLOW
    provider: ExtensionProvider | None = None


_EXACT_KEYS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "source.trustDomain",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)
_HEADER_KEY = re.compile(r"^request\.headers\[[^\[\]]+\]$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims(\[[^\[\]]+\])+$")
# Envoy dynamic-metadata attributes: ``experimental.envoy.filters.<filter>[<path>]`` - the bracketed path is
# required and not empty (upstream refuses anything else as "should have format a[b]").
_ENVOY_FILTER_KEY = re.compile(r"^experimental\.envoy\.filters\.[^\[]*\[.+\]$")
_IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})


def is_valid_condition_key(key: str) -> bool:
    """The attribute keys Istio's authz model understands (``pilot/pkg/security/authz/model``)."""
    return (
        key in _EXACT_KEYS
        or bool(_HEADER_KEY.match(key))
        or bool(_CLAIM_KEY.match(key))
        or bool(_ENVOY_FILTER_KEY.match(key))
    )


def _string_list_errors(path: str, values: list[str]) -> list[FieldError]:
    """Match strings must be non-empty (``*`` alone means "any value present")."""
    errors: list[FieldError] = []
    for i, v in enumerate(values):
        if not v:
            errors.append(FieldError(f"{path}[{i}]", "empty value is not allowed"))
    return errors


def _ip_list_errors(path: str, values: list[str]) -> list[FieldError]:
    return [
        FieldError(f"{path}[{i}]", f"invalid IP address or CIDR block: {v!r}")
        for i, v in enumerate(values)
        if not is_ip_or_cidr(v)
    ]


def _port_list_errors(path: str, values: list[str]) -> list[FieldError]:
    errors: list[FieldError] = []
    for i, v in enumerate(values):
        if not v.isdigit() or not 0 <= int(v) <= 65535:
            errors.append(FieldError(f"{path}[{i}]", f"invalid port {v!r}: must be a number in 0-65535"))
    return errors


_SOURCE_STRING_FIELDS = (
    "principals",
    "not_principals",
    "request_principals",
    "not_request_principals",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "trust_domains",
    "not_trust_domains",
)
_SOURCE_IP_FIELDS = ("ip_blocks", "not_ip_blocks", "remote_ip_blocks", "not_remote_ip_blocks")


def _alias(model: type[Model], attr: str) -> str:
    alias = model.model_fields[attr].alias
    return alias or attr


def _source_errors(path: str, src: Source) -> list[FieldError]:
    errors: list[FieldError] = []
    if not any(getattr(src, f) for f in (*_SOURCE_STRING_FIELDS, *_SOURCE_IP_FIELDS)):
        errors.append(FieldError(path, "`from.source` must not be empty (set at least one field)"))
    for f in _SOURCE_STRING_FIELDS:
        errors.extend(_string_list_errors(f"{path}.{_alias(Source, f)}", getattr(src, f)))
    for f in _SOURCE_IP_FIELDS:
        errors.extend(_ip_list_errors(f"{path}.{_alias(Source, f)}", getattr(src, f)))
    for f in ("service_accounts", "not_service_accounts"):
        for i, sa in enumerate(getattr(src, f)):
            if sa.count("/") > 1:
                errors.append(
                    FieldError(
                        f"{path}.{_alias(Source, f)}[{i}]", f"must be <namespace>/<name> or <name>: {sa!r}"
                    )
                )
    if (src.service_accounts or src.not_service_accounts) and (
        src.namespaces or src.not_namespaces or src.principals or src.not_principals
    ):
        errors.append(
            FieldError(f"{path}.serviceAccounts", "Cannot set serviceAccounts with namespaces or principals")
        )
    return errors


def _operation_errors(path: str, op: Operation) -> list[FieldError]:
    errors: list[FieldError] = []
    fields = ("hosts", "not_hosts", "ports", "not_ports", "methods", "not_methods", "paths", "not_paths")
    if not any(getattr(op, f) for f in fields):
        errors.append(FieldError(path, "`to.operation` must not be empty (set at least one field)"))
    for f in ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths"):
        errors.extend(_string_list_errors(f"{path}.{_alias(Operation, f)}", getattr(op, f)))
    errors.extend(_port_list_errors(f"{path}.ports", op.ports))
    errors.extend(_port_list_errors(f"{path}.notPorts", op.not_ports))
    errors.extend(_path_template_errors(f"{path}.paths", op.paths))
    errors.extend(_path_template_errors(f"{path}.notPaths", op.not_paths))
    return errors


def _condition_errors(path: str, cond: Condition) -> list[FieldError]:
    errors: list[FieldError] = []
    if not cond.key:
        return [FieldError(f"{path}.key", "Required value")]
    if not is_valid_condition_key(cond.key):
        errors.append(FieldError(f"{path}.key", f"unknown attribute {cond.key!r}"))
    if not cond.values and not cond.not_values:
        errors.append(
            FieldError(path, f"at least one of values or notValues must be set for key {cond.key!r}")
        )
    for name, values in (("values", cond.values), ("notValues", cond.not_values)):
        if cond.key in _IP_KEYS:
            errors.extend(_ip_list_errors(f"{path}.{name}", values))
        elif cond.key == "destination.port":
            errors.extend(_port_list_errors(f"{path}.{name}", values))
        else:
            errors.extend(_string_list_errors(f"{path}.{name}", values))
    return errors


# Source fields and condition keys an ext-authz (CUSTOM) policy cannot use: identity is not known
# to the external authorizer's filter position (upstream: "not supported with CUSTOM action").
_CUSTOM_UNSUPPORTED_SOURCE = (
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "principals",
    "not_principals",
    "request_principals",
    "not_request_principals",
)
_CUSTOM_UNSUPPORTED_KEYS = ("source.namespace", "source.serviceAccount", "source.principal")


def _custom_rule_errors(path: str, rule: Rule) -> list[FieldError]:
    errors: list[FieldError] = []
    for i, f in enumerate(rule.from_):
        for attr in _CUSTOM_UNSUPPORTED_SOURCE:
            if f.source is not None and getattr(f.source, attr):
                name = _alias(Source, attr)
                errors.append(
                    FieldError(
                        f"{path}.from[{i}].source.{name}", f"{name} is not supported with CUSTOM action"
                    )
                )
    for i, c in enumerate(rule.when):
        if c.key in _CUSTOM_UNSUPPORTED_KEYS or c.key.startswith("request.auth."):
            errors.append(FieldError(f"{path}.when[{i}].key", f"{c.key} is not supported with CUSTOM action"))
    return errors


def _path_template_errors(path: str, values: list[str]) -> list[FieldError]:
    """Path templates: whole segments ``{*}`` (one segment) and ``{**}`` (any number), ``{**}`` being the
    last operator; no other braces, and no glob ``*`` in a path that uses templates."""
    errors: list[FieldError] = []
    for i, value in enumerate(values):
        templated = "{*}" in value or "{**}" in value
        seen_any = False
        for seg in value.strip("/").split("/"):
            if seg in ("{*}", "{**}"):
                if seen_any:
                    errors.append(FieldError(f"{path}[{i}]", f"{{**}} is not the last operator in {value!r}"))
                    break
                seen_any = seg == "{**}"
                continue
            if "{" in seg or "}" in seg:
                errors.append(FieldError(f"{path}[{i}]", f"invalid or unsupported path template {value!r}"))
                break
            if "*" in seg and templated:
                errors.append(FieldError(f"{path}[{i}]", f"path template cannot contain wildcard: {value!r}"))
                break
    return errors


def _rule_errors(path: str, rule: Rule) -> list[FieldError]:
    errors: list[FieldError] = []
    for i, f in enumerate(rule.from_):
        if f.source is None:
            errors.append(FieldError(f"{path}.from[{i}].source", "`from.source` must not be nil"))
        else:
            errors.extend(_source_errors(f"{path}.from[{i}].source", f.source))
    for i, t in enumerate(rule.to):
        if t.operation is None:
            errors.append(FieldError(f"{path}.to[{i}].operation", "`to.operation` must not be nil"))
        else:
            errors.extend(_operation_errors(f"{path}.to[{i}].operation", t.operation))
    for i, c in enumerate(rule.when):
        errors.extend(_condition_errors(f"{path}.when[{i}]", c))
    return errors


def _target_ref_list(
    target_ref: PolicyTargetReference | None, target_refs: list[PolicyTargetReference]
) -> list[PolicyTargetReference]:
    """``targetRef`` first, then ``targetRefs``: upstream reads the singular as a one-item list."""
    return ([target_ref] if target_ref is not None else []) + list(target_refs)


@register
class AuthorizationPolicy(Resource):
    """Access control for workloads (``selector``), or for Services/Gateways at waypoints (``targetRefs``)."""

    KIND: ClassVar[str] = "AuthorizationPolicy"
    GROUP: ClassVar[str] = _SECURITY
    VERSIONS: ClassVar[tuple[str, ...]] = _VERSIONS
    PLURAL: ClassVar[str] = "authorizationpolicies"

    spec: AuthorizationPolicySpec = Field(default_factory=AuthorizationPolicySpec)

    def semantic_errors(self) -> list[FieldError]:
        s = self.spec
        errors = target_selection_errors(s.selector, s.target_ref, s.target_refs, POLICY_TARGET_KINDS)
        if s.action is Action.CUSTOM:
            if not s.rules:  # an empty list reads as nil upstream too
                errors.append(
                    FieldError(
                        "spec.rules",
                        "CUSTOM action without `rules` is meaningless as it will never be triggered, "
                        "add an empty rule `{}` if you want it be triggered for every request",
                    )
                )
            elif s.provider is None or not s.provider.name:
                errors.append(
                    FieldError("spec.provider.name", "a provider must be specified for action CUSTOM")
                )
            for i, rule in enumerate(s.rules):
                errors.extend(_custom_rule_errors(f"spec.rules[{i}]", rule))
        elif s.action is Action.DENY and not s.rules:
            errors.append(
                FieldError(
                    "spec.rules",
                    "DENY action without `rules` is meaningless as it will never be triggered, "
                    "add an empty rule `{}` if you want it be triggered for every request",
                )
            )
        if s.provider is not None and s.action is not Action.CUSTOM:
            errors.append(
                FieldError("spec.provider", f"provider is only allowed with action CUSTOM, not {s.action}")
            )
        for i, rule in enumerate(s.rules):
            errors.extend(_rule_errors(f"spec.rules[{i}]", rule))
        return errors

    @property
    def uses_target_refs(self) -> bool:
        """True for waypoint-bound policies (never sent to ztunnel)."""
        return self.spec.target_ref is not None or bool(self.spec.target_refs)

    @property
    def target_refs(self) -> list[PolicyTargetReference]:
        """``targetRef`` and ``targetRefs`` as one list (upstream treats the singular as a one-item list)."""
        return _target_ref_list(self.spec.target_ref, self.spec.target_refs)


# ---------------------------------------------------------------------------------------------------------
# PeerAuthentication
# ---------------------------------------------------------------------------------------------------------


class MtlsMode(enum.StrEnum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


class MutualTLS(Model):
    mode: Annotated[MtlsMode, BeforeValidator(check_enum(MtlsMode))] = MtlsMode.UNSET


def _port_keys_as_strings(value: object) -> object:
    """YAML reads ``8080:`` as an int key and ``"8080":`` as a string; JSON (and so the apiserver) only
    has strings. Keep the JSON form so both spellings load and the map round-trips."""
    if isinstance(value, dict):
        return {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in value.items()}
    return value


class PeerAuthenticationSpec(Model):
    selector: WorkloadSelector | None = None
    mtls: MutualTLS | None = None
    # Keys are port numbers as strings: the JSON form of the proto's map<uint32, MutualTLS>. None (not
    # ``{}``) when unset, because the CRD refuses an empty map and ``to_dict`` must re-parse.
    port_level_mtls: Annotated[dict[str, MutualTLS] | None, BeforeValidator(_port_keys_as_strings)] = None


@register
class PeerAuthentication(Resource):
    """Mutual-TLS mode for the mesh (root namespace), a namespace, or selected workloads and ports."""

    KIND: ClassVar[str] = "PeerAuthentication"
    GROUP: ClassVar[str] = _SECURITY
    VERSIONS: ClassVar[tuple[str, ...]] = _VERSIONS
    PLURAL: ClassVar[str] = "peerauthentications"

    spec: PeerAuthenticationSpec = Field(default_factory=PeerAuthenticationSpec)

    def semantic_errors(self) -> list[FieldError]:
        s = self.spec
        errors: list[FieldError] = []
        if s.selector is not None:
            errors.extend(selector_label_errors("spec.selector.matchLabels", s.selector.match_labels))
        ports = s.port_level_mtls or {}
        if s.port_level_mtls is not None and not s.port_level_mtls:
            errors.append(
                FieldError(
                    "spec.portLevelMtls", "spec.portLevelMtls in body should have at least 1 properties"
                )
            )
        if ports and (s.selector is None or not s.selector.match_labels):
            errors.append(FieldError("spec.portLevelMtls", "portLevelMtls requires selector"))
        for key in ports:
            if not key.isdigit():
                errors.append(
                    FieldError(
                        f"spec.portLevelMtls[{key}]", f"type conversion error from {key!r} to port number"
                    )
                )
            elif not 1 <= int(key) <= 65535:
                errors.append(
                    FieldError(f"spec.portLevelMtls[{key}]", f"port must be between 1-65535, got {key}")
                )
        return errors

    def port_modes(self) -> dict[int, MtlsMode]:
        """``portLevelMtls`` with integer keys (validation guarantees they parse)."""
        return {int(k): v.mode for k, v in (self.spec.port_level_mtls or {}).items()}


# ---------------------------------------------------------------------------------------------------------
# RequestAuthentication
# ---------------------------------------------------------------------------------------------------------


class JWTHeader(Model):
    """A header carrying the token, with an optional value prefix (e.g. ``Bearer ``)."""

    name: str | None = None
    prefix: str = ""


class ClaimToHeader(Model):
    header: str | None = None
    claim: str | None = None


class JWTPresence(enum.StrEnum):
    PRESENCE_UNSPECIFIED = "PRESENCE_UNSPECIFIED"
    REQUIRED = "REQUIRED"
    OPTIONAL = "OPTIONAL"


class JWTRule(Model):
    """How to find and verify one issuer's tokens."""

    issuer: str = ""
    audiences: list[NonEmptyStr] = Field(default_factory=list)
    jwks_uri: str = ""
    jwks: str = ""
    from_headers: list[Annotated[JWTHeader, NotNull]] = Field(default_factory=list)
    from_params: list[NonEmptyStr] = Field(default_factory=list)
    from_cookies: list[NonEmptyStr] = Field(default_factory=list)
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: list[Annotated[ClaimToHeader, NotNull]] = Field(default_factory=list)
    timeout: PositiveDuration | None = None
    space_delimited_claims: list[NonEmptyStr] = Field(default_factory=list)
    presence: Annotated[JWTPresence, BeforeValidator(check_enum(JWTPresence))] | None = None


class RequestAuthenticationSpec(Model):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    jwt_rules: list[Annotated[JWTRule, NotNull]] = Field(default_factory=list)


_HEADER_NAME = re.compile(r"^[-_A-Za-z0-9]+$")


def _jwt_rule_errors(path: str, rule: JWTRule) -> list[FieldError]:
    errors: list[FieldError] = []
    if not rule.issuer and not rule.jwks_uri:
        errors.append(
            FieldError(f"{path}.issuer", "issuer must be set (or jwksUri when the issuer is not known)")
        )
    if rule.jwks and rule.jwks_uri:
        errors.append(FieldError(f"{path}.jwks", "only one of jwks or jwksUri can be set"))
    if rule.jwks_uri:
        url = urlparse(rule.jwks_uri)
        if not url.scheme:
            errors.append(
                FieldError(f"{path}.jwksUri", f"url must have scheme http:// or https://: {rule.jwks_uri!r}")
            )
        elif url.scheme not in ("http", "https"):
            errors.append(
                FieldError(f"{path}.jwksUri", f"url scheme must be http or https: {rule.jwks_uri!r}")
            )
        elif not url.hostname:
            errors.append(FieldError(f"{path}.jwksUri", f"url must have a host: {rule.jwks_uri!r}"))
    for i, h in enumerate(rule.from_headers):
        if h.name is None:
            errors.append(FieldError(f"{path}.fromHeaders[{i}].name", "Required value"))
        elif not h.name:
            errors.append(
                FieldError(f"{path}.fromHeaders[{i}].name", "name in body should be at least 1 chars long")
            )
    for i, c in enumerate(rule.output_claim_to_headers):
        p = f"{path}.outputClaimToHeaders[{i}]"
        if c.claim is None:
            errors.append(FieldError(f"{p}.claim", "Required value"))
        elif not c.claim:
            errors.append(FieldError(f"{p}.claim", "claim in body should be at least 1 chars long"))
        if c.header is None:
            errors.append(FieldError(f"{p}.header", "Required value"))
        elif not c.header:
            errors.append(FieldError(f"{p}.header", "header in body should be at least 1 chars long"))
        elif not _HEADER_NAME.match(c.header):
            errors.append(FieldError(f"{p}.header", f"header in body should match {_HEADER_NAME.pattern}"))
    return errors


def _jwks_uri_errors(path: str, uri: str) -> list[FieldError]:
    """istiod fetches keys from here: an http(s) URL with a host and, if given, a numeric port."""
    try:
        url = urlparse(uri)
        port = url.port
    except ValueError:
        return [FieldError(path, f"url must have scheme http:// or https:// and a valid host/port: {uri!r}")]
    if url.scheme not in ("http", "https"):
        return [FieldError(path, f"url must have scheme http:// or https://: {uri!r}")]
    if not url.hostname:
        return [FieldError(path, f"url must have a host: {uri!r}")]
    if port is not None and not 1 <= port <= 65535:
        return [FieldError(path, f"port must be between 1-65535: {uri!r}")]
    return []


def _jwks_error(text: str) -> str:
    """Why an inline JWKS is not a JSON Web Key or key set ("" when it is)."""
    try:
        doc = json.loads(text)
    except ValueError as err:
        return f"not JSON: {err}"
    if not isinstance(doc, dict):
        return "must be a JSON object"
    keys = doc.get("keys", [doc])
    if not isinstance(keys, list):
        return "`keys` must be a list"
    for i, key in enumerate(keys):
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
            return f"key {i} has no `kty`"
    return ""


@register
class RequestAuthentication(Resource):
    """JWT validation for selected workloads or (in ambient) Services/Gateways at waypoints."""

    KIND: ClassVar[str] = "RequestAuthentication"
    GROUP: ClassVar[str] = _SECURITY
    VERSIONS: ClassVar[tuple[str, ...]] = _VERSIONS
    PLURAL: ClassVar[str] = "requestauthentications"

    spec: RequestAuthenticationSpec = Field(default_factory=RequestAuthenticationSpec)

    def semantic_errors(self) -> list[FieldError]:
        s = self.spec
        errors = target_selection_errors(s.selector, s.target_ref, s.target_refs, POLICY_TARGET_KINDS)
        for i, rule in enumerate(s.jwt_rules):
            errors.extend(_jwt_rule_errors(f"spec.jwtRules[{i}]", rule))
        return errors

    @property
    def target_refs(self) -> list[PolicyTargetReference]:
        """``targetRef`` and ``targetRefs`` as one list."""
        return _target_ref_list(self.spec.target_ref, self.spec.target_refs)
