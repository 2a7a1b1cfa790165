metadata name = 'identity'
metadata description = 'The user-assigned managed identity the function app runs as (storage, Key Vault, Application Insights, and the Entra app federated credential).'

@description('Required. Name of the user-assigned managed identity.')
@minLength(3)
@maxLength(128)
param name string

@description('Optional. Location of the identity.')
param location string = resourceGroup().location

@description('Optional. Tags applied to the identity.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

@description('The name of the identity.')
output name string = identity.name

@description('The resource id of the identity.')
output resourceId string = identity.id

@description('The client (application) id of the identity.')
output clientId string = identity.properties.clientId

@description('The principal (object) id of the identity.')
output principalId string = identity.properties.principalId

@description('The resource group the identity was deployed into.')
output resourceGroupName string = resourceGroup().name

@description('The location of the identity.')
output location string = identity.location
