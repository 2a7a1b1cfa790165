metadata name = 'entra-app'
metadata description = 'The Entra app registration (Microsoft Graph Bicep extension): Graph permissions, the connect-flow redirect URI, a federated identity credential that trusts the function app\'s managed identity (no client secret), its service principal and, optionally, tenant-wide admin consent.'

// Kept in its own module: the extension keyword is newer than the Bicep grammar checkov bundles,
// so checkov cannot parse this file (it holds no Azure resources for checkov to check); the
// infra tests parse it with the current pycep-parser instead.
// Alias defined in ../bicepconfig.json (learn.microsoft.com/graph/templates/how-to-dynamic-types).
extension microsoftGraphV1

@description('Required. Tenant-unique key of the app registration (the extension upserts by it).')
@minLength(1)
@maxLength(120)
param uniqueName string

@description('Required. Display name of the app registration.')
@minLength(1)
@maxLength(120)
param displayName string

@description('Required. Web redirect URIs of the delegated connect flow (https://<host>/api/connect/microsoft/callback).')
param redirectUris array

@description('Required. Principal (object) id of the user-assigned managed identity trusted as the app\'s credential.')
param managedIdentityPrincipalId string

@description('Optional. Tenant whose Entra ID issues the managed identity\'s tokens.')
param tenantId string = tenant().tenantId

@description('Optional. Audience of the federated credential; sovereign clouds use their own (e.g. api://AzureADTokenExchangeUSGov).')
param federatedCredentialAudience string = 'api://AzureADTokenExchange'

@description('Optional. Grant tenant-wide admin consent for the permissions below (needs a deployer with Privileged Role Administrator or equivalent).')
param grantAdminConsent bool = false

// Microsoft Graph's well-known application id.
var graphAppId = '00000003-0000-0000-c000-000000000000'

// Application permissions (app-only token): see the least-privilege table in docs/deploy.md.
var applicationPermissions = [
  'Presence.ReadWrite.All'
  'Presence.Read.All'
  'User.Read.All'
  'GroupMember.Read.All'
]

// Delegated permissions of the connect flows: presence subscriptions need a signed-in user's token
// (API-FACTS §7); Presence.ReadWrite lets a person's own account write their presence.
var delegatedPermissions = [
  'Presence.Read.All'
  'Presence.ReadWrite'
  'User.Read'
  'offline_access'
]

// Permission ids are looked up by name on Graph's service principal rather than hard-coded.
resource graphServicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: graphAppId
}

var requestedPermissions = concat(
  map(applicationPermissions, permission => { name: permission, type: 'Role' }),
  map(delegatedPermissions, permission => { name: permission, type: 'Scope' })
)

resource application 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  signInAudience: 'AzureADMyOrg'
  web: {
    redirectUris: redirectUris
    implicitGrantSettings: {
      enableAccessTokenIssuance: false
      enableIdTokenIssuance: false
    }
  }
  requiredResourceAccess: [
    {
      resourceAppId: graphAppId
      // A property loop: the ids are runtime values of the existing service principal.
      resourceAccess: [
        for permission in requestedPermissions: {
          id: filter(permission.type == 'Role' ? graphServicePrincipal.appRoles : graphServicePrincipal.oauth2PermissionScopes, entry => entry.value == permission.name)[0].id
          type: permission.type
        }
      ]
    }
  ]

  // The managed identity's token is the client assertion: issuer is the tenant's v2.0 endpoint,
  // subject the identity's principal (object) id, audience api://AzureADTokenExchange
  // (learn.microsoft.com/graph/api/resources/federatedidentitycredential).
  resource managedIdentityCredential 'federatedIdentityCredentials@v1.0' = {
    name: '${application.uniqueName}/function-app-managed-identity'
    description: 'The presence bridge function app\'s user-assigned managed identity.'
    audiences: [
      federatedCredentialAudience
    ]
    issuer: '${environment().authentication.loginEndpoint}${tenantId}/v2.0'
    subject: managedIdentityPrincipalId
  }
}

resource servicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: application.appId
}

resource applicationConsent 'Microsoft.Graph/appRoleAssignedTo@v1.0' = [
  for permission in (grantAdminConsent ? applicationPermissions : []): {
    principalId: servicePrincipal.id
    resourceId: graphServicePrincipal.id
    appRoleId: filter(graphServicePrincipal.appRoles, role => role.value == permission)[0].id
  }
]

resource delegatedConsent 'Microsoft.Graph/oauth2PermissionGrants@v1.0' = if (grantAdminConsent) {
  clientId: servicePrincipal.id
  consentType: 'AllPrincipals'
  resourceId: graphServicePrincipal.id
  scope: join(delegatedPermissions, ' ')
}

@description('The application (client) id of the app registration.')
output appId string = application.appId

@description('The object id of the app registration.')
output objectId string = application.id

@description('The object id of the app\'s service principal (enterprise application).')
output servicePrincipalId string = servicePrincipal.id

@description('The application permissions the app requests.')
output applicationPermissions array = applicationPermissions

@description('The delegated permissions the app requests.')
output delegatedPermissions array = delegatedPermissions
