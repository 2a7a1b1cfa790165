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
  parent: site
  name: 'appsettings'
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

@description('The name of the host key Graph presents.')
output graphNotificationKeyName string = graphNotificationKeyName
