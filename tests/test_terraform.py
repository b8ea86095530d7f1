"""The Terraform under terraform/, checked without providers: every .tf file is parsed with python-hcl2 and
its structure asserted (variables typed and documented, outputs present, example wiring), together with
the security rules the README promises (ZooKeeper and the agents never reachable from the internet, no
public address on the control plane, IAM within an allow-list).

Expressions are not evaluated by Terraform here: the few this file must understand (variable defaults,
locals, for_each over a literal set or map, toset/tonumber wrappers, regex validations) are resolved by
small helpers below, and anything they cannot resolve counts as the worst case.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import hcl2
import pytest
from hcl2 import SerializationOptions

from node_agent.config import AGENT_OPTIONS
from streammanager.cloud.base import BOOT_SCRIPT_VARIABLES, render_boot_script
from streammanager import config as streammanager_config
from streammanager.config import SERVER_OPTIONS

TERRAFORM = Path(__file__).resolve().parent.parent / "terraform"
# comments off: they would appear as "__comments__" keys among the attributes (skip reasons are read as text)
PARSE_OPTIONS = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)

ZOOKEEPER_PORTS = (2181, 2888, 3888)
ALL_PORTS = (0, 65535)
PUBLIC_SAMPLES = ("0.0.0.0/0", "::/0", "8.8.8.0/24")
MODULE_META_ARGUMENTS = {"source", "version", "providers", "count", "for_each", "depends_on"}

# What each AWS policy document may allow, by data source name. A new document must be added here.
AWS_POLICY_ACTIONS = {
    "controller": {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags",
                   "iam:PassRole"},
    "api": {"secretsmanager:GetSecretValue", "kms:Decrypt"},
    "zk_auth": {"secretsmanager:GetSecretValue", "kms:Decrypt"},  # API servers and controllers
    "flow_logs": {"logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogGroups", "logs:DescribeLogStreams"},
    "ec2_assume_role": {"sts:AssumeRole"},
    "flow_logs_assume_role": {"sts:AssumeRole"},
    # key policies: the account root administers the key (AWS's default), CloudWatch Logs uses it
    "kms_key": {"kms:*", "kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"},
}
AWS_MANAGED_POLICIES = {"AmazonSSMManagedInstanceCore"}

# What the GCE custom roles may hold: the calls libcloud's GCE driver makes to launch, list, label and
# delete nodes (create_node looks zone, region, machine type, disk type, network and subnetwork up first),
# and actAs on the node service account.
GCE_PERMISSIONS = {
    "compute.instances.create", "compute.instances.delete", "compute.instances.get", "compute.instances.list",
    "compute.instances.setLabels", "compute.instances.setMetadata", "compute.instances.setTags",
    "compute.instances.setServiceAccount", "compute.disks.create", "compute.subnetworks.use",
    "compute.subnetworks.useExternalIp", "compute.zoneOperations.get", "compute.zones.get", "compute.zones.list",
    "compute.regions.list", "compute.machineTypes.get", "compute.diskTypes.get", "compute.networks.get",
    "compute.subnetworks.get", "iam.serviceAccounts.actAs",
}
GCE_PROJECT_ROLES = {"roles/logging.logWriter", "roles/monitoring.metricWriter"}

# Who may read each secret, by the secret's resource name: AWS roles, GCE service accounts. A new secret
# must be added here. Media nodes read neither: the controller hands them the ZooKeeper identity through
# their boot script.
SECRET_READERS = {
    "access_token": {"api"},
    "zk_auth": {"api", "controller"},
}


# -- loading -------------------------------------------------------------------------------------------

@dataclass
class Module:
    """All .tf files of one directory, their top-level blocks merged."""

    path: Path
    files: dict[Path, dict] = field(default_factory=dict)
    texts: dict[Path, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.relative_to(TERRAFORM).as_posix()

    def blocks(self, kind: str) -> list:
        return [block for parsed in self.files.values() for block in parsed.get(kind, [])]

    def named(self, kind: str) -> dict[str, dict]:
        merged: dict[str, dict] = {}
        for block in self.blocks(kind):
            merged.update(block)
        return merged

    def typed(self, kind: str, type_name: str) -> dict[str, dict]:
        """resource or data blocks of one type, by name."""
        merged: dict[str, dict] = {}
        for block in self.blocks(kind):
            merged.update(block.get(type_name, {}))
        return merged

    def all_typed(self, kind: str) -> list[tuple[str, str, dict]]:
        return [(type_name, name, body) for block in self.blocks(kind)
                for type_name, bodies in block.items() for name, body in bodies.items()]

    @property
    def variables(self) -> dict[str, dict]:
        return self.named("variable")

    @property
    def outputs(self) -> dict[str, dict]:
        return self.named("output")

    @property
    def locals(self) -> dict:
        merged: dict = {}
        for block in self.blocks("locals"):
            merged.update(block)
        return merged

    @property
    def module_calls(self) -> dict[str, dict]:
        return self.named("module")


def tf_files() -> list[Path]:
    return sorted(TERRAFORM.rglob("*.tf"))


@cache
def parse(path: Path) -> dict:
    return hcl2.loads(path.read_text(), serialization_options=PARSE_OPTIONS)


@cache
def modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for path in tf_files():
        module = found.setdefault(path.parent.relative_to(TERRAFORM).as_posix(), Module(path.parent))
        module.files[path] = parse(path)
        module.texts[path] = path.read_text()
    return found


def module(name: str) -> Module:
    return modules()[name]


def reusable_modules() -> list[Module]:
    return [m for m in modules().values() if m.name.startswith("modules/")]


# -- expressions ---------------------------------------------------------------------------------------

class Unresolved(Exception):
    """An expression these helpers cannot reduce to values; carries its text."""


REFERENCE = "<reference>"  # another resource's attribute: a security group id, a service account email
WRAPPERS = re.compile(r"^(toset|tolist|tonumber|tostring|distinct|compact)\((.*)\)$", re.S)
RESOURCE_REFERENCE = re.compile(r"^(data\.)?[a-z][a-z0-9_]*\.[A-Za-z0-9_-]+(\[[^\]]+\])?\.[A-Za-z0-9_.]+$")


def expression(value) -> str | None:
    """The inner text of a value that is one whole ``${...}`` expression, else None."""
    if not isinstance(value, str) or not value.startswith("${") or not value.endswith("}"):
        return None
    depth = 0
    for index, char in enumerate(value):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0 and index != len(value) - 1:
                return None  # a template such as "${a}-${b}"
    return value[2:-1].strip()


def split_top_level(text: str) -> list[str]:
    parts, depth, current, quoted = [], 0, "", False
    for char in text:
        if char == '"' and not current.endswith("\\"):
            quoted = not quoted
        if not quoted and char in "([{":
            depth += 1
        elif not quoted and char in ")]}":
            depth -= 1
        if char == "," and depth == 0 and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def for_each_items(mod: Module, body: dict) -> list[tuple[object, object]] | None:
    """(each.key, each.value) pairs of a block's for_each, None without for_each."""
    if "for_each" not in body:
        return None
    values = resolve_structure(mod, body["for_each"])
    if isinstance(values, dict):
        return list(values.items())
    return [(v, v) for v in values]


