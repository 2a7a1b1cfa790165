"""Drift between the code and infra/main.bicep: every setting the app reads is deployed (or
documented as optional), secrets travel only as Key Vault references to secrets the template
creates, deployed defaults equal the code's, and the storage names match shared/names.py."""

from __future__ import annotations

import copy
import re

import azure.functions as func
import pytest
from pydantic import AliasChoices, Field

from shared import names as storage_names
from shared.config import Settings
from tests.infra import bicep_model as bm

# Settings the code reads that main.bicep deliberately does not set, each with its reason.
OPTIONAL_SETTINGS = {
    "AzureWebJobsStorage": "connection string for local development (Azurite); in Azure the identity-based "
                           "AzureWebJobsStorage__* settings replace it and shared keys are disabled",
    "TELEMETRY_EXPORTER": "console/OTLP export for local runs; in Azure metrics and traces go to Application Insights",
}

# Names that hold credentials: in Azure they must be Key Vault references.
SECRET_NAME = re.compile(r"(SECRET|_TOKEN|_KEY|CERTIFICATE)$|SECRET_")


def _bicep_settings() -> dict:
    return bm.app_settings()


def _drift(settings_cls: type = Settings, app=None) -> set[str]:
    expressions, connections = bm.settings_read_by_host(app)
    read = bm.settings_read_by_code(settings_cls) | expressions
    return bm.missing_settings(read, connections, set(_bicep_settings()), set(OPTIONAL_SETTINGS))


def test_every_setting_the_app_reads_is_deployed_or_documented_optional():
    missing = _drift()
    assert not missing, (f"settings read by the app but not set by infra/main.bicep: {sorted(missing)}; "
                         "add them to var appSettings (or to OPTIONAL_SETTINGS with a reason)")


def test_optional_list_is_current():
    read = bm.settings_read_by_code()
    assert set(OPTIONAL_SETTINGS) <= read, "OPTIONAL_SETTINGS names a setting the code no longer reads"
    assert not set(OPTIONAL_SETTINGS) & set(_bicep_settings()), "a setting is both deployed and 'optional'"


def test_drift_check_reports_a_new_setting_in_code():
    class Extended(Settings):
        brand_new: str | None = Field(default=None, validation_alias=AliasChoices("BRAND_NEW_SETTING"))

    assert _drift(Extended) == _drift() | {"BRAND_NEW_SETTING"}


def test_drift_check_reports_new_host_level_settings():
    app = func.FunctionApp()

    @app.timer_trigger(arg_name="timer", schedule="%BRAND_NEW_SCHEDULE%")
    def timer_fn(timer: func.TimerRequest) -> None:  # pragma: no cover - never invoked
        return None

    @app.queue_trigger(arg_name="msg", queue_name="q", connection="OtherStorage")
    def queue_fn(msg: func.QueueMessage) -> None:  # pragma: no cover - never invoked
        return None

    assert _drift(app=app) - _drift(Settings) == {"BRAND_NEW_SCHEDULE", "OtherStorage"}


def test_host_level_settings_are_collected_from_the_indexed_app():
    expressions, connections = bm.settings_read_by_host()
    assert "PRESENCE_SWEEP_SCHEDULE" in expressions
    assert connections == {"AzureWebJobsStorage"}


def test_sweep_schedule_defaults_to_every_30_seconds():
    assert _bicep_settings()["PRESENCE_SWEEP_SCHEDULE"] == "presenceSweepSchedule"
    assert bm.parameter_default("presenceSweepSchedule") == "*/30 * * * * *"


