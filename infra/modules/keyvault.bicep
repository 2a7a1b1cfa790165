metadata name = 'keyvault'
metadata description = 'Key Vault (RBAC authorisation, soft delete, purge protection) holding the app\'s secrets; the app reads them through Key Vault references with its managed identity.'

@description('Required. Key Vault name (3-24 letters, digits and hyphens, globally unique).')
@minLength(3)
@maxLength(24)
param name string

@description('Required. Principal id of the managed identity that reads the secrets (granted Key Vault Secrets User).')
param readerPrincipalId string

@description('Required. Secrets to store: { "<secret-name>": { value: string, contentType: string } }.')
@secure()
param secrets object

@description('Optional. Location of the vault.')
param location string = resourceGroup().location

@description('Optional. Tags applied to the vault.')
param tags object = {}

@description('Optional. Days a deleted vault or secret stays recoverable.')
@minValue(7)
@maxValue(90)
param softDeleteRetentionInDays int = 90

// Key Vault Secrets User (learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var keyVaultSecretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionInDays
    enablePurgeProtection: true
    //checkov:skip=CKV_AZURE_109:Flex Consumption without VNet integration resolves Key Vault references over the public endpoint; access is Entra RBAC only (no access policies, no keys).
    //checkov:skip=CKV_AZURE_189:Same reason: the app's Key Vault references need the public endpoint unless the app is VNet-integrated.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

// Written through the control plane (ARM), so the deployer needs no data-plane role on the vault.
resource vaultSecrets 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = [
  for secret in items(secrets): {
    parent: vault
    name: secret.key
    //checkov:skip=CKV_AZURE_41:An expiry date would silently break the app's Key Vault references; secrets are rotated by redeploying (see docs/deploy.md).
    properties: {
      value: secret.value.value
      contentType: secret.value.contentType
      attributes: {
        enabled: true
      }
    }
  }
]

resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, readerPrincipalId, keyVaultSecretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUserRoleId)
    principalId: readerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

@description('The name of the vault.')
output name string = vault.name

@description('The resource id of the vault.')
output resourceId string = vault.id

@description('The vault URI, e.g. https://<name>.vault.azure.net/ (Key Vault references are built from it).')
output uri string = vault.properties.vaultUri

@description('The resource group the vault was deployed into.')
output resourceGroupName string = resourceGroup().name

@description('The location of the vault.')
output location string = vault.location