def resolve_structure(mod: Module, value):
    """A value as a Python structure (dict, list or scalar), following var defaults and locals."""
    text = expression(value)
    if text is None:
        return value
    while match := WRAPPERS.match(text):
        text = match.group(2).strip()
    if text.startswith("[") and text.endswith("]"):
        return [json.loads(piece) if piece.startswith('"') or re.fullmatch(r"-?\d+", piece)
                else resolve_structure(mod, "${" + piece + "}")
                for piece in split_top_level(text[1:-1])]
    if match := re.fullmatch(r"var\.([A-Za-z0-9_]+)", text):
        variable = mod.variables.get(match.group(1))
        if variable is None or "default" not in variable or variable["default"] is None:
            raise Unresolved(text)
        return variable["default"]
    if match := re.fullmatch(r"local\.([A-Za-z0-9_]+)", text):
        if match.group(1) not in mod.locals:
            raise Unresolved(text)
        return resolve_structure(mod, mod.locals[match.group(1)])
    if RESOURCE_REFERENCE.match(text) and not text.startswith(("var.", "local.", "each.", "count.")):
        return REFERENCE
    raise Unresolved(text)


def resolve(mod: Module, value, body: dict | None = None) -> list:
    """The possible leaf values of ``value`` (lists flattened, maps by their values)."""
    if isinstance(value, list):
        return [leaf for item in value for leaf in resolve(mod, item, body)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in resolve(mod, item, body)]
    text = expression(value)
    if text is None:
        return [value]
    while match := WRAPPERS.match(text):
        text = match.group(2).strip()
    if match := re.fullmatch(r"each\.(key|value)((?:\.[A-Za-z0-9_]+)*)", text):
        items = for_each_items(mod, body or {})
        if items is None:
            raise Unresolved(text)
        chosen = [k if match.group(1) == "key" else v for k, v in items]
        for attribute in filter(None, match.group(2).split(".")):
            chosen = [item[attribute] for item in chosen]
        return [leaf for item in chosen for leaf in resolve(mod, item, body)]
    return resolve(mod, resolve_structure(mod, "${" + text + "}"), body)


def validation_regexes(mod: Module) -> dict[str, list[str]]:
    """Regexes that variable validations apply, by the expression they test (var.x or var.x.attr)."""
    found: dict[str, list[str]] = {}
    for variable in mod.variables.values():
        for validation in variable.get("validation", []):
            for pattern, target in re.findall(r'regex\("((?:[^"\\]|\\.)*)",\s*(var\.[A-Za-z0-9_.]+)\)',
                                              validation["condition"]):
                found.setdefault(target, []).append(json.loads(f'"{pattern}"'))
    return found


def validation_refuses_zookeeper_ports(mod: Module, text: str) -> bool:
    """Whether a validation of the variable behind ``text`` mentions it together with every ZK port."""
    name = text.split(".")[1]
    conditions = [v["condition"] for v in mod.variables.get(name, {}).get("validation", [])]
    return any(text in c and all(str(p) in c for p in ZOOKEEPER_PORTS) for c in conditions)


# -- ingress rules ---------------------------------------------------------------------------------------

@dataclass
class Ingress:
    module: Module
    address: str
    body: dict
    ports: list  # (low, high) ranges, or the text of a port expression that could not be resolved
    sources: list  # raw source values (CIDRs, references, expressions), "<anywhere>" for none at all
    target: str  # the group or accounts the rule protects, as written

    def covers(self, port: int) -> bool:
        """Whether the rule may open ``port``; an unresolved port may be anything, unless the port is
        ZooKeeper's and a validation of the variable behind it refuses ZooKeeper's ports."""
        for spec in self.ports:
            if isinstance(spec, tuple):
                if spec[0] <= port <= spec[1]:
                    return True
            elif not (port in ZOOKEEPER_PORTS and validation_refuses_zookeeper_ports(self.module, spec)):
                return True
        return False

    def opens(self, port: int, variable: str) -> bool:
        """Whether the rule opens ``port`` as resolved, or names it by ``variable`` (e.g. agent_http_port)."""
        return any((isinstance(spec, tuple) and spec[0] <= port <= spec[1])
                   or (isinstance(spec, str) and spec.endswith(variable)) for spec in self.ports)

    def resolved_sources(self) -> list:
        """Each source as a literal, REFERENCE, or ("unresolved", text)."""
        leaves = []
        for source in self.sources:
            try:
                leaves.extend(resolve(self.module, source, self.body))
            except Unresolved as exc:
                leaves.append(("unresolved", str(exc)))
        return leaves


def port_specs(mod: Module, body: dict, low, high) -> list:
    try:
        lows = [int(v) for v in resolve(mod, low, body)]
        highs = [int(v) for v in resolve(mod, high, body)]
    except Unresolved as exc:
        return [str(exc)]
    return [(a, b) for a, b in zip(lows, highs)] if len(lows) == len(highs) else [ALL_PORTS]


def gce_port_specs(mod: Module, body: dict, allow: dict) -> list:
    if allow.get("protocol") == "all" or not allow.get("ports"):
        return [ALL_PORTS]
    specs = []
    for port in allow["ports"]:
        try:
            values = resolve(mod, port, body)
        except Unresolved as exc:
            specs.append(str(exc))
            continue
        for value in values:
            low, _, high = str(value).partition("-")
            specs.append((int(low), int(high or low)))
    return specs


