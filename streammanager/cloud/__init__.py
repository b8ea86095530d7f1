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
                                          agent_args=tuple(shlex.split(settings.local_agent_args)),
                                          zk_auth=settings.zk_auth)),
    }
    ec2 = _ec2_provider(settings)
    if ec2 is not None:
        providers["ec2"] = ec2
    if settings.gce_project:
        providers["gce"] = _gce_provider(settings)
    return providers


def _ec2_provider(settings) -> CloudProvider | None:
    """``SM_EC2_CREDENTIALS=instance-role``: AWS's credential chain (no keys may be set); ``static``: the
    keys, when set (both)."""
    keys = (settings.ec2_access_key, settings.ec2_secret_key)
    if settings.ec2_credentials == "instance-role":
        if any(keys):
            raise ProviderError("ec2 provider: SM_EC2_CREDENTIALS=instance-role takes no SM_EC2_ACCESS_KEY or "
                                "SM_EC2_SECRET_KEY (unset them, or use SM_EC2_CREDENTIALS=static)")
    elif not any(keys):
        return None
    elif not all(keys):
        raise ProviderError("ec2 provider: set both SM_EC2_ACCESS_KEY and SM_EC2_SECRET_KEY "
                            "(or SM_EC2_CREDENTIALS=instance-role)")
    from streammanager.cloud.ec2 import Ec2Provider

    return Ec2Provider(settings.ec2_access_key, settings.ec2_secret_key, settings.ec2_region,
                       endpoint=_endpoint(settings.ec2_endpoint))


def _gce_provider(settings) -> CloudProvider:
    """``SM_GCE_AUTH=metadata``: the VM's service account (no key may be set); ``service-account-key``: the
    account and its key file."""
    from streammanager.cloud.gce import GceProvider

    endpoint = _endpoint(settings.gce_endpoint)
    if settings.gce_auth == "metadata":
        if settings.gce_key_file:
            raise ProviderError("gce provider: SM_GCE_AUTH=metadata takes no SM_GCE_KEY_FILE (unset it, or use "
                                "SM_GCE_AUTH=service-account-key)")
        parsed = urlsplit(settings.gce_metadata_url or "")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ProviderError(f"gce provider: SM_GCE_METADATA_URL {settings.gce_metadata_url!r} must be an "
                                "http(s) URL")
        return GceProvider.with_metadata_auth(settings.gce_project, service_account=settings.gce_service_account,
                                              metadata_url=settings.gce_metadata_url, endpoint=endpoint)
    if not (settings.gce_service_account and settings.gce_key_file):
        raise ProviderError("gce provider: set SM_GCE_SERVICE_ACCOUNT and SM_GCE_KEY_FILE with SM_GCE_PROJECT "
                            "(or SM_GCE_AUTH=metadata on a GCE VM)")
    return GceProvider(settings.gce_service_account, settings.gce_key_file, settings.gce_project, endpoint=endpoint)


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
