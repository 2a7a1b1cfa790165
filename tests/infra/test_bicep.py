"""infra/*.bicep parse offline (pycep-parser), follow the module conventions, and keep the
security properties the deployment promises; main.bicepparam matches main.bicep."""

from __future__ import annotations

import re

import pytest

from tests.infra import bicep_model as bm

FILES = bm.bicep_files()


def _resources(name: str) -> dict:
    return bm.parse(bm.INFRA / "modules" / name)["resources"]


def _by_type(name: str, resource_type: str) -> dict:
    matches = [r for r in _resources(name).values() if r["type"] == resource_type]
    assert len(matches) == 1, f"{name}: expected one {resource_type}"
    return matches[0]["config"]


def test_the_infra_folder_holds_main_and_its_modules():
    names = {p.relative_to(bm.INFRA).as_posix() for p in FILES}
    assert "main.bicep" in names
    assert {"modules/storage.bicep", "modules/keyvault.bicep", "modules/function-app.bicep",
            "modules/entra-app.bicep"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(bm.INFRA).as_posix())
def test_every_bicep_file_parses(path):
    template = bm.parse(path)
    assert template["globals"]["scope"]["value"] == "resourceGroup"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(bm.INFRA).as_posix())
def test_every_parameter_and_output_is_described(path):
    template = bm.parse(path)
    for kind in ("parameters", "outputs"):
        for name, spec in template.get(kind, {}).items():
            assert any(d.get("type") == "description" and d.get("argument") for d in spec.get("decorators", [])), \
                f"{path.name}: {kind[:-1]} {name} has no @description"
    for name, spec in template.get("parameters", {}).items():
        assert name[0].islower() and "_" not in name, f"{path.name}: parameter {name} is not lowerCamel"
        if any(d.get("type") == "secure" for d in spec.get("decorators", [])):
            assert spec.get("default") in (None, ""), f"{path.name}: secure parameter {name} has a default value"


def test_modules_referenced_by_main_exist_and_use_no_registry():
    for name, module in bm.parse(bm.MAIN)["modules"].items():
        assert module["type"] == "local", f"module {name} must be a local file (no registry modules offline)"
        assert (bm.INFRA / module["detail"]["path"]).is_file()


# Modules whose resources are not Azure resources: no resource group or location to report.
NOT_ARM = {"modules/entra-app.bicep": "Microsoft Graph resources (Entra ID objects) live in the tenant"}
MODULES = [p for p in FILES if p.parent.name == "modules"]


def _accessor(value) -> tuple[str, str] | None:
    """(resource, property) of an output value written as ``resource.property``."""
    op = value.get("operator", {}) if isinstance(value, dict) else {}
    if op.get("type") != "property_accessor":
        return None
    first, second = op["operands"]["operand_1"], op["operands"]["operand_2"]
    return (str(first), str(second)) if isinstance(first, str) and isinstance(second, str) else None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(bm.INFRA).as_posix())
def test_modules_have_the_standard_outputs(path):
    """Azure Verified Modules conventions: name, resourceId and resourceGroupName of the module's
    primary resource, and its location when it has one."""
    rel = path.relative_to(bm.INFRA).as_posix()
    if rel in NOT_ARM:
        pytest.skip(NOT_ARM[rel])
    template = bm.parse(path)
    outputs = template.get("outputs", {})
    assert {"name", "resourceId", "resourceGroupName"} <= set(outputs), f"{rel}: outputs {sorted(outputs)}"
    primary, prop = _accessor(outputs["resourceId"]["value"]) or ("", "")
    resource = template["resources"].get(primary)
    assert prop == "id" and resource is not None and not resource.get("existing"), \
        f"{rel}: resourceId must be the id of a resource the module deploys"
    assert _accessor(outputs["name"]["value"]) == (primary, "name")
    assert "resource_group" in repr(outputs["resourceGroupName"]["value"])
    if "location" in resource["config"]:
        assert "location" in outputs, f"{rel}: {primary} has a location, the module does not output it"
        assert _accessor(outputs["location"]["value"]) == (primary, "location")


