metadata name = 'presence-bridge'
metadata description = 'Everything the presence bridge needs in one resource group: storage (tables, queues, Flex deployment container), monitoring, a user-assigned identity, Key Vault, the Flex Consumption function app with all its settings, and (optionally) its Entra app registration.'

targetScope = 'resourceGroup'

// --- naming and placement -----------------------------------------------------------------------

@description('Optional. Short prefix for resource names (lowercase letters, digits, hyphens).')
@minLength(2)
@maxLength(12)
param baseName string = 'presence'

@description('Optional. Location of every resource; must offer Flex Consumption (az functionapp list-flexconsumption-locations).')
param location string = resourceGroup().location

@description('Optional. Tags applied to every resource.')
param tags object = {}

@description('Optional. Function app name (globally unique, becomes <name>.azurewebsites.net); empty = func-<baseName>-<token>.')
@maxLength(60)
param functionAppName string = ''

// --- scale ---------------------------------------------------------------------------------------

@description('Optional. Upper bound on function app instances. Flex Consumption refuses less than 40 except in regions where Azure previews lower values.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Optional. Memory of each function app instance, in MB.')
@allowed([
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Optional. Instances kept warm for HTTP triggers (billed while idle); 1 keeps Zoom\'s 3-second webhook deadline safe from cold starts.')
@minValue(0)
@maxValue(20)
param alwaysReadyHttpInstances int = 0

@description('Optional. Concurrent HTTP invocations per instance before Flex Consumption adds one (the platform default for Python is 1).')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 16

@description('Optional. Spread the plan\'s instances across availability zones (in regions that offer it for Flex Consumption). Costs: the platform then keeps at least two always-ready instances, billed as such, for the HTTP group and for each queue- or timer-triggered function (24 instances for this app; docs/deploy.md).')
param zoneRedundant bool = false

// --- Zoom ----------------------------------------------------------------------------------------

@description('Required. Zoom Server-to-Server OAuth app: Account ID.')
@minLength(1)
param zoomAccountId string

@description('Required. Zoom Server-to-Server OAuth app: Client ID.')
@minLength(1)
param zoomClientId string

@description('Required. Zoom Server-to-Server OAuth app: Client secret (stored in Key Vault).')
@secure()
@minLength(1)
param zoomClientSecret string

@description('Required. Zoom app webhook Secret Token; during a rotation "new,old" (stored in Key Vault).')
@secure()
@minLength(1)
param zoomWebhookSecretToken string

@description('Optional. Zoom user-level OAuth app client id, for people who connect their own Zoom account; empty = admin-made links only.')
param zoomOAuthClientId string = ''

@description('Optional. Zoom user-level OAuth app client secret (stored in Key Vault).')
@secure()
param zoomOAuthClientSecret string = ''

// --- Entra / Microsoft Graph ----------------------------------------------------------------------

@description('Optional. Create the Entra app registration with the Microsoft Graph Bicep extension (needs Application Administrator or equivalent); false = bring your own (entraClientId).')
param createEntraApp bool = true

@description('Optional. With createEntraApp, also grant tenant-wide admin consent (needs Privileged Role Administrator or equivalent).')
param grantEntraAdminConsent bool = false

@description('Optional. Display name of the created app registration.')
@minLength(1)
@maxLength(120)
param entraAppDisplayName string = 'Presence bridge (${baseName})'

@description('Optional. Tenant of the app registration.')
param entraTenantId string = tenant().tenantId

@description('Optional. Audience of the managed identity\'s federated credential (sovereign clouds use their own, e.g. api://AzureADTokenExchangeUSGov).')
param federatedCredentialAudience string = 'api://AzureADTokenExchange'

@description('Optional. With createEntraApp = false: the application (client) id of your app registration.')
param entraClientId string = ''

@description('Optional. Entra client secret, if the app registration authenticates with one instead of the managed identity (stored in Key Vault).')
@secure()
param entraClientSecret string = ''

@description('Optional. Entra client certificate (PEM: certificate and unencrypted key), instead of a secret (stored in Key Vault).')
@secure()
param entraClientCertificate string = ''

@description('Optional. With createEntraApp = false: the app registration trusts the managed identity through a federated credential you created (docs/deploy.md); defaults to true unless a secret or certificate is given.')
param entraUseManagedIdentity bool = empty(entraClientSecret) && empty(entraClientCertificate)

// --- the app -------------------------------------------------------------------------------------

@description('Required. TOKEN_ENCRYPTION_KEY: comma-separated "keyid:base64key" entries encrypting stored delegated tokens (stored in Key Vault).')
@secure()
@minLength(1)
param tokenEncryptionKey string

@description('Required. Host key Graph presents on the notification and lifecycle URLs (?code=); generate once and keep (stored in Key Vault).')
@secure()
@minLength(32)
param graphNotificationKey string

@description('Optional. PEM (certificate and unencrypted key) for rich Graph notifications; empty = basic notifications (stored in Key Vault).')
@secure()
param graphNotificationCertificate string = ''

@description('Optional. Label of the encryptionCertificateId sent with that certificate (the certificate\'s thumbprint is always appended); empty = presence-bridge.')
param graphNotificationCertificateId string = ''

@description('Optional. Public base URL (scheme and host, no /api, no trailing slash) when a custom domain fronts the app; empty = https://<default hostname>.')
param publicBaseUrl string = ''

@description('Optional. NCRONTAB schedule of the presence sweep (six fields, seconds first).')
param presenceSweepSchedule string = '*/30 * * * * *'

@description('Optional. Who writes Teams presence: app (application permission), delegated (each person\'s own connected account) or auto.')
@allowed([
  'app'
  'delegated'
  'auto'
])
param teamsWriteMode string = 'app'

@description('Optional. JSON overriding the presence mapping tables; empty = the built-in mapping.')
param presenceMapping string = ''

@description('Optional. More app settings (string values, no secrets), merged last so they also override the template\'s: tuning knobs, sovereign-cloud endpoints, host settings. Every deployment replaces the whole set, so settings added by hand are lost; put them here (main.bicepparam reads ADDITIONAL_APP_SETTINGS).')
param additionalAppSettings object = {}

// --- platform knobs ------------------------------------------------------------------------------

@description('Optional. Replication of the storage account.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
  'Standard_RAGRS'
  'Standard_RAGZRS'
])
param storageSkuName string = 'Standard_LRS'