def ingress_rules(mod: Module) -> list[Ingress]:
    rules = []
    for type_name, name, body in mod.all_typed("resource"):
        address = f"{mod.name}: {type_name}.{name}"
        if type_name == "aws_vpc_security_group_ingress_rule":
            ports = ([ALL_PORTS] if str(body.get("ip_protocol")) in ("-1", "all")
                     else port_specs(mod, body, body.get("from_port"), body.get("to_port")))
            sources = [body[k] for k in ("cidr_ipv4", "cidr_ipv6", "referenced_security_group_id", "prefix_list_id")
                       if k in body]
            rules.append(Ingress(mod, address, body, ports, sources, str(body.get("security_group_id"))))
        elif type_name == "aws_security_group_rule" and body.get("type") == "ingress":
            ports = ([ALL_PORTS] if str(body.get("protocol")) in ("-1", "all")
                     else port_specs(mod, body, body.get("from_port"), body.get("to_port")))
            sources = [body[k] for k in ("cidr_blocks", "ipv6_cidr_blocks", "source_security_group_id",
                                         "prefix_list_ids") if k in body]
            if body.get("self"):
                sources.append(REFERENCE)
            rules.append(Ingress(mod, address, body, ports, sources, str(body.get("security_group_id"))))
        elif type_name == "aws_security_group":
            inline = list(body.get("ingress", []))
            inline += [d["ingress"].get("content", [{}])[0] for d in body.get("dynamic", []) if "ingress" in d]
            for rule in inline:
                ports = ([ALL_PORTS] if str(rule.get("protocol")) in ("-1", "all")
                         else port_specs(mod, body, rule.get("from_port"), rule.get("to_port")))
                sources = [rule[k] for k in ("cidr_blocks", "ipv6_cidr_blocks", "security_groups", "prefix_list_ids")
                           if k in rule]
                if rule.get("self"):
                    sources.append(REFERENCE)
                rules.append(Ingress(mod, address, body, ports, sources, f"aws_security_group.{name}"))
        elif type_name == "google_compute_firewall" and body.get("direction", "INGRESS") == "INGRESS":
            ports = [spec for allow in body.get("allow", []) for spec in gce_port_specs(mod, body, allow)]
            sources = [body[k] for k in ("source_ranges", "source_tags", "source_service_accounts") if k in body]
            if not sources:
                sources = ["0.0.0.0/0"]  # GCE's default source range
            rules.append(Ingress(mod, address, body, ports, sources,
                                 json.dumps(body.get("target_service_accounts", body.get("target_tags", "<all>")))))
    return rules


def is_internet(leaf) -> bool:
    if not isinstance(leaf, str) or leaf == REFERENCE:
        return False
    try:
        return ipaddress.ip_network(leaf, strict=False).prefixlen == 0
    except ValueError:
        return False


def private_only_problems(rule: Ingress) -> list[str]:
    """Sources of a rule that are not provably inside the cluster's private address space."""
    problems = []
    regexes = validation_regexes(rule.module)
    for leaf in rule.resolved_sources():
        if leaf == REFERENCE:
            continue
        if isinstance(leaf, tuple):
            patterns = regexes.get(leaf[1], [])
            if not patterns or any(re.search(p, sample) for p in patterns for sample in PUBLIC_SAMPLES):
                problems.append(f"{leaf[1]} (unresolved, and no validation regex refuses public ranges)")
            continue
        if not isinstance(leaf, str) or "${" in leaf:
            problems.append(f"{leaf!r} (not understood)")
            continue
        try:
            network = ipaddress.ip_network(leaf, strict=False)
        except ValueError:
            continue  # a network tag or a service account email: a cluster member, not an address range
        if not network.is_private or network.prefixlen == 0:
            problems.append(leaf)
    return problems


# -- helpers for the other checks -----------------------------------------------------------------------

def walk(value):
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


def policy_statements(mod: Module, name: str) -> list[dict]:
    return mod.typed("data", "aws_iam_policy_document")[name]["statement"]


def conditions(statement: dict) -> dict[str, dict]:
    return {c["variable"]: c for c in statement.get("condition", [])}


TEMPLATEFILE = re.compile(r'templatefile\("\$\{path\.module\}/([^"]+)",\s*\{(.*?)\}\)', re.S)


def templatefile_calls(mod: Module) -> list[tuple[str, set[str]]]:
    """(template path, names passed) of every templatefile() call in a module."""
    calls = []
    for parsed in mod.files.values():
        for leaf in walk(parsed):
            if isinstance(leaf, str):
                for path, arguments in TEMPLATEFILE.findall(leaf):
                    names = {piece.split("=", 1)[0].strip() for piece in split_top_level(arguments)}
                    calls.append((path, names))
    return calls


def templatefile_arguments(mod: Module) -> dict[str, dict[str, str]]:
    """The arguments (name: expression text) of every templatefile() call in a module, by template path."""
    calls = {}
    for parsed in mod.files.values():
        for leaf in walk(parsed):
            if isinstance(leaf, str):
                for path, arguments in TEMPLATEFILE.findall(leaf):
                    calls[path] = dict((piece.split("=", 1)[0].strip(), piece.split("=", 1)[1].strip())
                                       for piece in split_top_level(arguments))
    return calls


def heredocs(text: str) -> dict[str, tuple[str, str]]:
    """The files a boot script writes with ``cat > PATH <<'END'``: path -> (delimiter as written, body)."""
    return {path: (quote + end + quote, body) for path, quote, end, body in
            re.findall(r"^cat > (\S+) <<('?)(\w+)\2\n(.*?)^\3$", text, re.S | re.M)}


def template_names(text: str) -> set[str]:
    """Names a Terraform template reads: interpolations and directives, minus loop variables."""
    names = set(re.findall(r"(?<!\$)\$\{\s*([A-Za-z_][A-Za-z0-9_]*)", text))
    loop_vars = set()
    for targets, collection in re.findall(r"%\{~?\s*for\s+([\w\s,]+?)\s+in\s+([A-Za-z_]\w*)", text):
        loop_vars.update(t.strip() for t in targets.split(","))
        names.add(collection)
    names.update(re.findall(r"%\{~?\s*if\s+([A-Za-z_]\w*)", text))
    return names - loop_vars


def render_like_terraform(text: str, values: dict[str, object]) -> str:
    """A template without directives rendered as templatefile() would: ${name} filled, $${ kept as ${."""
    assert "%{" not in text.replace("%%{", ""), "this helper does not render directives"
    filled = re.sub(r"(?<!\$)\$\{\s*([A-Za-z_]\w*)\s*\}", lambda m: str(values[m.group(1)]), text)
    return filled.replace("$${", "${").replace("%%{", "%{")


def option_default(options, field_name: str):
    return next(o.default for o in options if o.field == field_name)


# -- tests: parsing and structure -------------------------------------------------------------------------

def test_the_terraform_tree_holds_both_cloud_modules_the_media_region_module_and_the_example():
    assert {"modules/aws", "modules/aws/media-region", "modules/gce", "examples/multi-region"} <= set(modules())


