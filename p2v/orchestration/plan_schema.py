"""The recovery-plan file: YAML (``version: 1``) -> pydantic models, with errors that name the
file, the YAML path (``machines.web.checks[1].tcp.port``) and what is wrong.

The models are the stored form too: :meth:`RecoveryPlan.to_dict` is canonical JSON that
``RecoveryPlan.model_validate`` reads back unchanged (the run journal keeps it). Sizes are
stored in bytes and durations in seconds; a check is stored with its ``kind`` key.
See docs/recovery-plans.md for the file format.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import shlex
from collections.abc import Hashable, Sequence
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from p2v.errors import InvalidInput, UnsafeInput, UsageError
from p2v.orchestration.checks_model import CHECK_KINDS, CheckSpec
from p2v.site.model import NAME_RE
from p2v.site.units import format_size, parse_duration, parse_size

PLAN_VERSION = 1
MAX_PLAN_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MIN_MEMORY = 32 << 20
DEFAULT_SEGMENT = "plan"
ON_FAILURE = ("abort", "continue", "approval")

OnFailure = Literal["abort", "continue", "approval"]


# -- field types ---------------------------------------------------------------------------------


def _name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid name: use 1-63 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")  # fmt: skip
    return value


def _seconds(value: object) -> object:
    """``10m`` / ``90s`` / ``1h30m`` or a number of seconds -> whole seconds (rounded up)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (write 90s, 10m, 1h)")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{value!r} is not a duration longer than zero")
        return math.ceil(value)
    if isinstance(value, str):
        try:
            return parse_duration(value, what="duration")
        except UsageError as exc:
            raise ValueError(f"{exc.message.removeprefix('duration ')} (write 90s, 10m, 1h)") from None
    return value


def _check_seconds(value: object) -> object:
    """A check's ``timeout``/``interval`` in seconds; a duration text (``2m``) is accepted too."""
    return _seconds(value) if isinstance(value, str) else value