@description('Optional. Days a deleted Key Vault or secret stays recoverable (purge protection keeps the name reserved that long).')
@minValue(7)
@maxValue(90)
param keyVaultSoftDeleteRetentionInDays int = 90

@description('Optional. Days Log Analytics keeps logs.')
@minValue(30)
@maxValue(730)
param logRetentionInDays int = 30

@description('Optional. Resource id of an action group the alert rules notify (docs/operations.md, "Alerts"); empty = alerts show in the portal only.')
param alertActionGroupId string = ''

// --- alert thresholds and working hours (passed to modules/observability.bicep, same defaults) ----

@description('Optional. Alert when the 95th percentile of sync latency (event reaching the app to the target write) exceeds this, in milliseconds.')
@minValue(1000)
param syncLatencyP95ThresholdMs int = 60000

@description('Optional. Alert when more Zoom writes than this fail with 5301 (person not signed in to a Zoom client) within 30 minutes.')
@minValue(1)
param zoomNotSignedInThreshold int = 50

@description('Optional. Alert when more Graph calls than this are refused with 403 within 15 minutes.')
@minValue(1)
param graphForbiddenThreshold int = 5

@description('Optional. Alert when subscription maintenance failed at least this many times within 30 minutes (a broken sync account alerts on its own, at once).')
@minValue(1)
param subscriptionFailureThreshold int = 2

@description('Optional. Alert when no Zoom webhook arrived for this many minutes during working hours (one of the window sizes Azure Monitor log search alerts accept).')
@allowed([15, 30, 45, 60, 120, 180, 240, 300, 360])
param noWebhookMinutes int = 60

@description('Optional. Time zone of the working hours (a .NET/IANA zone name accepted by KQL datetime_utc_to_local, e.g. Europe/Berlin).')
param workingHoursTimeZone string = 'UTC'

@description('Optional. First hour (0-23, local) of the working day, Monday to Friday.')
@minValue(0)
@maxValue(23)
param workingHoursStart int = 8

@description('Optional. Hour (1-24, local) at which the working day ends.')
@minValue(1)
@maxValue(24)
param workingHoursEnd int = 18

// --- names ---------------------------------------------------------------------------------------

var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, baseName))
var prefix = toLower(baseName)
var compactPrefix = replace(prefix, '-', '')
var allTags = union({ application: 'presence-bridge' }, tags)