@pytest.mark.parametrize("path", tf_files(), ids=lambda p: p.relative_to(TERRAFORM).as_posix())
def test_every_tf_file_parses(path):
    parsed = parse(path)
    assert parsed, f"{path} parsed to nothing"


def test_every_variable_has_a_description_and_a_type():
    missing = [f"{mod.name}: var.{name} lacks {key}"
               for mod in modules().values() for name, body in mod.variables.items()
               for key in ("description", "type") if not str(body.get(key, "")).strip()]
    assert not missing, "\n".join(missing)


def test_every_module_pins_terraform_and_its_providers():
    for mod in modules().values():
        settings = mod.blocks("terraform")
        assert settings and settings[0].get("required_version"), f"{mod.name}: no required_version"
        providers = {name: spec for block in settings[0].get("required_providers", []) for name, spec in block.items()}
        assert providers, f"{mod.name}: no required_providers"
        for name, spec in providers.items():
            assert spec.get("source") and spec.get("version"), f"{mod.name}: provider {name} unpinned"


def test_every_module_has_documented_outputs():
    for mod in reusable_modules():
        assert mod.outputs, f"{mod.name} has no outputs"
        undocumented = [name for name, body in mod.outputs.items() if not body.get("description")]
        assert not undocumented, f"{mod.name}: outputs without description: {undocumented}"


@pytest.mark.parametrize("name, expected", [
    ("modules/aws", {"api_url", "api_load_balancer_dns_name", "zk_hosts", "zk_root", "access_token_secret_arn",
                     "zk_auth_secret_arn", "node_launch", "node_boot_script_template", "home"}),
    ("modules/gce", {"api_url", "api_address", "zk_hosts", "zk_root", "access_token_secret", "zk_auth_secret",
                     "node_launch", "node_boot_script_template"}),
    ("modules/aws/media-region", {"node_launch", "region"}),
])
def test_each_module_outputs_the_api_address_the_zookeeper_hosts_and_where_to_launch_nodes(name, expected):
    assert expected <= set(module(name).outputs)


def test_the_media_region_module_accepts_exactly_what_the_aws_module_outputs_as_home():
    home_output = module("modules/aws").outputs["home"]["value"]
    home_type = module("modules/aws/media-region").variables["home"]["type"]
    declared = set(re.findall(r"([a-z_]+)\s*=", home_type))
    assert declared == set(home_output), (declared ^ set(home_output))


# -- tests: the network ------------------------------------------------------------------------------------

def test_zookeeper_ports_are_never_open_to_the_internet():
    problems, checked = [], {}
    for mod in modules().values():
        for rule in ingress_rules(mod):
            if any(rule.covers(port) for port in ZOOKEEPER_PORTS):
                checked[mod.name] = checked.get(mod.name, 0) + 1
                problems += [f"{rule.address}: source {p}" for p in private_only_problems(rule)]
    assert not problems, "ZooKeeper reachable from outside the cluster:\n" + "\n".join(problems)
    # the scan must have seen the ZooKeeper rules, or it proves nothing
    assert set(checked) >= {"modules/aws", "modules/aws/media-region", "modules/gce"}, checked


def test_the_agent_http_port_is_reachable_from_inside_the_cluster_only():
    agent_port = option_default(AGENT_OPTIONS, "http_port")
    problems, checked = [], 0
    for mod in modules().values():
        for rule in ingress_rules(mod):
            if rule.opens(agent_port, "agent_http_port"):
                checked += 1
                problems += [f"{rule.address}: source {p}" for p in private_only_problems(rule)]
    assert not problems, "\n".join(problems)
    assert checked >= 4


def test_only_rtmp_on_media_nodes_and_https_on_the_load_balancer_face_the_internet():
    rtmp_port = option_default(AGENT_OPTIONS, "rtmp_port")
    problems = []
    for mod in modules().values():
        for rule in ingress_rules(mod):
            if not any(is_internet(leaf) for leaf in rule.resolved_sources()):
                continue
            for spec in rule.ports:
                is_rtmp = spec == (rtmp_port, rtmp_port) or (isinstance(spec, str) and spec.endswith("rtmp_port"))
                if is_rtmp and ("media" in rule.target or "node" in rule.target):
                    continue
                if spec == (443, 443) and "alb" in rule.target:
                    continue
                problems.append(f"{rule.address}: {spec} open to the internet on {rule.target}")
    assert not problems, "\n".join(problems)


def test_port_defaults_match_what_the_servers_and_agents_listen_on():
    api_port = int(option_default(SERVER_OPTIONS, "bind").rpartition(":")[2])
    expected = {"api_port": api_port, "rtmp_port": option_default(AGENT_OPTIONS, "rtmp_port"),
                "agent_http_port": option_default(AGENT_OPTIONS, "http_port")}
    for name in ("modules/aws", "modules/gce"):
        variables = module(name).variables
        assert {k: variables[k]["default"] for k in expected} == expected, name


def test_the_api_load_balancers_health_check_healthz_on_the_api_port():
    target_group = module("modules/aws").typed("resource", "aws_lb_target_group")["api"]
    assert target_group["port"] == "${var.api_port}"
    assert target_group["health_check"][0]["path"] == "/healthz"
    assert target_group["health_check"][0]["port"] == "traffic-port"
    check = module("modules/gce").typed("resource", "google_compute_health_check")["api"]["http_health_check"][0]
    assert check == {"port": "${var.api_port}", "request_path": "/healthz"}


def test_control_plane_instances_have_no_public_address():
    aws = module("modules/aws")
    for name, body in aws.typed("resource", "aws_instance").items():
        assert body.get("associate_public_ip_address") is False, f"aws_instance.{name}"
    templates = aws.typed("resource", "aws_launch_template")
    assert templates
    for name, body in templates.items():
        interfaces = body.get("network_interfaces", [])
        assert interfaces and all(i.get("associate_public_ip_address") is False for i in interfaces), name
    gce = module("modules/gce")
    instances = {**gce.typed("resource", "google_compute_instance"),
                 **gce.typed("resource", "google_compute_instance_template")}
    assert instances
    for name, body in instances.items():
        assert all("access_config" not in nic for nic in body["network_interface"]), f"{name} has an external IP"