def test_every_module_output_main_reads_exists():
    modules = bm.parse(bm.MAIN)["modules"]
    used = set(re.findall(r"\b(\w+)\.outputs\.(\w+)", bm.MAIN.read_text()))
    assert used
    for module, output in sorted(used):
        outputs = bm.parse(bm.INFRA / modules[module]["detail"]["path"]).get("outputs", {})
        assert output in outputs, f"main.bicep reads {module}.outputs.{output}, which the module does not have"


def test_role_assignments_are_guid_named():
    assignments = []
    for path in FILES:
        for resource in bm.parse(path).get("resources", {}).values():
            if resource["type"] == "Microsoft.Authorization/roleAssignments":
                config = resource["config"]
                assignments.append(config.get("config", config))  # loops nest the body one level
    assert len(assignments) == 3  # storage (a loop over three roles), Key Vault, Application Insights
    for config in assignments:
        assert config["name"]["function"]["type"] == "guid"
        assert config["properties"]["principalType"] == "ServicePrincipal"


def test_storage_is_identity_only():
    account = _by_type("storage.bicep", "Microsoft.Storage/storageAccounts")["properties"]
    assert account["allowSharedKeyAccess"] is False
    assert account["allowBlobPublicAccess"] is False
    assert account["minimumTlsVersion"] == "TLS1_2"
    assert account["supportsHttpsTrafficOnly"] is True
    text = (bm.INFRA / "modules" / "storage.bicep").read_text()
    for role in ("b7e6dc6d-f1e8-4753-8033-0f276bb0955b",   # Storage Blob Data Owner
                 "974c5e8b-45b9-4653-ba55-5f855dd0fb88",   # Storage Queue Data Contributor
                 "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"):  # Storage Table Data Contributor
        assert role in text


def test_key_vault_is_rbac_with_soft_delete_and_purge_protection():
    vault = _by_type("keyvault.bicep", "Microsoft.KeyVault/vaults")["properties"]
    assert vault["enableRbacAuthorization"] is True
    assert vault["enableSoftDelete"] is True
    assert vault["enablePurgeProtection"] is True
    assert "4633458b-17de-408a-b874-0445c86b69e6" in (bm.INFRA / "modules" / "keyvault.bicep").read_text()


def test_application_insights_accepts_only_entra_telemetry():
    component = _by_type("monitoring.bicep", "Microsoft.Insights/components")["properties"]
    assert component["DisableLocalAuth"] is True
    assert "3913510d-42f4-4e42-8a64-420c390055eb" in (bm.INFRA / "modules" / "monitoring.bicep").read_text()