var names = {
  identity: 'id-${prefix}-${resourceToken}'
  logAnalytics: 'log-${prefix}-${resourceToken}'
  applicationInsights: 'appi-${prefix}-${resourceToken}'
  storage: take('st${compactPrefix}${resourceToken}', 24)
  keyVault: 'kv-${take(compactPrefix, 8)}-${take(resourceToken, 12)}'
  plan: 'plan-${prefix}-${resourceToken}'
  functionApp: empty(functionAppName) ? 'func-${prefix}-${resourceToken}' : functionAppName
  entraApp: 'presence-bridge-${resourceToken}'
  deploymentContainer: 'deployment-package'
}

// The app's queues and tables: the same names as shared/names.py (tests/infra checks they match).
var queueNames = [
  'zoom-presence'
  'zoom-user-events'
  'reconcile'
  'teams-presence'
  'graph-lifecycle'
  'directory'
]

var tableNames = [
  'links'
  'linksbyentra'
  'shards'
  'connections'
  'subscriptions'
  'directory'
  'connectflows'
]

// --- resources -----------------------------------------------------------------------------------

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    name: names.identity
    location: location
    tags: allTags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: names.logAnalytics
    applicationInsightsName: names.applicationInsights
    publisherPrincipalId: identity.outputs.principalId
    location: location
    tags: allTags
    retentionInDays: logRetentionInDays
  }
}

// The workbook and alert rules over the app's metrics and traces (shared/telemetry.py).
module observability 'modules/observability.bicep' = {
  name: 'observability'
  params: {
    applicationInsightsId: monitoring.outputs.resourceId
    namePrefix: 'alert-${prefix}-${resourceToken}'
    location: location
    tags: allTags
    actionGroupId: alertActionGroupId
    syncLatencyP95ThresholdMs: syncLatencyP95ThresholdMs
    zoomNotSignedInThreshold: zoomNotSignedInThreshold
    graphForbiddenThreshold: graphForbiddenThreshold
    subscriptionFailureThreshold: subscriptionFailureThreshold
    noWebhookMinutes: noWebhookMinutes
    workingHoursTimeZone: workingHoursTimeZone
    workingHoursStart: workingHoursStart
    workingHoursEnd: workingHoursEnd
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: names.storage
    principalId: identity.outputs.principalId
    queueNames: queueNames
    tableNames: tableNames
    deploymentContainerName: names.deploymentContainer
    location: location
    tags: allTags
    skuName: storageSkuName
  }
}

// Secret names here are the ones the Key Vault references below point to (tests/infra checks it).
module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: names.keyVault
    readerPrincipalId: identity.outputs.principalId
    location: location
    tags: allTags
    softDeleteRetentionInDays: keyVaultSoftDeleteRetentionInDays
    secrets: union({
      'zoom-client-secret': {
        value: zoomClientSecret
        contentType: 'text/plain'
      }
      'zoom-webhook-secret-token': {
        value: zoomWebhookSecretToken
        contentType: 'text/plain'
      }
      'token-encryption-key': {
        value: tokenEncryptionKey
        contentType: 'text/plain'
      }
      'graph-notification-key': {
        value: graphNotificationKey
        contentType: 'text/plain'
      }
    }, empty(zoomOAuthClientSecret) ? {} : {
      'zoom-oauth-client-secret': {
        value: zoomOAuthClientSecret
        contentType: 'text/plain'
      }
    }, empty(entraClientSecret) ? {} : {
      'entra-client-secret': {
        value: entraClientSecret
        contentType: 'text/plain'
      }
    }, empty(entraClientCertificate) ? {} : {
      'entra-client-certificate': {
        value: entraClientCertificate
        contentType: 'application/x-pem-file'
      }
    }, empty(graphNotificationCertificate) ? {} : {
      'graph-notification-certificate': {
        value: graphNotificationCertificate
        contentType: 'application/x-pem-file'
      }
    })
  }
}

module functionApp 'modules/function-app.bicep' = {
  name: 'function-app'
  params: {
    name: names.functionApp
    planName: names.plan
    identityResourceId: identity.outputs.resourceId
    blobEndpoint: storage.outputs.blobEndpoint
    deploymentContainerName: storage.outputs.deploymentContainerName
    location: location
    tags: allTags
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    alwaysReadyHttpInstances: alwaysReadyHttpInstances
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    zoneRedundant: zoneRedundant
  }
}

