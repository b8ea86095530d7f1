"""The coordinator's settings: the specification's variable names, auth headers, secrets kept secret."""
import argparse

import pytest

from node_agent.cli import build_parser as agent_parser
from node_agent.config import AgentSettings
from streammanager.cli import build_parser as sm_parser
from streammanager.config import ConfigError, ControllerSettings, ServerSettings
from streammanager.coordinator_config import HttpAuth, key_verification_from
from tests.coordinator_helpers import basic

SECRETS = {"KEY_VERIFICATION_PASSWORD": "kv-pass-123", "KEY_VERIFICATION_AUTH_TOKEN": "kv-token-456",
           "KEY_VERIFICATION_AUTH_CUSTOM": "ApiKey kv-custom-789", "EVENT_CALLBACK_PASSWORD": "ev-pass-123",
           "EVENT_CALLBACK_AUTH_TOKEN": "ev-token-456", "COMMANDS_API_AUTH_PASSWORD": "cmd-pass-123",
           "COMMANDS_API_AUTH_TOKEN": "cmd-token-456", "SM_ACCESS_TOKEN": "admin-token-789",
           "SM_EC2_ACCESS_KEY": "AKIAEXAMPLE000", "SM_EC2_SECRET_KEY": "ec2-secret-000"}


def test_each_auth_method_sends_the_authorization_header_the_specification_names():
    assert HttpAuth("Basic", user="app", password="pw").header() == basic("app", "pw")
    assert HttpAuth("Bearer", token="t0k").header() == "Bearer t0k"
    assert HttpAuth("Custom", custom="ApiKey abc").header() == "ApiKey abc"
    assert HttpAuth().header() is None


def test_the_agent_reads_the_key_verification_variables_by_their_exact_names():
    settings = AgentSettings.from_env({"AGENT_ROLE": "origin", "AGENT_REGION": "us-east-1",
                                       "KEY_VERIFICATION_URL": "http://127.0.0.1:9/verify",
                                       "KEY_VERIFICATION_AUTH": "basic", "KEY_VERIFICATION_AUTH_USER": "app",
                                       "KEY_VERIFICATION_PASSWORD": "pw", "SM_MEDIA_ROOT": "/srv/media"})
    assert settings.key_verification.url == "http://127.0.0.1:9/verify"
    assert settings.key_verification.auth.header() == basic("app", "pw")
    assert settings.media_root == "/srv/media"


def test_command_line_options_override_the_environment():
    args = agent_parser().parse_args(["--role", "origin", "--region", "r", "--key-verification-url",
                                      "http://127.0.0.1:9/a", "--key-verification-auth", "Bearer",
                                      "--key-verification-auth-token", "cli-token"])
    settings = AgentSettings.from_env({"KEY_VERIFICATION_URL": "http://127.0.0.1:9/env"}, args)
    assert settings.key_verification.url == "http://127.0.0.1:9/a"
    assert settings.key_verification.auth.header() == "Bearer cli-token"


@pytest.mark.parametrize("env, message", [
    ({"KEY_VERIFICATION_AUTH": "Basic", "KEY_VERIFICATION_AUTH_USER": "u"}, "KEY_VERIFICATION_PASSWORD"),
    ({"KEY_VERIFICATION_AUTH": "Bearer"}, "KEY_VERIFICATION_AUTH_TOKEN"),
    ({"KEY_VERIFICATION_AUTH": "Custom"}, "KEY_VERIFICATION_AUTH_CUSTOM"),
    ({"KEY_VERIFICATION_AUTH": "Digest"}, "KEY_VERIFICATION_AUTH"),
    ({"KEY_VERIFICATION_URL": "ftp://x/y"}, "KEY_VERIFICATION_URL"),
])
def test_incomplete_or_bad_key_verification_settings_fail_at_start_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        key_verification_from(argparse.Namespace(), env)


def test_the_commands_api_takes_only_basic_or_bearer():
    with pytest.raises(ConfigError, match="COMMANDS_API_AUTH"):
        ServerSettings.from_env({"COMMANDS_API_AUTH": "Custom"})
    settings = ServerSettings.from_env({"COMMANDS_API_AUTH": "Bearer", "COMMANDS_API_AUTH_TOKEN": "t"})
    assert settings.commands_auth.accepts("Bearer t") and settings.commands_auth.accepts("bearer t")
    assert not settings.commands_auth.accepts("Bearer x") and not settings.commands_auth.accepts(None)


def test_the_controller_reads_the_event_callback_variables():
    settings = ControllerSettings.from_env({"EVENT_CALLBACK_URL": "http://127.0.0.1:9/ev",
                                            "EVENT_CALLBACK_AUTH": "Custom",
                                            "EVENT_CALLBACK_AUTH_CUSTOM": "Token abc"})
    assert settings.event_callback.target.url == "http://127.0.0.1:9/ev"
    assert settings.event_callback.target.headers() == {"Authorization": "Token abc"}
    assert not ControllerSettings.from_env({}).event_callback.target.enabled


def test_secrets_appear_neither_in_help_nor_in_settings_reprs():
    env = {**SECRETS, "KEY_VERIFICATION_AUTH": "Bearer", "EVENT_CALLBACK_AUTH": "Bearer",
           "COMMANDS_API_AUTH": "Bearer", "AGENT_ROLE": "origin", "AGENT_REGION": "r"}
    texts = [agent_parser().format_help(), sm_parser().format_help(),
             repr(AgentSettings.from_env(env)), repr(ServerSettings.from_env(env)),
             repr(ControllerSettings.from_env(env))]
    for sub in ("serve", "controller"):
        texts.append(sm_parser()._subparsers._group_actions[0].choices[sub].format_help())
    for text in texts:
        for secret in SECRETS.values():
            assert secret not in text
    with pytest.raises(ConfigError) as failure:
        key_verification_from(argparse.Namespace(key_verification_auth_token=None),
                              {"KEY_VERIFICATION_AUTH": "Basic", "KEY_VERIFICATION_PASSWORD": "kv-pass-123"})
    assert "kv-pass-123" not in str(failure.value)


def test_a_bad_url_is_named_in_the_error_without_its_credentials():
    with pytest.raises(ConfigError) as refused:
        key_verification_from(argparse.Namespace(), {"KEY_VERIFICATION_URL": "ftp://user:zzSECRETzz@x/y"})
    assert "KEY_VERIFICATION_URL" in str(refused.value) and "ftp://(hidden)@x/y" in str(refused.value)
    assert "zzSECRETzz" not in str(refused.value) and "user" not in str(refused.value)