def _bytes(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (write 512M, 2G)")
    if isinstance(value, str):
        try:
            value = parse_size(value, what="size")
        except UsageError as exc:
            raise ValueError(f"{exc.message.removeprefix('size ')} (write 512M, 2G)") from None
    if isinstance(value, int) and value < MIN_MEMORY:
        raise ValueError(f"{value} bytes is below the {format_size(MIN_MEMORY)} minimum; a bare number is bytes: "
                         f"add a unit (2048M, 2G)")  # fmt: skip
    return value


def _check_item(value: object) -> object:
    """``{tcp: {port: 22}}`` (the file's form) -> ``{kind: tcp, port: 22}`` (the model's form)."""
    if isinstance(value, str) and value in CHECK_KINDS:
        return {"kind": value}  # "- agent" needs no parameters
    if not isinstance(value, dict):
        raise ValueError(f"a check is a one-key mapping such as `tcp: {{port: 22}}`, not {value!r}")
    if "kind" in value:
        return value  # the stored (JSON) form
    if len(value) != 1:
        raise ValueError(f"a check has exactly one key (its kind), found {len(value)}: "
                         f"{', '.join(map(str, value))}; write one list item per check")  # fmt: skip
    ((kind, body),) = value.items()
    if kind not in CHECK_KINDS:
        raise ValueError(f"unknown check kind {kind!r}; known kinds: {', '.join(CHECK_KINDS)}")
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ValueError(f"the {kind} check's settings must be a mapping such as `{kind}: {{timeout: 60}}`, "
                         f"not {body!r}")  # fmt: skip
    if "kind" in body:
        raise ValueError(f"the {kind} check must not set `kind` again")
    out = {"kind": kind, **body}
    for key in ("timeout", "interval"):
        if key in out:
            out[key] = _check_seconds(out[key])
    return out


def _group_machine(value: object) -> object:
    return {"name": value} if isinstance(value, str) else value


def _str_list(value: object) -> object:
    return [value] if isinstance(value, str) else value  # `after: db` reads as `after: [db]`


Name = Annotated[str, AfterValidator(_name)]
Seconds = Annotated[int, BeforeValidator(_seconds)]
Bytes = Annotated[int, BeforeValidator(_bytes)]
Refs = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_str_list)]
Check = Annotated[CheckSpec, BeforeValidator(_check_item)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- the plan ------------------------------------------------------------------------------------


class MachineNetwork(_Model):
    """Where the recovered VM is plugged in at DR, and its optional static address (re-IP)."""

    segment: Name = Field(default=DEFAULT_SEGMENT, description="plan-private L2 segment shared by the plan's VMs")
    address: str | None = Field(default=None, description="static address with prefix length (re-IP)")
    gateway: str | None = Field(default=None, description="default gateway; inside the address's network")

    @model_validator(mode="after")
    def _addresses(self) -> MachineNetwork:
        iface = None
        if self.address is not None:
            if "/" not in self.address:
                raise ValueError(f"address {self.address!r} needs a prefix length, e.g. {self.address}/24")
            try:
                iface = ipaddress.ip_interface(self.address)
            except ValueError:
                raise ValueError(f"address {self.address!r} is not an IP address with a prefix length "
                                 f"(192.168.50.10/24)") from None  # fmt: skip
            if iface.ip in (iface.network.network_address, iface.network.broadcast_address) and \
                    iface.network.num_addresses > 2:  # fmt: skip
                raise ValueError(f"address {self.address} is the network or broadcast address of {iface.network}")
        if self.gateway is not None:
            if iface is None:
                raise ValueError("gateway is set without an address: give the static address too")
            try:
                gw = ipaddress.ip_address(self.gateway)
            except ValueError:
                raise ValueError(f"gateway {self.gateway!r} is not an IP address") from None
            if gw not in iface.network:
                raise ValueError(f"gateway {self.gateway} is outside {iface.network} (the network of address "
                                 f"{self.address})")  # fmt: skip
            if gw == iface.ip:
                raise ValueError(f"gateway {self.gateway} is the machine's own address")
        return self

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
        return None if self.address is None else ipaddress.ip_interface(self.address)


class PlanMachine(_Model):
    """One machine of the plan: which protected machine it recovers and how it runs at DR."""

    protected: Name = Field(description="protected machine at the site (default: the plan-local name)")
    cpus: int | None = Field(default=None, ge=1, le=1024)
    memory: Bytes | None = Field(default=None, description="bytes")
    network: MachineNetwork = Field(default_factory=MachineNetwork)
    boot_timeout: Seconds | None = Field(default=None, description="seconds")
    on_failure: OnFailure = "abort"
    checks: list[Check] = Field(default_factory=list)


class GroupMachine(_Model):
    """A machine listed in a group; ``after`` adds machine-level dependencies."""

    name: Name
    after: Refs = Field(default_factory=list)


class PlanGroup(_Model):
    """A step of the plan: exactly one of ``machines``, ``approval`` (a manual gate) or ``shell``
    (a hook run on the DR host)."""

    name: Name
    after: Refs | None = Field(default=None, description="None: after the previous group")
    machines: list[Annotated[GroupMachine, BeforeValidator(_group_machine)]] | None = Field(default=None, min_length=1)
    approval: str | None = Field(default=None, min_length=1, description="the question shown at the gate")
    shell: str | None = Field(default=None, min_length=1, description="command line (shlex-split, no shell)")
    timeout: Seconds | None = Field(default=None, description="seconds (shell and approval steps)")
    on_failure: OnFailure | None = Field(default=None, description="shell and approval steps (default abort)")

    @model_validator(mode="after")
    def _one_kind(self) -> PlanGroup:
        given = [k for k in ("machines", "approval", "shell") if getattr(self, k) is not None]
        if len(given) != 1:
            found = f"it has {' and '.join(given)}" if given else "it has none"
            raise ValueError(f"group {self.name}: give exactly one of machines, approval or shell ({found})")
        if self.machines is not None:
            extra = [k for k in ("timeout", "on_failure") if getattr(self, k) is not None]
            if extra:
                verb = "apply" if len(extra) > 1 else "applies"
                raise ValueError(f"group {self.name}: {' and '.join(extra)} {verb} to shell and approval steps; "
                                 f"set boot_timeout/on_failure per machine under machines:")  # fmt: skip
        if self.shell is not None:
            try:
                argv = shlex.split(self.shell)
            except ValueError as exc:
                raise ValueError(f"group {self.name}: shell {self.shell!r} cannot be split: {exc}") from None
            if not argv:
                raise ValueError(f"group {self.name}: shell is empty")
        return self

    @property
    def kind(self) -> Literal["machines", "approval", "shell"]:
        return "machines" if self.machines is not None else "approval" if self.approval is not None else "shell"

    @property
    def argv(self) -> list[str]:
        """The shell hook's argument list (empty for other groups)."""
        return shlex.split(self.shell) if self.shell is not None else []


class RecoveryPlan(_Model):
    """A recovery plan (file format version 1)."""

    version: Literal[1]
    name: Name
    description: str | None = None
    rto_target: Seconds | None = Field(default=None, description="seconds")
    machines: dict[Name, PlanMachine] = Field(min_length=1)
    groups: list[PlanGroup] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _default_protected(cls, data: Any) -> Any:
        """A machine recovers the protected machine of the same name unless ``protected`` says."""
        if isinstance(data, dict) and isinstance(data.get("machines"), dict):
            machines = {}
            for key, body in data["machines"].items():
                if body is None:
                    body = {}
                if isinstance(body, dict) and "protected" not in body:
                    body = {"protected": key, **body}
                machines[key] = body
            data = {**data, "machines": machines}
        return data

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form (bytes, seconds, checks with ``kind``); ``model_validate`` reads it back."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def group(self, name: str) -> PlanGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


# -- reading YAML --------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping (YAML would keep only the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {line}); each key may appear once", key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _count_nodes(value: object, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _count_nodes(k, budget)
            _count_nodes(v, budget)
    elif isinstance(value, list):
        for v in value:
            _count_nodes(v, budget)


def read_yaml(text: str, source: str, *, what: str) -> object:
    """Parse one YAML document; InvalidInput with ``source:LINE:COLUMN`` on a syntax error,
    UnsafeInput for an oversized file or an alias bomb."""
    if len(text.encode(errors="replace")) > MAX_PLAN_BYTES:
        raise UnsafeInput(f"{source}: the {what} is larger than {format_size(MAX_PLAN_BYTES)}; refusing to read it")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        label = "" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error: "
        raise InvalidInput(f"{where}: {label}{exc.problem or exc.context}{context}",
                           hint=f"fix the {what} at that line and column") from exc  # fmt: skip
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{source}: not valid YAML: {exc}") from exc
    budget = [MAX_YAML_NODES]
    _count_nodes(data, budget)
    if budget[0] < 0:
        raise UnsafeInput(f"{source}: the {what} expands to more than {MAX_YAML_NODES} values "
                          f"(YAML aliases?); refusing it")  # fmt: skip
    return data


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def yaml_path(loc: Sequence[int | str]) -> str:
    """``('machines', 'web', 'checks', 1, 'tcp', 'port')`` -> ``machines.web.checks[1].tcp.port``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (the key)"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(top level)"


def _error_text(err: Any) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "value_error":
        return str(err["ctx"]["error"])
    if kind == "extra_forbidden":
        return "unknown key (check its spelling and indentation; see docs/recovery-plans.md)"
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping (key: value), got {value!r}"
    if kind == "list_type":
        return f"expected a list, got {value!r}"
    if kind == "literal_error" and "expected" in err.get("ctx", {}):
        return f"{value!r} is not allowed here; expected {err['ctx']['expected']}"
    if isinstance(value, str | int | float | bool) or value is None:
        return f"{msg[:1].lower()}{msg[1:]}, got {value!r}"
    return f"{msg[:1].lower()}{msg[1:]}"


def validation_message(source: str, exc: ValidationError, *, limit: int = 12) -> str:
    """Every problem pydantic found, on one line: ``FILE: PATH: what; PATH: what``."""
    errors = exc.errors()
    bad_keys = {tuple(e["loc"][:-1]) for e in errors if e["loc"] and e["loc"][-1] == "[key]"}
    # a machine key that is not a valid name is also the default of its `protected`: say it once
    errors = [e for e in errors if not (len(e["loc"]) == 3 and e["loc"][2] == "protected"
                                        and tuple(e["loc"][:2]) in bad_keys and e.get("input") == e["loc"][1])]
    parts = [f"{yaml_path(e['loc'])}: {_error_text(e)}" for e in errors]
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return f"{source}: " + "; ".join(parts[:limit]) + more


def parse_plan(text: str, source: str) -> RecoveryPlan:
    """Parse a plan file's text; ``source`` names it in errors. Raises InvalidInput (UnsafeInput
    for oversized or alias-bomb files) naming the YAML path and what is wrong."""
    data = read_yaml(text, source, what="plan")
    if data is None:
        raise InvalidInput(f"{source}: the plan is empty", hint="start with `version: 1`, `name:`, `machines:`, "
                           "`groups:` (see docs/recovery-plans.md)")  # fmt: skip
    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: a plan is a YAML mapping (version, name, machines, groups), "
                           f"not a {type(data).__name__}")  # fmt: skip
    if "version" not in data:
        raise InvalidInput(f"{source}: version: required key is missing", hint=f"add `version: {PLAN_VERSION}` "
                           "at the top of the plan")  # fmt: skip
    version = data["version"]
    if isinstance(version, bool) or version != PLAN_VERSION or not isinstance(version, int):
        raise InvalidInput(f"{source}: version: {version!r} is not supported; this p2v reads plan version "
                           f"{PLAN_VERSION}", hint="a newer p2v may read it; or rewrite the plan for version 1")
    try:
        return RecoveryPlan.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(validation_message(source, exc)) from None