var publicBase = empty(publicBaseUrl) ? 'https://${functionApp.outputs.defaultHostName}' : publicBaseUrl

module entraApp 'modules/entra-app.bicep' = if (createEntraApp) {
  name: 'entra-app'
  params: {
    uniqueName: names.entraApp
    displayName: entraAppDisplayName
    redirectUris: [
      '${publicBase}/api/connect/microsoft/callback'
    ]
    managedIdentityPrincipalId: identity.outputs.principalId
    tenantId: entraTenantId
    federatedCredentialAudience: federatedCredentialAudience
    grantAdminConsent: grantEntraAdminConsent
  }
}

var appClientId = createEntraApp ? entraApp.outputs.appId : entraClientId

// Every setting shared/config.py reads (tests/infra checks none is missing). Secrets appear only
// as Key Vault references resolved with the user-assigned identity
// (learn.microsoft.com/azure/app-service/app-service-key-vault-references); defaults equal the code's.
var appSettings = union({
  // Host storage, identity-based (learn.microsoft.com/azure/azure-functions/functions-reference#connecting-to-host-storage-with-an-identity).
  AzureWebJobsStorage__accountName: storage.outputs.name
  AzureWebJobsStorage__blobServiceUri: storage.outputs.blobEndpoint
  AzureWebJobsStorage__queueServiceUri: storage.outputs.queueEndpoint
  AzureWebJobsStorage__tableServiceUri: storage.outputs.tableEndpoint
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.outputs.clientId
  // Entra-authenticated telemetry (learn.microsoft.com/azure/azure-monitor/app/azure-ad-authentication).
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.connectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.outputs.clientId};Authorization=AAD'

  // Zoom
  ZOOM_ACCOUNT_ID: zoomAccountId
  ZOOM_CLIENT_ID: zoomClientId
  ZOOM_CLIENT_SECRET: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/zoom-client-secret/)'
  ZOOM_WEBHOOK_SECRET_TOKEN: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/zoom-webhook-secret-token/)'
  ZOOM_API_BASE_URL: 'https://api.zoom.us/v2'
  ZOOM_OAUTH_BASE_URL: 'https://zoom.us'
  ZOOM_WEBHOOK_MAX_SKEW_SECONDS: '300'
  ZOOM_WEBHOOK_MAX_AGE_SECONDS: '5700'
  ZOOM_WEBHOOK_MAX_BODY_BYTES: '65536'
  ZOOM_PRESENCE_MIN_INTERVAL_SECONDS: '60'
  ZOOM_DND_DURATION_MINUTES: '60'
  ZOOM_NOT_SIGNED_IN_BACKOFF_SECONDS: '900'

  // Entra / Graph: the managed identity is the app registration's credential (federated).
  ENTRA_TENANT_ID: entraTenantId
  ENTRA_CLIENT_ID: appClientId
  ENTRA_USE_MANAGED_IDENTITY: (createEntraApp || entraUseManagedIdentity) ? 'true' : 'false'
  ENTRA_MANAGED_IDENTITY_CLIENT_ID: identity.outputs.clientId
  ENTRA_AUTHORITY_HOST: 'https://login.microsoftonline.com'
  GRAPH_BASE_URL: 'https://graph.microsoft.com/v1.0'
  GRAPH_NOTIFICATION_KEY: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/graph-notification-key/)'
  GRAPH_NOTIFICATION_MAX_BODY_BYTES: '1048576'
  GRAPH_DELEGATED_SCOPES: 'Presence.Read.All Presence.ReadWrite User.Read offline_access'
  SUBSCRIPTIONS_PER_ACCOUNT: '1'
  SUBSCRIPTION_LIFETIME_MINUTES: '55'
  SUBSCRIPTION_RENEW_LEEWAY_SECONDS: '900'
  TEAMS_WRITE_MODE: teamsWriteMode
  TEAMS_OVERLAY_MINUTES: '60'
  OVERLAY_RENEW_LEEWAY_SECONDS: '600'
  SWEEP_SUBSCRIBED_INTERVAL_SECONDS: '300'

  // Enablement defaults (the scopes stored through /api/manage win) and directory matching.
  SYNC_ZOOM_TO_TEAMS: 'true'
  SYNC_TEAMS_TO_ZOOM: 'true'
  SCOPE_ENTRA_GROUP_IDS: ''
  SCOPE_ZOOM_GROUP_IDS: ''
  DIRECTORY_RUN_BUDGET_SECONDS: '240'
  MATCHING_REPORT_LIST_CAP: '200'
  MATCHING_ZOOM_PAGE_SIZE: '300'
  MATCHING_ENTRA_PAGE_SIZE: '999'
  MATCHING_PARALLELISM: '8'
  MATCHING_DISABLE_LIMIT: '500'

  // The app
  PUBLIC_BASE_URL: publicBase
  TOKEN_ENCRYPTION_KEY: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/token-encryption-key/)'
  // Read by the host for the sweep timer's schedule (%PRESENCE_SWEEP_SCHEDULE% in functions/teams_sync.py).
  PRESENCE_SWEEP_SCHEDULE: presenceSweepSchedule
  CONNECT_FLOW_MINUTES: '10'
  CONNECT_INVITE_MINUTES: '60'
  HTTP_TOTAL_TIMEOUT_SECONDS: '30'
}, empty(zoomOAuthClientId) ? {} : {
  ZOOM_OAUTH_CLIENT_ID: zoomOAuthClientId
}, empty(zoomOAuthClientSecret) ? {} : {
  ZOOM_OAUTH_CLIENT_SECRET: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/zoom-oauth-client-secret/)'
}, empty(entraClientSecret) ? {} : {
  ENTRA_CLIENT_SECRET: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/entra-client-secret/)'
}, empty(entraClientCertificate) ? {} : {
  ENTRA_CLIENT_CERTIFICATE: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/entra-client-certificate/)'
}, empty(graphNotificationCertificate) ? {} : {
  GRAPH_NOTIFICATION_CERTIFICATE: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.uri}secrets/graph-notification-certificate/)'
}, empty(graphNotificationCertificateId) ? {} : {
  GRAPH_NOTIFICATION_CERTIFICATE_ID: graphNotificationCertificateId
}, empty(presenceMapping) ? {} : {
  PRESENCE_MAPPING: presenceMapping
}, additionalAppSettings)