def test_identity_based_storage_and_telemetry():
    settings = _bicep_settings()
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    for name in ("AzureWebJobsStorage__accountName", "AzureWebJobsStorage__clientId",
                 "APPLICATIONINSIGHTS_CONNECTION_STRING"):
        assert name in settings
    assert "AzureWebJobsStorage" not in settings, "no connection string in Azure: shared keys are off"
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == \
        "ClientId=${identity.outputs.clientId};Authorization=AAD"
    # Flex Consumption rejects these as app settings (runtime lives in functionAppConfig).
    assert not {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION"} & set(settings)


def test_managed_identity_is_the_entra_credential():
    settings = _bicep_settings()
    assert settings["ENTRA_USE_MANAGED_IDENTITY"] == {"operator": {"type": "conditional", "operands": {
        "condition": {"operator": {"type": "or", "operands": {"operand_1": "createEntraApp",
                                                              "operand_2": "entraUseManagedIdentity"}}},
        "true_value": "true", "false_value": "false"}}}
    assert repr(settings["ENTRA_MANAGED_IDENTITY_CLIENT_ID"]) == repr(settings["AzureWebJobsStorage__clientId"])


def test_every_key_vault_reference_points_to_a_secret_the_template_creates():
    assert bm.key_vault_reference_problems() == []
    refs = bm.key_vault_references()
    # Each created secret is used by some setting, and the module really writes them.
    assert {name for _, name in refs.values()} == bm.key_vault_secret_names()
    vault = bm.parse(bm.INFRA / "modules" / "keyvault.bicep")
    secrets = [r for r in vault["resources"].values() if r["type"] == "Microsoft.KeyVault/vaults/secrets"]
    assert len(secrets) == 1
    assert secrets[0]["config"]["loop_type"]["detail"]["array_name"] == {
        "function": {"type": "items", "parameters": {"arg_1": "secrets"}}}


def test_key_vault_check_reports_a_dangling_reference():
    template = copy.deepcopy(bm.parse(bm.MAIN))
    original = template["variables"]["appSettings"]["value"]
    template["variables"]["appSettings"]["value"] = {"function": {"type": "union", "parameters": {
        "arg_1": original,
        "arg_2": {"NEW_SECRET": "@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/not-created/)"},
    }}}
    assert bm.key_vault_reference_problems(template) == [
        "NEW_SECRET: secret 'not-created' is not created by the template"]


def test_secrets_reach_the_app_only_as_key_vault_references():
    settings = _bicep_settings()
    refs = bm.key_vault_references()
    for name in settings:
        if SECRET_NAME.search(name):
            assert name in refs, f"{name} looks like a credential but is not a Key Vault reference"
    secure = bm.secure_parameters()
    for name, value in settings.items():
        for text in bm.strings(value):
            assert text not in secure, f"{name} carries the secure parameter {text} in clear"
            assert not any(f"${{{param}}}" in text for param in secure), f"{name} interpolates a secret"
    outputs = bm.parse(bm.MAIN)["outputs"]
    for name, output in outputs.items():
        assert not any(param in repr(output.get("value")) for param in secure), f"output {name} leaks a secret"


def _deployed_literal(value, template) -> str | None:
    """The literal a setting deploys by default, following a parameter to its default."""
    if not isinstance(value, str) or "${" in value:
        return None
    if bm.is_reference(value):
        default = template["parameters"].get(value, {}).get("default")
        return default if isinstance(default, str) and not bm.is_reference(default) else None
    return value


def _same(default, text: str) -> bool:
    if isinstance(default, bool):
        return text == str(default).lower()
    if isinstance(default, int | float):
        return float(text) == float(default)
    return text == default


def test_deployed_defaults_equal_the_code_defaults():
    template = bm.parse(bm.MAIN)
    settings = _bicep_settings()
    compared = 0
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        for name in alias.choices if isinstance(alias, AliasChoices) else [alias]:
            if name not in settings or field.default is None:
                continue
            literal = _deployed_literal(settings[name], template)
            if literal is None:
                continue
            compared += 1
            assert _same(field.default, literal), \
                f"{name}: main.bicep deploys {literal!r}, the code defaults to {field.default!r}"
    assert compared >= 20


def test_tables_and_queues_match_shared_names():
    template = bm.parse(bm.MAIN)
    constants = {k: v for k, v in vars(storage_names).items() if k.isupper() and isinstance(v, str)}
    queues = {v for k, v in constants.items() if k.endswith("_QUEUE")}
    tables = {v for k, v in constants.items() if k.endswith("_TABLE")}
    assert set(template["variables"]["queueNames"]["value"]) == queues
    assert set(template["variables"]["tableNames"]["value"]) == tables
    params = template["modules"]["storage"]["config"]["params"]
    assert params["queueNames"] == "queueNames" and params["tableNames"] == "tableNames"


def test_every_queue_gets_its_poison_twin():
    storage = bm.parse(bm.INFRA / "modules" / "storage.bicep")
    queue_loops = [r["config"] for r in storage["resources"].values()
                   if r["type"] == "Microsoft.Storage/storageAccounts/queueServices/queues"]
    names = {(c["loop_type"]["detail"]["array_name"], c["config"]["name"]) for c in queue_loops}
    assert names == {("queueNames", "queueName"), ("queueNames", "${queueName}-poison")}


@pytest.mark.parametrize("output,route", [
    ("zoomWebhookUrl", "zoom/webhook"),
    ("graphNotificationUrl", "graph/notifications"),
    ("graphLifecycleUrl", "graph/lifecycle"),
    ("healthUrl", "health"),
    ("manageApiBaseUrl", "manage"),
    ("microsoftConnectRedirectUri", "connect/microsoft/callback"),
    ("zoomConnectRedirectUri", "connect/zoom/callback"),
])
def test_output_urls_are_routes_of_the_app(output, route):
    assert bm.parse(bm.MAIN)["outputs"][output]["value"] == f"${{publicBase}}/api/{route}"
    assert route in bm.http_routes()


def test_entra_app_is_optional_and_registers_the_microsoft_callback():
    module = bm.parse(bm.MAIN)["modules"]["entraApp"]["config"]
    assert module["condition"] == "createEntraApp"
    assert module["config"]["params"]["redirectUris"] == ["${publicBase}/api/connect/microsoft/callback"]
