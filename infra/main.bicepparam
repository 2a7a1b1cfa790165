// Parameters for infra/main.bicep. Every value comes from an environment variable, so the same
// file serves `az deployment group create` (export the variables first, see docs/deploy.md) and
// `azd up` (azd env set ...). Secrets never live in this file.
using './main.bicep'

param baseName = readEnvironmentVariable('AZURE_ENV_NAME', 'presence')

// Zoom Server-to-Server OAuth app and its webhook secret token.
param zoomAccountId = readEnvironmentVariable('ZOOM_ACCOUNT_ID')
param zoomClientId = readEnvironmentVariable('ZOOM_CLIENT_ID')
param zoomClientSecret = readEnvironmentVariable('ZOOM_CLIENT_SECRET')
param zoomWebhookSecretToken = readEnvironmentVariable('ZOOM_WEBHOOK_SECRET_TOKEN')

// Optional Zoom user-level OAuth app (people connecting their own Zoom account).
param zoomOAuthClientId = readEnvironmentVariable('ZOOM_OAUTH_CLIENT_ID', '')
param zoomOAuthClientSecret = readEnvironmentVariable('ZOOM_OAUTH_CLIENT_SECRET', '')

// The app's own secrets: generate once and keep them (docs/deploy.md, step 3).
param tokenEncryptionKey = readEnvironmentVariable('TOKEN_ENCRYPTION_KEY')
param graphNotificationKey = readEnvironmentVariable('GRAPH_NOTIFICATION_KEY')

// Entra app registration: created here by default, federated with the managed identity.
param createEntraApp = bool(readEnvironmentVariable('CREATE_ENTRA_APP', 'true'))
param grantEntraAdminConsent = bool(readEnvironmentVariable('GRANT_ENTRA_ADMIN_CONSENT', 'false'))
param entraClientId = readEnvironmentVariable('ENTRA_CLIENT_ID', '')
param entraClientSecret = readEnvironmentVariable('ENTRA_CLIENT_SECRET', '')
param entraClientCertificate = readEnvironmentVariable('ENTRA_CLIENT_CERTIFICATE', '')

// Rich Graph notifications (optional): a PEM read from the environment, never written here.
param graphNotificationCertificate = readEnvironmentVariable('GRAPH_NOTIFICATION_CERTIFICATE', '')
param graphNotificationCertificateId = readEnvironmentVariable('GRAPH_NOTIFICATION_CERTIFICATE_ID', '')

// Scale of the Flex Consumption app.
param maximumInstanceCount = int(readEnvironmentVariable('MAXIMUM_INSTANCE_COUNT', '40'))
param instanceMemoryMB = int(readEnvironmentVariable('INSTANCE_MEMORY_MB', '2048'))
param alwaysReadyHttpInstances = int(readEnvironmentVariable('ALWAYS_READY_HTTP_INSTANCES', '0'))
param httpPerInstanceConcurrency = int(readEnvironmentVariable('HTTP_PER_INSTANCE_CONCURRENCY', '16'))
param zoneRedundant = bool(readEnvironmentVariable('ZONE_REDUNDANT', 'false'))

// Extra app settings as a JSON object of strings, e.g. '{"AzureWebJobs.directory_matching.Disabled": "true"}'.
// Every deployment replaces the app's settings, so this is where settings of your own live
// (docs/operations.md, "Changing app settings"). Never secrets: they would be stored in clear.
param additionalAppSettings = json(readEnvironmentVariable('ADDITIONAL_APP_SETTINGS', '{}'))