module settings 'modules/app-settings.bicep' = {
  name: 'app-settings'
  params: {
    functionAppName: functionApp.outputs.name
    appSettings: appSettings
    graphNotificationKey: graphNotificationKey
  }
}

// --- outputs -------------------------------------------------------------------------------------

@description('The name of the function app (for func azure functionapp publish).')
output functionAppName string = functionApp.outputs.name

@description('The default hostname of the function app.')
output functionAppDefaultHostName string = functionApp.outputs.defaultHostName

@description('The public base URL the app builds its callback URLs from (PUBLIC_BASE_URL).')
output publicBaseUrl string = publicBase

@description('Zoom app > Event Subscriptions > Event notification endpoint URL.')
output zoomWebhookUrl string = '${publicBase}/api/zoom/webhook'

@description('Where Graph sends presence change notifications (the app adds ?code=<host key>).')
output graphNotificationUrl string = '${publicBase}/api/graph/notifications'

@description('Where Graph sends subscription lifecycle notifications (the app adds ?code=<host key>).')
output graphLifecycleUrl string = '${publicBase}/api/graph/lifecycle'

@description('Base of the admin API (admin key in x-functions-key).')
output manageApiBaseUrl string = '${publicBase}/api/manage'

@description('Liveness and dependency check.')
output healthUrl string = '${publicBase}/api/health'

@description('Redirect URI of the Microsoft connect flow (registered on the Entra app).')
output microsoftConnectRedirectUri string = '${publicBase}/api/connect/microsoft/callback'

@description('Redirect URI to register on the optional Zoom user-level OAuth app.')
output zoomConnectRedirectUri string = '${publicBase}/api/connect/zoom/callback'

@description('The Entra application (client) id the app uses.')
output entraClientId string = appClientId

@description('Client id of the function app\'s user-assigned managed identity.')
output managedIdentityClientId string = identity.outputs.clientId

@description('Principal (object) id of that identity (subject of the federated credential).')
output managedIdentityPrincipalId string = identity.outputs.principalId

@description('The name of the Key Vault holding the secrets.')
output keyVaultName string = keyVault.outputs.name

@description('The name of the storage account.')
output storageAccountName string = storage.outputs.name

@description('The name of the Application Insights component.')
output applicationInsightsName string = monitoring.outputs.name

@description('The resource group everything was deployed into.')
output resourceGroupName string = resourceGroup().name