def test_function_app_is_flex_consumption_python_311_behind_https():
    plan = _by_type("function-app.bicep", "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    site = _by_type("function-app.bicep", "Microsoft.Web/sites")
    props = site["properties"]
    assert props["httpsOnly"] is True
    assert props["keyVaultReferenceIdentity"] == "identityResourceId"
    assert props["siteConfig"]["minTlsVersion"] == "1.2"
    assert props["siteConfig"]["ftpsState"] == "Disabled"
    config = props["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "pythonVersion"}
    assert bm.parse(bm.INFRA / "modules" / "function-app.bicep")["variables"]["pythonVersion"]["value"] == "3.11"
    assert config["deployment"]["storage"]["authentication"] == {
        "type": "UserAssignedIdentity", "userAssignedIdentityResourceId": "identityResourceId"}
    scale = config["scaleAndConcurrency"]
    assert (scale["maximumInstanceCount"], scale["instanceMemoryMB"]) == ("maximumInstanceCount", "instanceMemoryMB")
    # Python's platform default is one HTTP invocation per instance: set from a parameter, 16 by default.
    assert scale["triggers"]["http"]["perInstanceConcurrency"] == "httpPerInstanceConcurrency"
    for path in (bm.INFRA / "modules" / "function-app.bicep", bm.INFRA / "main.bicep"):
        assert bm.parameter_default("httpPerInstanceConcurrency", bm.parse(path)) == 16
    assert site["identity"]["type"] == "UserAssigned"


def test_basic_publishing_credentials_are_off():
    policies = {r["config"]["name"]: r["config"]["properties"] for r in
                _resources("function-app.bicep").values()
                if r["type"] == "Microsoft.Web/sites/basicPublishingCredentialsPolicies"}
    assert policies == {"ftp": {"allow": False}, "scm": {"allow": False}}


def test_graph_notification_key_is_a_provisioned_host_key():
    key = _by_type("app-settings.bicep", "Microsoft.Web/sites/host/functionKeys")
    assert key["properties"]["value"] == "graphNotificationKey"
    main = bm.parse(bm.MAIN)
    assert main["modules"]["settings"]["config"]["params"]["graphNotificationKey"] == "graphNotificationKey"
    # The app setting resolves to the very same value, through Key Vault.
    assert bm.key_vault_references()["GRAPH_NOTIFICATION_KEY"][1] == "graph-notification-key"
    assert "graphNotificationKey" in bm.secure_parameters()


def test_entra_app_requests_exactly_the_documented_permissions():
    template = bm.parse(bm.INFRA / "modules" / "entra-app.bicep")
    assert "microsoftGraphV1" in template["extensions"]
    variables = template["variables"]
    assert variables["applicationPermissions"]["value"] == [
        "Presence.ReadWrite.All", "Presence.Read.All", "User.Read.All", "GroupMember.Read.All"]
    assert variables["delegatedPermissions"]["value"] == [
        "Presence.Read.All", "Presence.ReadWrite", "User.Read", "offline_access"]
    fic = next(r["config"] for r in template["resources"].values()
               if r["type"].startswith("Microsoft.Graph/applications/federatedIdentityCredentials"))
    assert fic["audiences"] == ["federatedCredentialAudience"]
    assert fic["issuer"] == "${environment().authentication.loginEndpoint}${tenantId}/v2.0"
    assert fic["subject"] == "managedIdentityPrincipalId"
    assert bm.parameter_default("federatedCredentialAudience", template) == "api://AzureADTokenExchange"


def test_graph_extension_alias_is_configured():
    import json

    config = json.loads((bm.INFRA / "bicepconfig.json").read_text())
    registry = "br:mcr.microsoft.com/bicep/extensions/microsoftgraph/v1.0:"
    assert config["extensions"]["microsoftGraphV1"].startswith(registry)


# --- main.bicepparam -----------------------------------------------------------------------------

def test_bicepparam_uses_main_and_sets_only_its_parameters():
    text = bm.PARAMS.read_text()
    assert re.search(r"^using '\./main\.bicep'$", text, flags=re.M)
    params = bm.parse(bm.MAIN)["parameters"]
    assigned = bm.bicepparam_assignments()
    assert set(assigned) <= set(params), f"unknown parameters: {sorted(set(assigned) - set(params))}"
    required = {name for name, spec in params.items() if "default" not in spec or spec["default"] is None}
    assert required <= set(assigned), f"required parameters not set: {sorted(required - set(assigned))}"


def test_additional_app_settings_are_settable_and_merged_last():
    """Every deployment replaces the app's whole settings set, so the settings the docs tell admins
    to add (a disabled timer, log levels, samplers) must come through the template: main.bicep merges
    additionalAppSettings last, and main.bicepparam fills it from ADDITIONAL_APP_SETTINGS."""
    main = bm.parse(bm.MAIN)
    union = main["variables"]["appSettings"]["value"]["function"]
    assert union["type"] == "union"
    assert list(union["parameters"].values())[-1] == "additionalAppSettings"
    assert bm.parameter_default("additionalAppSettings") == {}
    assert bm.bicepparam_assignments()["additionalAppSettings"] == \
        "json(readEnvironmentVariable('ADDITIONAL_APP_SETTINGS', '{}'))"


def test_bicepparam_holds_no_secret_values():
    assigned = bm.bicepparam_assignments()
    for name in bm.secure_parameters() & set(assigned):
        assert re.fullmatch(r"readEnvironmentVariable\('[A-Z_]+'(, '')?\)", assigned[name]), \
            f"{name} must come from an environment variable"


# --- the deploy guide and azure.yaml ----------------------------------------------------------------

DEPLOY_GUIDE = bm.ROOT / "docs" / "deploy.md"


def test_deploy_guide_reads_only_outputs_the_template_has():
    outputs = set(bm.parse(bm.MAIN)["outputs"])
    used = set(re.findall(r"(?:\$\(|^)out (\w+)", DEPLOY_GUIDE.read_text(), flags=re.M))
    assert used, "the guide reads deployment outputs through its out() helper"
    assert used <= outputs, f"the guide reads outputs main.bicep does not have: {sorted(used - outputs)}"


def test_deploy_guide_exports_every_variable_the_parameters_file_requires():
    guide = DEPLOY_GUIDE.read_text()
    required = set()
    for expression in bm.bicepparam_assignments().values():
        required.update(re.findall(r"readEnvironmentVariable\('([A-Z_]+)'\)", expression))
    assert required
    for name in required:
        assert re.search(rf"export {name}=", guide), f"docs/deploy.md never exports {name}"


def test_deploy_guide_uses_the_documented_commands():
    guide = DEPLOY_GUIDE.read_text()
    assert "-f infra/main.bicep -p infra/main.bicepparam" in guide
    assert 'func azure functionapp publish "$(out functionAppName)" --python' in guide
    for output in ("healthUrl", "zoomWebhookUrl", "manageApiBaseUrl", "microsoftConnectRedirectUri"):
        assert f"$(out {output})" in guide


def _guide_section(title: str) -> str:
    guide = DEPLOY_GUIDE.read_text()
    return guide.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_upgrades_leave_admin_consent_off():
    # Granting consent again can fail with Conflict "EntitlementGrant entry already exists"
    # (microsoftgraph/msgraph-bicep-types#161); consent granted once stays.
    upgrade = _guide_section("9. Upgrade, rollback, rotation")
    assert "export GRANT_ENTRA_ADMIN_CONSENT=false" in upgrade
    assert "msgraph-bicep-types/issues/161" in upgrade


def test_self_service_zoom_app_is_exported_before_and_redirected_after_deploying():
    guide = DEPLOY_GUIDE.read_text()
    deploy = guide.index("-f infra/main.bicep -p infra/main.bicepparam")
    assert guide.index("export ZOOM_OAUTH_CLIENT_ID=") < deploy < guide.index("$(out zoomConnectRedirectUri)")


def test_azure_yaml_publishes_this_folder_as_the_api_function():
    text = (bm.ROOT / "azure.yaml").read_text()
    assert re.search(r"^services:\n  api:\n    project: \.\n    language: python\n    host: function$", text, re.M)
    assert re.search(r"^  path: infra\n  module: main$", text, re.M)
    function_app = bm.parse(bm.INFRA / "modules" / "function-app.bicep")
    assert bm.parameter_default("azdServiceName", function_app) == "api"


def test_the_zone_redundancy_cost_stated_matches_the_apps_scaling_groups():
    """With zone redundancy Flex Consumption keeps two always-ready instances per scaling group: the
    HTTP triggers share one, every other trigger scales alone. The count the parameter descriptions
    and docs/deploy.md give an admin must follow the functions the app has."""
    triggers = [b["type"] for b in bm.indexed_bindings() if b.get("type", "").endswith("Trigger")]
    alone = sum(1 for t in triggers if t != "httpTrigger")
    assert "httpTrigger" in triggers and alone >= 11
    instances = 2 * (1 + alone)
    deploy = (bm.ROOT / "docs" / "deploy.md").read_text()
    assert f"(this app has {alone}), so {1 + alone} groups and at least {instances} always-ready" in deploy
    for path in (bm.MAIN, bm.INFRA / "modules" / "function-app.bicep"):
        spec = bm.parse(path)["parameters"]["zoneRedundant"]
        description = next(d["argument"] for d in spec["decorators"] if d["type"] == "description")
        assert f"({instances} instances for this app;" in description, path.name