def test_aws_instances_require_imdsv2_and_encrypt_their_disks():
    aws = module("modules/aws")
    for name, body in aws.typed("resource", "aws_instance").items():
        assert body["metadata_options"][0]["http_tokens"] == "required", name
        assert body["root_block_device"][0]["encrypted"] is True, name
    for name, body in aws.typed("resource", "aws_launch_template").items():
        assert body["metadata_options"][0]["http_tokens"] == "required", name
        assert all(m["ebs"][0]["encrypted"] is True for m in body["block_device_mappings"]), name
    # media nodes are launched by libcloud, which cannot ask for either: the region defaults must
    for name in ("modules/aws", "modules/aws/media-region"):
        mod = module(name)
        assert mod.typed("resource", "aws_ec2_instance_metadata_defaults")["this"]["http_tokens"] == "required"
        assert mod.typed("resource", "aws_ebs_encryption_by_default")["this"]["enabled"] is True


def test_gce_instances_are_shielded_and_refuse_project_ssh_keys():
    gce = module("modules/gce")
    for name, body in {**gce.typed("resource", "google_compute_instance"),
                       **gce.typed("resource", "google_compute_instance_template")}.items():
        assert body["shielded_instance_config"][0]["enable_secure_boot"] is True, name
        assert body["metadata"]["block-project-ssh-keys"] == "true", name
        emails = [body["service_account"][0]["email"]]
        if found := re.fullmatch(r"\$\{each\.value\.([A-Za-z0-9_]+)\}", emails[0]):  # one template per role
            emails = [value[found.group(1)] for _, value in for_each_items(gce, body)]
        assert emails and all(e.startswith("${google_service_account.") for e in emails), name


def test_nothing_terraform_creates_carries_the_controllers_cluster_tag():
    # the controller lists, and may terminate, every instance tagged sm-cluster with its id
    def sets_the_cluster_tag(value) -> bool:
        return any((isinstance(leaf, dict) and "sm-cluster" in leaf)
                   or (isinstance(leaf, str) and re.search(r'"?sm-cluster"?\s*=(?!=)', leaf))
                   for leaf in walk(value))

    offenders = [f"{mod.name}: {type_name}.{name}" for mod in reusable_modules()
                 for type_name, name, body in mod.all_typed("resource") if sets_the_cluster_tag(body)]
    offenders += [f"{mod.name}: local.{name}" for mod in reusable_modules()
                  for name, value in mod.locals.items() if sets_the_cluster_tag(value)]
    assert not offenders, offenders


# -- tests: IAM --------------------------------------------------------------------------------------------

def test_aws_policy_documents_allow_only_their_listed_actions():
    problems = []
    for mod in reusable_modules():
        for name, document in mod.typed("data", "aws_iam_policy_document").items():
            if name not in AWS_POLICY_ACTIONS:
                problems.append(f"{mod.name}: policy document {name} is not in the allow-list of this test")
                continue
            for statement in document["statement"]:
                extra = set(statement["actions"]) - AWS_POLICY_ACTIONS[name]
                if extra:
                    problems.append(f"{mod.name}: {name} allows {sorted(extra)}")
                if statement.get("effect", "Allow") == "Allow" and "kms:*" in statement["actions"]:
                    principals = statement.get("principals", [])
                    if not all(p["type"] == "AWS" and all(i.endswith(":root") for i in p["identifiers"])
                               for p in principals) or not principals:
                        problems.append(f"{mod.name}: {name} gives kms:* to someone other than the account")
    assert not problems, "\n".join(problems)


def test_aws_roles_get_permissions_only_from_checked_documents_and_known_managed_policies():
    for mod in reusable_modules():
        for name, body in mod.typed("resource", "aws_iam_role_policy").items():
            assert re.fullmatch(r"\$\{data\.aws_iam_policy_document\.\w+\.json\}", body["policy"]), name
        for name, body in mod.typed("resource", "aws_iam_role").items():
            assert re.fullmatch(r"\$\{data\.aws_iam_policy_document\.\w+_assume_role\.json\}",
                                body["assume_role_policy"]), name
        for name, body in mod.typed("resource", "aws_iam_role_policy_attachment").items():
            assert body["policy_arn"].rsplit("/", 1)[1] in AWS_MANAGED_POLICIES, name
        assert not mod.typed("resource", "aws_iam_policy"), "standalone policies escape this test"


def test_the_aws_controller_acts_only_on_instances_tagged_with_its_cluster():
    statements = policy_statements(module("modules/aws"), "controller")
    for statement in statements:
        actions, where, by_key = statement["actions"], statement["resources"], conditions(statement)
        assert all("*" not in action for action in actions)
        if "ec2:TerminateInstances" in actions:
            assert by_key["ec2:ResourceTag/sm-cluster"]["values"] == ["${var.name}"]
        if "ec2:RunInstances" in actions and any(r.endswith(":instance/*") for r in where):
            assert by_key["aws:RequestTag/sm-cluster"]["values"] == ["${var.name}"]
        if "ec2:RunInstances" in actions and any(r.endswith(("subnet/*", "security-group/*")) for r in where):
            assert by_key["ec2:ResourceTag/sm-node-network"]["values"] == ["${var.name}"]
        if "ec2:CreateTags" in actions:
            assert "ec2:CreateAction" in by_key or "ec2:ResourceTag/sm-cluster" in by_key
        if "iam:PassRole" in actions:
            assert where == ["${aws_iam_role.node.arn}"]
            assert by_key["iam:PassedToService"]["values"] == ["ec2.amazonaws.com"]
        if where == ["*"]:
            assert set(actions) == {"ec2:DescribeInstances"}, "only Describe may use Resource *"
    assert {a for s in statements for a in s["actions"]} == AWS_POLICY_ACTIONS["controller"]


def test_gce_custom_roles_hold_only_the_permissions_libcloud_needs():
    roles = module("modules/gce").typed("resource", "google_project_iam_custom_role")
    assert roles
    for name, body in roles.items():
        extra = set(body["permissions"]) - GCE_PERMISSIONS
        assert not extra, f"{name} grants {sorted(extra)}"
    controller = set(roles["controller"]["permissions"])
    assert {"compute.instances.create", "compute.instances.delete", "compute.instances.list",
            "compute.instances.setLabels", "compute.zoneOperations.get", "compute.subnetworks.use"} <= controller


