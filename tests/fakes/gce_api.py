"""A small, stateful fake of the Google Compute Engine REST API (v1) and of Google's OAuth token endpoint.

It covers what libcloud's ``GCENodeDriver`` calls to create, list, read and delete instances: the zone,
machine type, disk type, network, subnetwork and image look-ups that ``create_node`` makes first,
instance insert/get/delete and the zone operations it polls, and the aggregated instance and disk lists
that ``list_nodes`` and ``ex_get_node`` read. Nothing else.

State: instances and their boot disks per (project, zone), operations per (project, zone). An insert
validates what GCE validates (name, machine type, image, disk type, network, subnetwork: it exists, is
in the zone's region and belongs to the network, service accounts: they exist and their scopes are
scope URLs, labels), creates the boot disk from ``initializeParams``, keeps labels, metadata, network
interfaces and service accounts as sent, and answers an operation that is done by the time it is polled;
a delete removes the instance and its auto-delete disks. Unknown resources are 404s in GCE's error
shape. Lists come in one page and take no ``filter`` (the driver sends neither for these calls).
Resource links are the real ``https://www.googleapis.com/...`` ones, which is what lets a client
pointed at this server follow them.

Auth: service accounts are registered with their public key. ``POST /o/oauth2/token`` takes a signed
JWT bearer assertion (RS256), checks its issuer, audience, expiry and signature, and issues an access
token; every Compute call needs a live one (401 otherwise). The server also plays the metadata server
of the VM a controller runs on: ``GET /computeMetadata/v1/instance/service-accounts/<account>/token``
(with ``Metadata-Flavor: Google``, else 403) issues a token for ``vm_account`` (404 when there is none,
as on a VM without a service account); ``<account>`` is ``default`` or that e-mail.

Run it with :meth:`FakeComputeApi.start` (a thread serving 127.0.0.1 on a free port) and ``stop()``.
"""
from __future__ import annotations

import base64
import itertools
import json
import re
import secrets
import threading
import time
import uuid
import zlib
from datetime import datetime, timezone

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

API_ROOT = "https://www.googleapis.com/compute/v1"
TOKEN_AUDIENCE = "https://accounts.google.com/o/oauth2/token"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")

DEFAULT_ZONES = ("us-central1-a", "us-central1-b", "europe-west1-b", "europe-west1-c", "asia-east1-a")
DEFAULT_MACHINE_TYPES = {"e2-micro": (2, 1024), "e2-small": (2, 2048), "e2-medium": (2, 4096),
                         "n2-standard-2": (2, 8192)}
DEFAULT_DISK_TYPES = ("pd-standard", "pd-balanced", "pd-ssd")
# project -> [(image name, family)]
DEFAULT_IMAGES = {"debian-cloud": [("debian-12-bookworm-v20240910", "debian-12"),
                                   ("debian-11-bullseye-v20240910", "debian-11")],
                  "ubuntu-os-cloud": [("ubuntu-2204-jammy-v20240904", "ubuntu-2204-lts")]}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _not_found(path: str) -> ApiError:
    return ApiError(404, "notFound", f"The resource '{path}' was not found")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _stable_id(value) -> str:
    return str(zlib.crc32(repr(value).encode()) + 10**12)


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):  # tests read ``FakeComputeApi.requests`` instead
        pass


