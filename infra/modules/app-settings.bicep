metadata name = 'app-settings'
metadata description = 'Applies the function app\'s settings (after the identity\'s role assignments, the Key Vault secrets and the Entra app exist) and the host key Microsoft Graph presents on the notification and lifecycle URLs.'

@description('Required. Name of the existing function app.')
param functionAppName string

@description('Required. The complete set of app settings (secrets only as Key Vault references).')
param appSettings object

@description('Required. Value of the host key Graph presents as ?code= (the same value GRAPH_NOTIFICATION_KEY resolves to).')
@secure()
@minLength(32)
param graphNotificationKey string

@description('Optional. Name of that host key.')
param graphNotificationKeyName string = 'graph-notifications'

resource site 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

// Replaces the whole set: every setting the app reads is declared here, nothing is edited by hand.
resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  // checkov reads every sites/config as the "web" config; this one holds only name/value settings
  // (the site itself is checked in function-app.bicep).
  //checkov:skip=CKV_AZURE_13:Not the web config. App Service Authentication would also reject Zoom and Graph webhooks; each route authenticates itself.
  parent: site
  //checkov:skip=CKV_AZURE_63:Not the web config; Flex Consumption has no web-server logs, telemetry goes to Application Insights.
  //checkov:skip=CKV_AZURE_65:Not the web config; detailed error pages do not exist on Flex Consumption (Application Insights records exceptions).
  //checkov:skip=CKV_AZURE_66:Not the web config; failed-request tracing does not exist on Flex Consumption (Application Insights records requests).
  name: 'appsettings'
  //checkov:skip=CKV_AZURE_80:Not the web config, and a Python app: no .NET Framework.
  //checkov:skip=CKV_AZURE_88:Not the web config; Flex Consumption runs from its blob deployment container, not Azure Files.
  //checkov:skip=CKV_AZURE_222:Not the web config; the webhooks must be reachable from Zoom and Microsoft Graph.
  properties: appSettings
}

// A host key (valid for every function-level route): Graph keeps the ?code= query string of the
// notification URL (API-FACTS §7). Host keys are ARM resources
// (learn.microsoft.com/azure/azure-functions/functions-infrastructure-as-code#function-access-keys).
// The host stores keys in AzureWebJobsStorage, so the settings must be in place first.
resource graphNotificationHostKey 'Microsoft.Web/sites/host/functionKeys@2024-04-01' = {
  name: '${functionAppName}/default/${graphNotificationKeyName}'
  properties: {
    name: graphNotificationKeyName
    value: graphNotificationKey
  }
  dependsOn: [
    settings
  ]
}

// Standard module outputs (Azure Verified Modules) for its primary resource, the appsettings
// config (it has no location of its own).
@description('The name of the app settings resource (appsettings).')
output name string = settings.name

@description('The resource id of the app settings resource.')
output resourceId string = settings.id

@description('The resource group of the function app.')
output resourceGroupName string = resourceGroup().name

@description('The name of the host key Graph presents.')
output graphNotificationKeyName string = graphNotificationKeyName