def test_gce_grants_act_as_on_the_node_account_only_and_nothing_broad_on_the_project():
    gce = module("modules/gce")
    roles = gce.typed("resource", "google_project_iam_custom_role")
    act_as_roles = {name for name, body in roles.items() if "iam.serviceAccounts.actAs" in body["permissions"]}
    for name, body in gce.typed("resource", "google_project_iam_member").items():
        granted = set(re.findall(r"roles/[A-Za-z.]+", json.dumps(body)))
        assert granted <= GCE_PROJECT_ROLES, f"{name} grants {granted - GCE_PROJECT_ROLES} project-wide"
        custom = set(re.findall(r"google_project_iam_custom_role\.(\w+)", json.dumps(body)))
        assert not custom & act_as_roles, f"{name} grants actAs on every service account of the project"
    assert not gce.typed("resource", "google_project_iam_binding")
    bindings = gce.typed("resource", "google_service_account_iam_member")
    assert {b["service_account_id"] for b in bindings.values()} == {"${google_service_account.node.name}"}


def aws_role_policies(mod: Module) -> list[tuple[str, str]]:
    """(role, policy document) of every inline role policy, by resource name, for_each expanded."""
    pairs = []
    for name, body in mod.typed("resource", "aws_iam_role_policy").items():
        document = re.fullmatch(r"\$\{data\.aws_iam_policy_document\.(\w+)\.json\}", body["policy"]).group(1)
        items = for_each_items(mod, body)
        roles = [value for _, value in items] if body["role"] == "${each.value}" else [body["role"]]
        for role in roles:
            found = re.fullmatch(r"\$\{aws_iam_role\.(\w+)\.(?:id|name)\}", role)
            assert found, f"aws_iam_role_policy.{name}: role {role} is not one of this module's roles"
            pairs.append((found.group(1), document))
    return pairs


def test_each_aws_secret_is_read_by_exactly_its_roles_and_decrypted_only_through_secrets_manager():
    aws = module("modules/aws")
    documents = aws.typed("data", "aws_iam_policy_document")
    secrets = aws.typed("resource", "aws_secretsmanager_secret")
    assert set(secrets) == set(SECRET_READERS), "a new secret must be added to SECRET_READERS"
    for name, body in secrets.items():
        assert body["kms_key_id"] == "${module.cluster_key.arn}", f"{name} is not encrypted with the cluster key"
    readers: dict[str, set[str]] = {name: set() for name in secrets}
    pairs = aws_role_policies(aws)
    for role, document in pairs:
        for statement in documents[document]["statement"]:
            if any(action.startswith("secretsmanager:") for action in statement["actions"]):
                assert statement["actions"] == ["secretsmanager:GetSecretValue"], document
                named = [re.fullmatch(r"\$\{aws_secretsmanager_secret\.(\w+)\.arn\}", resource)
                         for resource in statement["resources"]]
                assert all(named), f"{document}: GetSecretValue on {statement['resources']}, not on one secret"
                readers.update({m.group(1): readers[m.group(1)] | {role} for m in named})
            if "kms:Decrypt" in statement["actions"]:
                assert statement["resources"] == ["${module.cluster_key.arn}"], document
                via = conditions(statement)["kms:ViaService"]
                assert via["test"] == "StringEquals", document
                assert via["values"] == ["secretsmanager.${local.region}.amazonaws.com"], document
    assert readers == SECRET_READERS
    # media nodes get the ZooKeeper identity from the controller's boot script; ZooKeeper needs none
    assert not {"node", "zookeeper"} & {role for role, _ in pairs}


def test_each_gce_secret_is_read_by_exactly_its_service_accounts():
    gce = module("modules/gce")
    secrets = gce.typed("resource", "google_secret_manager_secret")
    assert set(secrets) == set(SECRET_READERS), "a new secret must be added to SECRET_READERS"
    readers: dict[str, set[str]] = {name: set() for name in secrets}
    for name, body in gce.typed("resource", "google_secret_manager_secret_iam_member").items():
        secret = re.fullmatch(r"\$\{google_secret_manager_secret\.(\w+)\.secret_id\}", body["secret_id"]).group(1)
        assert body["role"] == "roles/secretmanager.secretAccessor", name
        items = for_each_items(gce, body)
        members = [body["member"].replace("${each.value}", value) for _, value in items] if items else [body["member"]]
        for member in members:
            found = re.fullmatch(r"serviceAccount:\$\{google_service_account\.(\w+)\.email\}", member)
            assert found, f"{name}: {member} is not one of this module's service accounts"
            readers[secret].add(found.group(1))
    assert readers == SECRET_READERS
    # bindings and policies would replace the members (and escape this test); project-wide roles are
    # limited to GCE_PROJECT_ROLES above
    assert not gce.typed("resource", "google_secret_manager_secret_iam_binding")
    assert not gce.typed("resource", "google_secret_manager_secret_iam_policy")


# -- tests: the boot scripts -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["modules/aws", "modules/gce"])
def test_every_template_exists_and_gets_exactly_the_values_it_reads(name):
    mod = module(name)
    calls = templatefile_calls(mod)
    assert len({path for path, _ in calls}) >= 5
    for path, passed in calls:
        template = mod.path / path
        assert template.is_file(), f"{name}: {path} is missing"
        assert passed == template_names(template.read_text()), f"{name}: {path}"


@pytest.mark.parametrize("name", ["modules/aws", "modules/gce"])
def test_the_node_boot_script_leaves_the_controller_only_its_own_placeholders(name):
    text = (module(name).path / "templates" / "node-boot.sh.tftpl").read_text()
    after_terraform = render_like_terraform(text, {"agent_http_port": 8090, "rtmp_port": 1935})
    values = {key: f"<{key}>" for key in BOOT_SCRIPT_VARIABLES}
    values.update(role="edge", zk_hosts="10.0.0.10:2181", package="streammanager==0.1.0")
    script = render_boot_script(after_terraform, **values)  # KeyError on any other placeholder
    assert "${" not in script and "$$" not in script
    assert "--role edge" in script and "--http-port 8090 --rtmp-port 1935" in script
    assert "AGENT_ZK_HOSTS=10.0.0.10:2181" in script
    assert "pip install -q 'streammanager==0.1.0'" in script


def settings_in(text: str, prefix: str) -> set[str]:
    return set(re.findall(rf"\b({prefix}[A-Z0-9_]+)=", text))


@pytest.mark.parametrize("name", ["modules/aws", "modules/gce"])
def test_the_api_servers_get_their_zookeeper_token_and_bind_address_as_sm_settings(name):
    text = (module(name).path / "templates" / "api-server.sh.tftpl").read_text()
    known = {option.env for option in SERVER_OPTIONS}
    used = settings_in(text, "SM_")
    assert used <= known, f"streammanager serve has no {sorted(used - known)}"
    assert {"SM_ZK_HOSTS", "SM_ZK_ROOT", "SM_ACCESS_TOKEN", "SM_ZK_AUTH", "SM_BIND"} <= used
    assert "exec /opt/streammanager/bin/streammanager serve" in text


