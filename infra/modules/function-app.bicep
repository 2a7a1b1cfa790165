metadata name = 'function-app'
metadata description = 'The Flex Consumption (FC1) plan and the Python function app, running as the user-assigned identity, HTTPS only, TLS 1.2, FTP and basic publishing credentials off. App settings are applied by app-settings.bicep once the hostname and the Entra app exist.'

@description('Required. Name of the function app (globally unique; becomes <name>.azurewebsites.net).')
@minLength(2)
@maxLength(60)
param name string

@description('Required. Name of the Flex Consumption plan.')
@minLength(1)
@maxLength(60)
param planName string

@description('Required. Resource id of the user-assigned managed identity the app runs as.')
param identityResourceId string

@description('Required. Blob endpoint of the storage account holding the deployment container (ends with "/").')
param blobEndpoint string

@description('Required. Name of the deployment container.')
param deploymentContainerName string

@description('Optional. Location of the plan and the app (a region that offers Flex Consumption).')
param location string = resourceGroup().location

@description('Optional. Tags applied to the plan and the app.')
param tags object = {}

@description('Optional. Upper bound on instances the app scales out to.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Optional. Memory of each instance, in MB.')
@allowed([
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Optional. Instances kept warm for HTTP triggers (always ready, billed while idle); 1 keeps Zoom\'s 3-second webhook deadline safe from cold starts.')
@minValue(0)
@maxValue(20)
param alwaysReadyHttpInstances int = 0

@description('Optional. Concurrent HTTP invocations per instance before Flex Consumption adds one. The intake only verifies, queues and answers (a few ms, I/O bound), so one instance takes many at once; the platform default for Python is 1, an instance per concurrent webhook.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 16

@description('Optional. Spread the plan\'s instances across availability zones (only in regions that offer it for Flex Consumption). Costs: the platform then keeps at least two always-ready instances, billed as such, for the HTTP group and for each queue- or timer-triggered function (24 instances for this app; docs/deploy.md).')
param zoneRedundant bool = false

@description('Optional. Name azd uses to find this app for `azd deploy` (azure.yaml service name).')
param azdServiceName string = 'api'

// pyproject.toml pins the project to Python 3.11.
var pythonVersion = '3.11'

// Flex Consumption: FC1 SKU, Linux only (learn.microsoft.com/azure/azure-functions/flex-consumption-how-to).
resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  //checkov:skip=CKV_AZURE_225:Zone redundancy is opt-in (zoneRedundant) because not every Flex Consumption region offers it; the engine is level-triggered and its sweep repairs what an outage delays.
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': azdServiceName
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityResourceId}': {}
    }
  }
  //checkov:skip=CKV_AZURE_222:The webhooks must be reachable from Zoom and Microsoft Graph over the internet.
  //checkov:skip=CKV_AZURE_212:Flex Consumption scales from zero; warm instances are opt-in (alwaysReadyHttpInstances) and Zoom retries, the sweep repairs drift.
  //checkov:skip=CKV_AZURE_213:Flex Consumption does not support the App Service health check; /api/health serves external probes.
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    //checkov:skip=CKV_AZURE_17:Client certificates cannot be required: Zoom and Microsoft Graph call the webhooks without one.
    clientCertEnabled: false
    // Key Vault references resolve with the user-assigned identity, not a system-assigned one
    // (learn.microsoft.com/azure/app-service/app-service-key-vault-references).
    keyVaultReferenceIdentity: identityResourceId
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    // Flex Consumption moves runtime, scale and deployment source here; FUNCTIONS_WORKER_RUNTIME
    // and FUNCTIONS_EXTENSION_VERSION are not app settings on this plan
    // (learn.microsoft.com/azure/azure-functions/functions-app-settings#flex-consumption-plan-deprecations).
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${blobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityResourceId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: alwaysReadyHttpInstances > 0 ? [
          {
            name: 'http'
            instanceCount: alwaysReadyHttpInstances
          }
        ] : []
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

// Publishing uses Entra ID (az login / func with an Azure token), never FTP or SCM basic auth
// (learn.microsoft.com/azure/app-service/configure-basic-auth-disable).
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

@description('The name of the function app.')
output name string = site.name

@description('The resource id of the function app.')
output resourceId string = site.id

@description('The default hostname of the function app.')
output defaultHostName string = site.properties.defaultHostName

@description('The resource id of the Flex Consumption plan.')
output planResourceId string = plan.id

@description('The resource group the app was deployed into.')
output resourceGroupName string = resourceGroup().name

@description('The location of the function app.')
output location string = site.location