class FakeComputeApi:
    """One fake Compute Engine (any number of projects) plus the OAuth token endpoint."""

    def __init__(self, service_accounts: dict[str, bytes] | None = None, zones=DEFAULT_ZONES,
                 machine_types=None, disk_types=DEFAULT_DISK_TYPES, images=None, networks=("default",),
                 subnetworks: dict[tuple[str, str], str] | None = None, instance_accounts=(),
                 vm_account: str | None = None, token_lifetime_s: int = 3600):
        self.service_accounts = dict(service_accounts or {})  # email -> public key PEM
        self.zones = tuple(zones)
        self.machine_types = dict(machine_types or DEFAULT_MACHINE_TYPES)
        self.disk_types = tuple(disk_types)
        self.images = {project: list(items) for project, items in (images or DEFAULT_IMAGES).items()}
        self.networks = tuple(networks)
        # (region, subnetwork name) -> its network; by default the "default" network's subnetwork per region
        self.subnetworks = dict(subnetworks if subnetworks is not None else
                                {(self._region_of(zone), "default"): "default" for zone in self.zones})
        # who instances may run as (besides "default", the project's default account)
        self.instance_accounts = set(instance_accounts) | set(self.service_accounts)
        self.vm_account = vm_account  # the metadata server's account; None: a VM without one
        self.token_lifetime_s = token_lifetime_s
        self.tokens: dict[str, tuple[str, float]] = {}  # access token -> (account, expiry epoch s)
        self.instances: dict[tuple[str, str], dict[str, dict]] = {}
        self.disks: dict[tuple[str, str], dict[str, dict]] = {}
        self.operations: dict[tuple[str, str], dict[str, dict]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call, for tests
        self._ids = itertools.count(int(time.time()) * 1000)
        self._addresses = itertools.count(2)
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        p = "/compute/v1/projects/<project>"
        self._routes = Map([
            Rule("/o/oauth2/token", methods=["POST"], endpoint="token"),
            Rule("/computeMetadata/v1/instance/service-accounts/<account>/token", methods=["GET"],
                 endpoint="metadata_token"),
            Rule(f"{p}/zones", methods=["GET"], endpoint="list_zones"),
            Rule(f"{p}/zones/<zone>", methods=["GET"], endpoint="get_zone"),
            Rule(f"{p}/zones/<zone>/machineTypes/<name>", methods=["GET"], endpoint="get_machine_type"),
            Rule(f"{p}/zones/<zone>/diskTypes/<name>", methods=["GET"], endpoint="get_disk_type"),
            Rule(f"{p}/global/networks/<name>", methods=["GET"], endpoint="get_network"),
            Rule(f"{p}/regions/<region>/subnetworks/<name>", methods=["GET"], endpoint="get_subnetwork"),
            Rule(f"{p}/global/images/<name>", methods=["GET"], endpoint="get_image"),
            Rule(f"{p}/global/images/family/<family>", methods=["GET"], endpoint="get_image_from_family"),
            Rule(f"{p}/zones/<zone>/instances", methods=["POST"], endpoint="insert_instance"),
            Rule(f"{p}/zones/<zone>/instances/<name>", methods=["GET"], endpoint="get_instance"),
            Rule(f"{p}/zones/<zone>/instances/<name>", methods=["DELETE"], endpoint="delete_instance"),
            Rule(f"{p}/zones/<zone>/disks/<name>", methods=["GET"], endpoint="get_disk"),
            Rule(f"{p}/zones/<zone>/operations/<name>", methods=["GET"], endpoint="get_operation"),
            Rule(f"{p}/aggregated/instances", methods=["GET"], endpoint="aggregated_instances"),
            Rule(f"{p}/aggregated/disks", methods=["GET"], endpoint="aggregated_disks"),
        ])

    # -- running -----------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeComputeApi:
        self._server = make_server(host, port, self.wsgi, threaded=True, request_handler=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-gce", daemon=True)
        self._thread.start()
        return self

    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def reset(self) -> None:
        """Forget instances, disks and operations (not accounts, nor issued tokens)."""
        with self._lock:
            self.instances.clear()
            self.disks.clear()
            self.operations.clear()
            self.requests.clear()

    # -- reading state (for tests) -----------------------------------------------------------------

    def instance(self, project: str, zone: str, name: str) -> dict | None:
        with self._lock:
            found = self.instances.get((project, zone), {}).get(name)
            return json.loads(json.dumps(found)) if found else None

    # -- WSGI --------------------------------------------------------------------------------------

    def wsgi(self, environ, start_response):
        request = Request(environ)
        with self._lock:
            self.requests.append((request.method, request.path))
        try:
            endpoint, args = self._routes.bind_to_environ(environ).match()
            if endpoint not in ("token", "metadata_token"):
                self._authorize(request)
            with self._lock:
                status, body = getattr(self, f"_{endpoint}")(request, **args)
        except ApiError as exc:
            status, body = exc.status, {"error": {"code": exc.status, "message": exc.message, "errors": [
                {"domain": "global", "reason": exc.reason, "message": exc.message}]}}
        except NotFound:
            exc = _not_found(request.path)
            status, body = 404, {"error": {"code": 404, "message": exc.message, "errors": [
                {"domain": "global", "reason": "notFound", "message": exc.message}]}}
        except MethodNotAllowed:
            status, body = 405, {"error": {"code": 405, "message": "Method not allowed", "errors": []}}
        except HTTPException as exc:
            status, body = exc.code, {"error": {"code": exc.code, "message": exc.description, "errors": []}}
        response = Response(json.dumps(body), status=status, content_type="application/json; charset=UTF-8")
        return response(environ, start_response)

    def _authorize(self, request: Request) -> None:
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        with self._lock:
            account, expiry = self.tokens.get(token, (None, 0.0))
        if account is None or expiry < time.time():
            raise ApiError(401, "authError", "Request had invalid authentication credentials.")

    # -- OAuth -------------------------------------------------------------------------------------

    def _token(self, request: Request):
        if request.form.get("grant_type") != JWT_GRANT:
            return 400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}
        try:
            header_b64, claims_b64, signature_b64 = request.form.get("assertion", "").split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(signature_b64)
        except ValueError:
            return 400, {"error": "invalid_grant", "error_description": "Malformed JWT assertion"}
        public_pem = self.service_accounts.get(claims.get("iss"))
        if header.get("alg") != "RS256" or public_pem is None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT issuer or algorithm"}
        if claims.get("aud") != TOKEN_AUDIENCE or claims.get("exp", 0) < time.time():
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT audience or expiry"}
        key = serialization.load_pem_public_key(public_pem)
        try:
            key.verify(signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.tokens[token] = (claims["iss"], time.time() + self.token_lifetime_s)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s}

    def _metadata_token(self, request: Request, account: str):
        if request.headers.get("Metadata-Flavor") != "Google":
            return 403, {"error": "Missing required header: Metadata-Flavor: Google"}
        if self.vm_account is None or account not in ("default", self.vm_account):
            raise _not_found(f"instance/service-accounts/{account}/token")
        token = "ya29.fake-vm-" + secrets.token_urlsafe(24)
        self.tokens[token] = (self.vm_account, time.time() + self.token_lifetime_s)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s}

    # -- catalogue ---------------------------------------------------------------------------------

    def _zone_or_404(self, project: str, zone: str) -> None:
        if zone not in self.zones:
            raise _not_found(f"projects/{project}/zones/{zone}")

    @staticmethod
    def _region_of(zone: str) -> str:
        return zone.rsplit("-", 1)[0]

    def _zone_body(self, project: str, zone: str) -> dict:
        return {"kind": "compute#zone", "id": _stable_id(zone), "name": zone, "status": "UP",
                "description": zone, "creationTimestamp": "2020-01-01T00:00:00.000-00:00",
                "region": f"{API_ROOT}/projects/{project}/regions/{self._region_of(zone)}",
                "selfLink": f"{API_ROOT}/projects/{project}/zones/{zone}"}

    def _list_zones(self, request, project):
        return 200, {"kind": "compute#zoneList", "items": [self._zone_body(project, z) for z in self.zones],
                     "selfLink": f"{API_ROOT}/projects/{project}/zones"}

    def _get_zone(self, request, project, zone):
        self._zone_or_404(project, zone)
        return 200, self._zone_body(project, zone)

    def _get_machine_type(self, request, project, zone, name):
        self._zone_or_404(project, zone)
        if name not in self.machine_types:
            raise _not_found(f"projects/{project}/zones/{zone}/machineTypes/{name}")
        cpus, memory_mb = self.machine_types[name]
        return 200, {"kind": "compute#machineType", "id": _stable_id(name), "name": name,
                     "guestCpus": cpus, "memoryMb": memory_mb, "zone": zone, "description": name,
                     "selfLink": f"{API_ROOT}/projects/{project}/zones/{zone}/machineTypes/{name}"}

    def _get_disk_type(self, request, project, zone, name):
        self._zone_or_404(project, zone)
        if name not in self.disk_types:
            raise _not_found(f"projects/{project}/zones/{zone}/diskTypes/{name}")
        return 200, {"kind": "compute#diskType", "name": name, "validDiskSize": "10GB-65536GB",
                     "defaultDiskSizeGb": "500", "zone": f"{API_ROOT}/projects/{project}/zones/{zone}",
                     "selfLink": f"{API_ROOT}/projects/{project}/zones/{zone}/diskTypes/{name}"}

    def _get_network(self, request, project, name):
        if name not in self.networks:
            raise _not_found(f"projects/{project}/global/networks/{name}")
        return 200, {"kind": "compute#network", "id": _stable_id(name), "name": name,
                     "autoCreateSubnetworks": True, "subnetworks": [],
                     "selfLink": f"{API_ROOT}/projects/{project}/global/networks/{name}"}

    def _get_subnetwork(self, request, project, region, name):
        network = self.subnetworks.get((region, name))
        if network is None:
            raise _not_found(f"projects/{project}/regions/{region}/subnetworks/{name}")
        return 200, {"kind": "compute#subnetwork", "id": _stable_id((region, name)), "name": name,
                     "ipCidrRange": "10.128.0.0/20", "gatewayAddress": "10.128.0.1",
                     "network": f"{API_ROOT}/projects/{project}/global/networks/{network}",
                     "region": f"{API_ROOT}/projects/{project}/regions/{region}",
                     "selfLink": f"{API_ROOT}/projects/{project}/regions/{region}/subnetworks/{name}"}

    def _check_subnetwork(self, project: str, zone: str, network: str, link: str, field: str) -> str:
        """The subnetwork link of an interface, checked as GCE checks it: it exists, it is in the zone's
        region and it belongs to the interface's network."""
        match = re.fullmatch(r"(?:.*/compute/v1/)?projects/([^/]+)/regions/([^/]+)/subnetworks/([^/]+)", link)
        if not match:
            raise ApiError(400, "invalid", f"Invalid value for field '{field}': '{link}'.")
        subnet_project, region, name = match.groups()
        _, body = self._get_subnetwork(None, subnet_project, region, name)
        if region != self._region_of(zone):
            raise ApiError(400, "invalid", f"Invalid value for field '{field}': '{link}'. Subnetwork must be in "
                                           f"the same region as the instance ({self._region_of(zone)}).")
        if body["network"].rsplit("/", 1)[-1] != network:
            raise ApiError(400, "invalid", f"Invalid value for field '{field}': '{link}'. Subnetwork does not "
                                           f"belong to network '{network}'.")
        return body["selfLink"]

    def _check_service_accounts(self, project: str, accounts) -> list[dict]:
        checked = []
        for index, account in enumerate(accounts or []):
            email = account.get("email", "")
            if email != "default" and email not in self.instance_accounts:
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.serviceAccounts[{index}].email':"
                                               f" '{email}'. The resource 'projects/{project}/serviceAccounts/"
                                               f"{email}' was not found")
            scopes = account.get("scopes") or []
            bad = [scope for scope in scopes if not str(scope).startswith("https://www.googleapis.com/auth/")]
            if bad:
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.serviceAccounts[{index}].scopes"
                                               f"': '{bad[0]}'.")
            checked.append({"email": email, "scopes": list(scopes)})
        return checked

    def _image_body(self, project: str, name: str, family: str) -> dict:
        return {"kind": "compute#image", "id": _stable_id((project, name)), "name": name,
                "family": family, "status": "READY", "diskSizeGb": "10", "sourceType": "RAW",
                "creationTimestamp": "2024-09-10T00:00:00.000-07:00",
                "selfLink": f"{API_ROOT}/projects/{project}/global/images/{name}"}

    def _get_image(self, request, project, name):
        for image_name, family in self.images.get(project, []):
            if image_name == name:
                return 200, self._image_body(project, image_name, family)
        raise _not_found(f"projects/{project}/global/images/{name}")

    def _get_image_from_family(self, request, project, family):
        for image_name, image_family in self.images.get(project, []):
            if image_family == family:
                return 200, self._image_body(project, image_name, image_family)
        raise _not_found(f"projects/{project}/global/images/family/{family}")

    def _resolve_image(self, link: str) -> dict:
        """An image body from a sourceImage link (full URL or 'projects/...' path)."""
        path = link.split("/compute/v1/", 1)[-1]
        match = re.fullmatch(r"projects/([^/]+)/global/images/(family/)?([^/]+)", path)
        if not match:
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.disks[0].initializeParams"
                                           f".sourceImage': '{link}'.")
        project, is_family, name = match.groups()
        _, body = (self._get_image_from_family(None, project, name) if is_family
                   else self._get_image(None, project, name))
        return body

    # -- instances ---------------------------------------------------------------------------------

    def _operation(self, project: str, zone: str, kind: str, target: dict) -> dict:
        name = f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        now = _now()
        operation = {"kind": "compute#operation", "id": str(next(self._ids)), "name": name,
                     "zone": f"{API_ROOT}/projects/{project}/zones/{zone}", "operationType": kind,
                     "targetLink": target["selfLink"], "targetId": target["id"], "status": "DONE",
                     "user": "fake@example.com", "progress": 100, "insertTime": now, "startTime": now,
                     "endTime": now, "selfLink": f"{API_ROOT}/projects/{project}/zones/{zone}/operations/{name}"}
        self.operations.setdefault((project, zone), {})[name] = operation
        # the answer to the call itself is the operation as it was when accepted; a poll finds it done
        return {**operation, "status": "RUNNING", "progress": 0, "endTime": None}

    def _get_operation(self, request, project, zone, name):
        self._zone_or_404(project, zone)
        operation = self.operations.get((project, zone), {}).get(name)
        if operation is None:
            raise _not_found(f"projects/{project}/zones/{zone}/operations/{name}")
        return 200, operation

    def _insert_instance(self, request, project, zone):
        self._zone_or_404(project, zone)
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            raise ApiError(400, "parseError", "Parse Error")
        name = body.get("name", "")
        if not NAME.match(name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'. Must be a "
                                           f"match of regex '(?:[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?)'")
        if name in self.instances.get((project, zone), {}):
            raise ApiError(409, "alreadyExists",
                           f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists")
        machine_type = str(body.get("machineType", "")).rsplit("/", 1)[-1]
        self._get_machine_type(request, project, zone, machine_type)
        labels = body.get("labels") or {}
        for key, value in labels.items():
            if not LABEL_KEY.match(key) or not isinstance(value, str) or not LABEL_VALUE.match(value):
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.labels': '{key}'")
        service_accounts = self._check_service_accounts(project, body.get("serviceAccounts"))
        interfaces = []
        for index, nic in enumerate(body.get("networkInterfaces") or [{"network": "default"}]):
            network = str(nic.get("network", "default")).rsplit("/", 1)[-1]
            self._get_network(request, project, network)
            interface = {"kind": "compute#networkInterface", "name": f"nic{index}",
                         "network": f"{API_ROOT}/projects/{project}/global/networks/{network}",
                         "networkIP": f"10.128.0.{next(self._addresses) % 250 + 2}"}
            if nic.get("subnetwork"):
                interface["subnetwork"] = self._check_subnetwork(
                    project, zone, network, str(nic["subnetwork"]),
                    f"resource.networkInterfaces[{index}].subnetwork")
            if "accessConfigs" in nic:  # TEST-NET-1 documentation addresses: never routed
                interface["accessConfigs"] = [{"kind": "compute#accessConfig", "type": "ONE_TO_ONE_NAT",
                                               "name": config.get("name", "External NAT"),
                                               "natIP": f"192.0.2.{next(self._addresses) % 250 + 2}"}
                                              for config in nic["accessConfigs"]]
            interfaces.append(interface)
        instance_id = str(next(self._ids))
        instance_link = f"{API_ROOT}/projects/{project}/zones/{zone}/instances/{name}"
        attached, new_disks = [], []
        for index, disk in enumerate(body.get("disks") or []):
            params = disk.get("initializeParams")
            if params is None:
                raise ApiError(400, "invalid", "Attaching existing disks is not supported by this fake")
            image = self._resolve_image(params.get("sourceImage", ""))
            disk_type = str(params.get("diskType", "pd-standard")).rsplit("/", 1)[-1]
            self._get_disk_type(request, project, zone, disk_type)
            disk_name = params.get("diskName") or name
            if disk_name in self.disks.get((project, zone), {}):
                raise ApiError(409, "alreadyExists",
                               f"The resource 'projects/{project}/zones/{zone}/disks/{disk_name}' already exists")
            disk_link = f"{API_ROOT}/projects/{project}/zones/{zone}/disks/{disk_name}"
            new_disks.append({
                "kind": "compute#disk", "id": str(next(self._ids)), "name": disk_name,
                "sizeGb": str(params.get("diskSizeGb") or image["diskSizeGb"]), "status": "READY",
                "zone": f"{API_ROOT}/projects/{project}/zones/{zone}", "creationTimestamp": _now(),
                "sourceImage": image["selfLink"], "sourceImageId": image["id"],
                "type": f"{API_ROOT}/projects/{project}/zones/{zone}/diskTypes/{disk_type}",
                "users": [instance_link], "selfLink": disk_link})
            attached.append({"kind": "compute#attachedDisk", "type": disk.get("type", "PERSISTENT"),
                             "mode": disk.get("mode", "READ_WRITE"), "source": disk_link,
                             "deviceName": disk.get("deviceName", disk_name), "index": index,
                             "boot": bool(disk.get("boot", index == 0)),
                             "autoDelete": bool(disk.get("autoDelete", False)), "interface": "SCSI"})
        if not attached:
            raise ApiError(400, "invalid", "Invalid value for field 'resource.disks': ''. No boot disk")
        metadata = body.get("metadata") or {}
        instance = {
            "kind": "compute#instance", "id": instance_id, "name": name, "creationTimestamp": _now(),
            "description": body.get("description", ""), "status": "RUNNING",
            "machineType": f"{API_ROOT}/projects/{project}/zones/{zone}/machineTypes/{machine_type}",
            "zone": f"{API_ROOT}/projects/{project}/zones/{zone}", "canIpForward": bool(body.get("canIpForward")),
            "networkInterfaces": interfaces, "disks": attached,
            "metadata": {"kind": "compute#metadata", "fingerprint": secrets.token_urlsafe(8),
                         "items": metadata.get("items", [])},
            "tags": {"fingerprint": secrets.token_urlsafe(8), **({"items": body["tags"]["items"]}
                                                                 if body.get("tags", {}).get("items") else {})},
            "labels": labels, "labelFingerprint": secrets.token_urlsafe(8),
            "serviceAccounts": service_accounts, "scheduling": body.get("scheduling", {}),
            "selfLink": instance_link,
        }
        self.instances.setdefault((project, zone), {})[name] = instance
        for disk in new_disks:
            self.disks.setdefault((project, zone), {})[disk["name"]] = disk
        return 200, self._operation(project, zone, "insert", instance)

    def _instance_or_404(self, project, zone, name) -> dict:
        self._zone_or_404(project, zone)
        instance = self.instances.get((project, zone), {}).get(name)
        if instance is None:
            raise _not_found(f"projects/{project}/zones/{zone}/instances/{name}")
        return instance

    def _get_instance(self, request, project, zone, name):
        return 200, self._instance_or_404(project, zone, name)

    def _delete_instance(self, request, project, zone, name):
        instance = self._instance_or_404(project, zone, name)
        del self.instances[(project, zone)][name]
        zone_disks = self.disks.get((project, zone), {})
        for attached in instance["disks"]:
            disk_name = attached["source"].rsplit("/", 1)[-1]
            disk = zone_disks.get(disk_name)
            if disk is None:
                continue
            if attached["autoDelete"]:
                del zone_disks[disk_name]
            else:
                disk["users"] = [u for u in disk["users"] if u != instance["selfLink"]]
        return 200, self._operation(project, zone, "delete", instance)

    def _get_disk(self, request, project, zone, name):
        self._zone_or_404(project, zone)
        disk = self.disks.get((project, zone), {}).get(name)
        if disk is None:
            raise _not_found(f"projects/{project}/zones/{zone}/disks/{name}")
        return 200, disk

    def _aggregated(self, store: dict, project: str, kind: str, key: str) -> dict:
        items = {}
        for zone in self.zones:
            resources = list(store.get((project, zone), {}).values())
            items[f"zones/{zone}"] = ({key: resources} if resources else {"warning": {
                "code": "NO_RESULTS_ON_PAGE", "message": "There are no results for scope "
                                                         f"'zones/{zone}' on this page.",
                "data": [{"key": "scope", "value": f"zones/{zone}"}]}})
        return {"kind": kind, "id": f"projects/{project}/aggregated/{key}", "items": items,
                "selfLink": f"{API_ROOT}/projects/{project}/aggregated/{key}"}

    def _aggregated_instances(self, request, project):
        return 200, self._aggregated(self.instances, project, "compute#instanceAggregatedList", "instances")

    def _aggregated_disks(self, request, project):
        return 200, self._aggregated(self.disks, project, "compute#diskAggregatedList", "disks")