@pytest.mark.parametrize("name", ["modules/aws", "modules/gce"])
def test_the_node_boot_script_uses_only_settings_and_flags_the_agent_has(name):
    text = (module(name).path / "templates" / "node-boot.sh.tftpl").read_text()
    known_env = {option.env for option in AGENT_OPTIONS}
    known_flags = {option.flag for option in AGENT_OPTIONS}
    used_env = settings_in(text, "AGENT_")
    command = next(line for line in text.splitlines() if line.startswith("ExecStart=") and "node-agent" in line)
    used_flags = set(re.findall(r"(--[a-z-]+)", command))
    assert used_env <= known_env, sorted(used_env - known_env)
    assert used_flags <= known_flags, sorted(used_flags - known_flags)
    assert {"AGENT_ZK_HOSTS", "AGENT_ZK_ROOT"} <= used_env
    assert {"--role", "--region", "--group", "--node-id", "--host", "--http-port", "--rtmp-port"} <= used_flags


@pytest.mark.parametrize("name", ["modules/aws", "modules/gce"])
def test_the_node_boot_script_fits_in_ec2_user_data(name):
    text = (module(name).path / "templates" / "node-boot.sh.tftpl").read_text()
    assert len(text.encode()) < 16 * 1024 - 1024  # room for the filled-in values


@pytest.mark.parametrize("name", ["modules/aws", "modules/gce"])
def test_the_controllers_get_their_zookeeper_cluster_id_and_node_package(name):
    text = (module(name).path / "templates" / "controller.sh.tftpl").read_text()
    used = settings_in(text, "SM_")
    assert {"SM_ZK_HOSTS", "SM_ZK_ROOT", "SM_CLUSTER_ID", "SM_NODE_PACKAGE", "SM_ZK_AUTH"} <= used
    assert "ExecStart=/usr/local/sbin/streammanager-controller" in text  # the wrapper that reads SM_ZK_AUTH
    assert "exec /opt/streammanager/bin/streammanager controller" in text
    assert not re.search(r"SM_EC2_(ACCESS|SECRET)_KEY|SM_GCE_KEY_FILE", text), "no cloud keys on disk"
    controller_options = getattr(streammanager_config, "CONTROLLER_OPTIONS", None)
    if controller_options is None:
        pytest.skip("streammanager.config has no CONTROLLER_OPTIONS in this tree")
    known = {option.env for option in controller_options}
    assert used <= known, f"streammanager controller has no {sorted(used - known)}"


@pytest.mark.parametrize("name, setting, value", [
    ("modules/aws", "SM_EC2_CREDENTIALS", "instance-role"),
    ("modules/gce", "SM_GCE_AUTH", "metadata"),
])
def test_the_controllers_authenticate_as_their_instance_with_no_key(name, setting, value):
    text = (module(name).path / "templates" / "controller.sh.tftpl").read_text()
    assert re.search(rf"^{setting}={value}$", text, re.MULTILINE), f"{name}: the controller needs {setting}={value}"
    option = next(o for o in streammanager_config.CONTROLLER_OPTIONS if o.env == setting)
    assert value in option.choices


# how a wrapper script reads a secret, the template variable that names it in braces
READ_SECRET = {
    "modules/aws": "aws secretsmanager get-secret-value --region ${{region}} --secret-id '${{{variable}}}' "
                   "--query SecretString --output text",
    "modules/gce": "secret '${{{variable}}}'",
}
# what that needs on the instance: the AWS CLI, or the shell function that calls Secret Manager's API
READ_SECRET_NEEDS = {
    "modules/aws": "apt-get install -y -qq --no-install-recommends awscli",
    "modules/gce": '"https://secretmanager.googleapis.com/v1/$1/versions/latest:access"',
}


@pytest.mark.parametrize("name, template, command, variable, secret", [
    ("modules/aws", "api-server.sh.tftpl", "serve", "zk_auth_secret_arn", "aws_secretsmanager_secret.zk_auth.arn"),
    ("modules/aws", "controller.sh.tftpl", "controller", "zk_auth_secret_arn", "aws_secretsmanager_secret.zk_auth.arn"),
    ("modules/gce", "api-server.sh.tftpl", "serve", "zk_auth_secret", "google_secret_manager_secret.zk_auth.id"),
    ("modules/gce", "controller.sh.tftpl", "controller", "zk_auth_secret", "google_secret_manager_secret.zk_auth.id"),
])
def test_the_api_servers_and_controllers_read_the_zookeeper_identity_from_its_secret_at_each_start(
        name, template, command, variable, secret):
    mod = module(name)
    text = (mod.path / "templates" / template).read_text()
    files = heredocs(text)
    wrapper_path = f"/usr/local/sbin/streammanager-{command}"
    delimiter, wrapper = files[wrapper_path]
    # a quoted delimiter: the boot script writes the command, which reads the secret when the service starts
    assert delimiter.startswith("'"), f"{template}: the wrapper's here-document must be quoted"
    lines = wrapper.splitlines()
    assert f"SM_ZK_AUTH=$({READ_SECRET[name].format(variable=variable)})" in lines, template
    assert READ_SECRET_NEEDS[name] in text, template
    assert any(re.fullmatch(r"export( \w+)* SM_ZK_AUTH( \w+)*", line) for line in lines), template
    assert lines[-1] == f"exec /opt/streammanager/bin/streammanager {command}", template
    units = [body for path, (_, body) in files.items() if path.startswith("/etc/systemd/system/")]
    assert len(units) == 1 and f"ExecStart={wrapper_path}" in units[0].splitlines(), template
    # nowhere else: not in the unit, not in controller.env, not in what the boot script runs itself
    for path, (_, body) in files.items():
        assert path == wrapper_path or "ZK_AUTH" not in body, f"{template}: {path} names the ZooKeeper identity"
    assert "SM_ZK_AUTH" not in settings_in(text.replace(wrapper, ""), "SM_"), template
    # the template is given where the identity is, never the identity
    assert templatefile_arguments(mod)[f"templates/{template}"][variable] == secret


def test_no_template_is_given_a_secret_value():
    # user data and startup scripts are readable by anyone who may describe the instances
    for mod in reusable_modules():
        for path, arguments in templatefile_arguments(mod).items():
            leaked = {k: v for k, v in arguments.items()
                      if re.search(r"\brandom_password\.|_secret_version\.|\.secret_(string|data)\b", v)}
            assert not leaked, f"{mod.name}: {path} is given {leaked}"


