metadata name = 'storage'
metadata description = 'The storage account behind the Functions host and the app: tables (state), queues (intake to work, each with its -poison twin), the Flex Consumption deployment container. Identity-only access: shared keys are off.'

@description('Required. Storage account name (3-24 lowercase letters and digits, globally unique).')
@minLength(3)
@maxLength(24)
param name string

@description('Required. Principal id of the managed identity the function app runs as.')
param principalId string

@description('Required. Names of the app\'s queues; each also gets its "-poison" queue.')
param queueNames array

@description('Required. Names of the app\'s tables.')
param tableNames array

@description('Required. Name of the blob container Flex Consumption deploys packages from.')
@minLength(3)
@maxLength(63)
param deploymentContainerName string

@description('Optional. Location of the account.')
param location string = resourceGroup().location

@description('Optional. Tags applied to the account.')
param tags object = {}

@description('Optional. Replication of the account.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
  'Standard_RAGRS'
  'Standard_RAGZRS'
])
param skuName string = 'Standard_LRS'

// Built-in role ids (learn.microsoft.com/azure/role-based-access-control/built-in-roles).
// Blob Data Owner is what the Functions host needs on AzureWebJobsStorage (containers for keys,
// timer and singleton locks) and what Flex Consumption needs to read the deployment container
// (learn.microsoft.com/azure/azure-functions/functions-reference#connecting-to-host-storage-with-an-identity).
// Queue Data Contributor: queue triggers and the -poison queues; Table Data Contributor: the app's state.
var roleIds = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
}

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  //checkov:skip=CKV_AZURE_35:Flex Consumption without VNet integration reaches its storage over the public endpoint; access is Entra-only (shared keys off, TLS 1.2).
  //checkov:skip=CKV_AZURE_59:Same reason; no anonymous access either (allowBlobPublicAccess false).
  //checkov:skip=CKV_AZURE_206:Replication is the operator's choice (storageSkuName); LRS keeps the default deployable in every Flex Consumption region.
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    // No account keys: the host, the app and Flex deployments all authenticate with the identity.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [
  for queueName in queueNames: {
    parent: queueService
    name: queueName
  }
]

// The host moves a message here after maxDequeueCount failures (host.json); creating it up front
// lets operators watch it from the first day.
resource poisonQueues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [
  for queueName in queueNames: {
    parent: queueService
    name: '${queueName}-poison'
  }
]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [
  for tableName in tableNames: {
    parent: tableService
    name: tableName
  }
]

resource roleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in items(roleIds): {
    name: guid(account.id, principalId, role.value)
    scope: account
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role.value)
      principalId: principalId
      principalType: 'ServicePrincipal'
    }
  }
]

@description('The name of the storage account.')
output name string = account.name

@description('The resource id of the storage account.')
output resourceId string = account.id

@description('The blob endpoint, e.g. https://<name>.blob.core.windows.net/.')
output blobEndpoint string = account.properties.primaryEndpoints.blob

@description('The queue endpoint.')
output queueEndpoint string = account.properties.primaryEndpoints.queue

@description('The table endpoint.')
output tableEndpoint string = account.properties.primaryEndpoints.table

@description('The name of the Flex Consumption deployment container.')
output deploymentContainerName string = deploymentContainer.name

@description('The resource group the account was deployed into.')
output resourceGroupName string = resourceGroup().name

@description('The location of the storage account.')
output location string = account.location
