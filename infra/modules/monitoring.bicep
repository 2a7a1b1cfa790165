metadata name = 'monitoring'
metadata description = 'Log Analytics workspace and workspace-based Application Insights with local (key) authentication off; the app publishes telemetry with its managed identity.'

@description('Required. Name of the Log Analytics workspace.')
@minLength(4)
@maxLength(63)
param logAnalyticsName string

@description('Required. Name of the Application Insights component.')
@minLength(1)
@maxLength(255)
param applicationInsightsName string

@description('Required. Principal id of the managed identity that publishes telemetry (granted Monitoring Metrics Publisher).')
param publisherPrincipalId string

@description('Optional. Location of the resources.')
param location string = resourceGroup().location

@description('Optional. Tags applied to every resource.')
param tags object = {}

@description('Optional. Days the workspace keeps logs.')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

// Monitoring Metrics Publisher: lets an Entra identity ingest telemetry once local auth is off
// (learn.microsoft.com/azure/azure-monitor/app/azure-ad-authentication; built-in role ids:
// learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var monitoringMetricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb'

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: applicationInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    IngestionMode: 'LogAnalytics'
    // Instrumentation keys stop being credentials: only Entra-authenticated telemetry is accepted.
    DisableLocalAuth: true
  }
}

resource publisherRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, publisherPrincipalId, monitoringMetricsPublisherRoleId)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRoleId)
    principalId: publisherPrincipalId
    principalType: 'ServicePrincipal'
  }
}

@description('The name of the Application Insights component.')
output name string = applicationInsights.name

@description('The resource id of the Application Insights component.')
output resourceId string = applicationInsights.id

@description('The Application Insights connection string (not a credential: local auth is disabled).')
output connectionString string = applicationInsights.properties.ConnectionString

@description('The resource id of the Log Analytics workspace.')
output workspaceResourceId string = workspace.id

@description('The resource group the resources were deployed into.')
output resourceGroupName string = resourceGroup().name

@description('The location of the Application Insights component.')
output location string = applicationInsights.location
