"""Cloud providers, all through apache-libcloud: ``local`` (our own driver), ``ec2`` and ``gce``."""
from __future__ import annotations

import shlex
from urllib.parse import urlsplit

from libcloud.compute.providers import set_driver

from streammanager.cloud.base import CloudProvider, ProviderError

LOCAL_DRIVER = "sm-local"

try:  # libcloud loads drivers lazily by name; ours is registered under its own
    set_driver(LOCAL_DRIVER, "streammanager.cloud.local", "LocalNodeDriver")
except AttributeError:  # already registered in this process
    pass


def build_providers(settings) -> dict[str, CloudProvider]:
    """The providers this controller can use: ``local`` always; ``ec2`` and ``gce`` when configured."""
    from libcloud.compute.providers import get_driver

    from streammanager.cloud.local import LocalProvider

    driver_cls = get_driver(LOCAL_DRIVER)
    providers: dict[str, CloudProvider] = {
        "local": LocalProvider(driver_cls(settings.local_state_dir, settings.zk_hosts, settings.zk_root,
                                          pool=settings.local_pool, http_port=settings.local_http_port,
                                          agent_args=tuple(shlex.split(settings.local_agent_args)))),
    }
    if settings.ec2_access_key and settings.ec2_secret_key:
        from streammanager.cloud.ec2 import Ec2Provider

        providers["ec2"] = Ec2Provider(settings.ec2_access_key, settings.ec2_secret_key, settings.ec2_region,
                                       endpoint=_endpoint(settings.ec2_endpoint))
    if settings.gce_project:
        from streammanager.cloud.gce import GceProvider

        if not (settings.gce_service_account and settings.gce_key_file):
            raise ProviderError("gce provider: set SM_GCE_SERVICE_ACCOUNT and SM_GCE_KEY_FILE with SM_GCE_PROJECT")
        providers["gce"] = GceProvider(settings.gce_service_account, settings.gce_key_file, settings.gce_project,
                                       endpoint=_endpoint(settings.gce_endpoint))
    return providers


__all__ = ["CloudProvider", "ProviderError", "build_providers"]


def _endpoint(url: str | None) -> tuple[str, int, bool] | None:
    """``http://127.0.0.1:5000`` -> (host, port, secure), for a local stand-in of a cloud API."""
    if not url:
        return None
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ProviderError(f"endpoint {url!r} must be an http(s) URL")
    secure = parsed.scheme == "https"
    return parsed.hostname, parsed.port or (443 if secure else 80), secure