@pytest.mark.parametrize("name, version_type, attribute", [
    ("modules/aws", "aws_secretsmanager_secret_version", "secret_string"),
    ("modules/gce", "google_secret_manager_secret_version", "secret_data"),
])
def test_the_generated_zookeeper_identity_is_one_the_product_accepts(name, version_type, attribute):
    mod = module(name)
    password = mod.typed("resource", "random_password")["zk_auth"]
    assert password["special"] is False, "letters and digits only: no ':', nothing a shell or unit must quote"
    value = mod.typed("resource", version_type)["zk_auth"][attribute]
    sample = value.replace("${random_password.zk_auth.result}", ("aZ9" * password["length"])[:password["length"]])
    assert "${" not in sample and sample.count(":") == 1, value
    assert streammanager_config.zk_credentials(sample) == sample  # ValueError if the product refuses it


# plausible values for what Terraform fills in at apply time (resource ids and links)
SAMPLE_PLACEMENT_VALUES = {
    "subnets": ["subnet-0a1b2c3d4e5f60718", "subnet-0b1c2d3e4f5a60718"],
    "securityGroups": ["sg-0123456789abcdef0"],
    "instanceProfile": "sm-aws-node",
    "network": "https://www.googleapis.com/compute/v1/projects/my-project/global/networks/sm-gce",
    "subnetwork": "projects/my-project/regions/{region}/subnetworks/sm-gce-{region}",
    "serviceAccount": "sm-gce-node@my-project.iam.gserviceaccount.com",
}


def node_launch_placement(mod: Module) -> dict:
    """The ``placement`` of a module's node_launch output, keys as written, values as parsed (a GCE
    output is a for expression: its object is read from the text)."""
    value = mod.outputs["node_launch"]["value"]
    if isinstance(value, dict):
        return value["placement"]
    body = re.search(r"placement = \{(.*?)\}", value).group(1)
    placement = {}
    for key, raw in re.findall(r"(\w+) = (\[[^\]]*\]|[^,]+)", body):
        raw = raw.strip()
        placement[key] = {"true": True, "false": False}.get(raw, json.loads(raw) if raw.startswith("[") else raw)
    return placement


@pytest.mark.parametrize("name, provider, region", [
    ("modules/aws", "ec2", "us-east-1"),
    ("modules/aws/media-region", "ec2", "eu-west-1"),
    ("modules/gce", "gce", "us-central1"),
])
def test_the_node_launch_placement_is_an_entry_the_node_group_api_accepts(name, provider, region):
    from streammanager.cloud.base import EC2_PLACEMENT_FIELDS, GCE_PLACEMENT_FIELDS
    from streammanager.groups import NodeGroup

    placement = node_launch_placement(module(name))
    assert set(placement) == set(EC2_PLACEMENT_FIELDS if provider == "ec2" else GCE_PLACEMENT_FIELDS)
    entry = {key: value if isinstance(value, bool) or (isinstance(value, list) and "${" not in json.dumps(value))
             else json.loads(json.dumps(SAMPLE_PLACEMENT_VALUES[key]).replace("{region}", region))
             for key, value in placement.items()}
    group = NodeGroup.from_api({"name": "g1", "regions": {region: {"edge": {"min": 0, "max": 1}}},
                                "launchConfig": {"provider": provider, "image": "img", "size": "small",
                                                 "placement": {region: entry}}})
    assert group.launch.placement[region]["publicIp"] is True  # media nodes serve RTMP to the internet


def test_every_checkov_skip_states_its_reason():
    skips = [(path, match) for mod in modules().values() for path, text in mod.texts.items()
             for match in re.finditer(r"#\s*checkov:skip=([A-Z0-9_]+)(?::(.*))?", text)]
    assert skips, "expected the documented skips"
    vague = [f"{path.name}: {m.group(1)}" for path, m in skips if len((m.group(2) or "").strip()) < 20]
    assert not vague, vague


# -- tests: the example ------------------------------------------------------------------------------------

def module_calls() -> list[tuple[Module, str, dict]]:
    return [(mod, name, body) for mod in modules().values() for name, body in mod.module_calls.items()]


def called_module(caller: Module, body: dict) -> Module:
    target = (caller.path / body["source"]).resolve()
    key = target.relative_to(TERRAFORM).as_posix()
    assert key in modules(), f"{caller.name}: module source {body['source']} has no .tf files"
    return modules()[key]


def test_the_example_uses_both_cloud_modules_and_the_media_region_module():
    sources = {called_module(caller, body).name for caller, _, body in module_calls()
               if caller.name == "examples/multi-region"}
    assert sources == {"modules/aws", "modules/aws/media-region", "modules/gce"}


@pytest.mark.parametrize("call", module_calls(), ids=lambda c: f"{c[0].name}:{c[1]}")
def test_every_module_call_passes_only_declared_variables_and_every_required_one(call):
    caller, name, body = call
    target = called_module(caller, body)
    passed = set(body) - MODULE_META_ARGUMENTS
    declared = set(target.variables)
    assert not passed - declared, f"module.{name} passes undeclared {sorted(passed - declared)}"
    required = {v for v, spec in target.variables.items() if "default" not in spec}
    assert not required - passed, f"module.{name} misses required {sorted(required - passed)}"


@pytest.mark.parametrize("call", module_calls(), ids=lambda c: f"{c[0].name}:{c[1]}")
def test_every_module_call_hands_over_the_provider_aliases_the_module_declares(call):
    caller, name, body = call
    target = called_module(caller, body)
    settings = target.blocks("terraform")[0]
    aliases = {alias.strip("${}") for block in settings.get("required_providers", [])
               for spec in block.values() for alias in spec.get("configuration_aliases", [])}
    handed = {key.strip("${}") for key in body.get("providers", {})}  # the parser writes aws.home as ${aws.home}
    assert aliases <= handed, f"module.{name} must be given {sorted(aliases - handed)}"
    known = {p for block in settings.get("required_providers", []) for p in block} | aliases
    assert handed <= known, f"module.{name} is given providers it does not declare: {sorted(handed - known)}"


def test_the_tfvars_example_sets_every_required_variable_of_the_example_and_nothing_else():
    example = module("examples/multi-region")
    tfvars = hcl2.loads((example.path / "terraform.tfvars.example").read_text(),
                        serialization_options=PARSE_OPTIONS)
    required = {name for name, spec in example.variables.items() if "default" not in spec}
    assert required <= set(tfvars), sorted(required - set(tfvars))
    assert set(tfvars) <= set(example.variables), sorted(set(tfvars) - set(example.variables))
