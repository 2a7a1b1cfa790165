metadata name = 'observability'
metadata description = 'The presence bridge dashboard (an Azure Monitor workbook) and its alert rules (log search alerts on Application Insights), all reading the metrics and spans the app emits (shared/telemetry.py).'

@description('Required. Resource id of the Application Insights component the app sends telemetry to.')
param applicationInsightsId string

@description('Required. Prefix of the alert rule names (unique within the resource group).')
@minLength(2)
param namePrefix string

@description('Optional. Location of the alert rules and the workbook.')
param location string = resourceGroup().location

@description('Optional. Tags applied to every resource.')
param tags object = {}

@description('Optional. Resource id of an action group notified when an alert fires; empty = alerts show in the portal only.')
param actionGroupId string = ''

@description('Optional. Create the alert rules enabled.')
param alertsEnabled bool = true

@description('Optional. Alert when the 95th percentile of sync latency (event reaching the app to the target write) exceeds this, in milliseconds.')
@minValue(1000)
param syncLatencyP95ThresholdMs int = 60000

@description('Optional. Alert when more Zoom writes than this fail with 5301 (person not signed in to a Zoom client) within 30 minutes.')
@minValue(1)
param zoomNotSignedInThreshold int = 50

@description('Optional. Alert when more Graph calls than this are refused with 403 within 15 minutes.')
@minValue(1)
param graphForbiddenThreshold int = 5

@description('Optional. Alert when subscription maintenance failed at least this many times within 30 minutes (it runs every 5 minutes); a broken sync account alerts on its own, at once.')
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

// Metric and span names are those of shared/telemetry.py (tests/infra/test_observability.py checks
// every name used here exists there). Application Insights stores custom metrics in customMetrics
// (a counter's value is the delta of one export interval; a histogram keeps sum/count/min/max
// only, so latency percentiles come from the presence.write spans in dependencies).

var actionGroups = empty(actionGroupId) ? [] : [
  actionGroupId
]

var alertDefinitions = [
  {
    key: 'poison-queue'
    displayName: 'Presence bridge: poison queue not empty'
    description: 'A message could not be processed and was dead-lettered (a -poison queue holds it). See docs/operations.md, "Alerts".'
    severity: 1
    frequency: 'PT5M'
    window: 'PT15M'
    query: '''
let gauge = customMetrics
| where name == 'queues.poison_messages'
| summarize messages = max(value) by queue = tostring(customDimensions['queue']);
let dead = customMetrics
| where name == 'presence.changes.dead_lettered'
| summarize messages = sum(value) by queue = tostring(customDimensions['queue']);
union gauge, dead
| summarize messages = max(messages) by queue
| where messages > 0
'''
  }
  {
    // The gauge repeats the last matching run's figure every 5 minutes: the alert stays while a run
    // holds disables and resolves after a run that holds none (the admin allowed them, or the
    // directories agree again).
    key: 'disables-held'
    displayName: 'Presence bridge: directory matching held its disables'
    description: 'The last matching run would have disabled more links than MATCHING_DISABLE_LIMIT allows, so it disabled none of them (a listing missing people, or a domain renamed on one side). See docs/operations.md, "Alerts".'
    severity: 2
    frequency: 'PT15M'
    window: 'PT30M'
    query: '''
customMetrics
| where name == 'matching.disables_held'
| summarize held = max(value)
| where held > 0
'''
  }
  {
    key: 'outage-retries'
    displayName: 'Presence bridge: changes waiting out an outage'
    description: 'Changes failed every quick attempt for an outage (a vendor, a token endpoint or storage down) and were queued again for a later round; they apply once it ends. See docs/operations.md, "Alerts".'
    severity: 2
    frequency: 'PT5M'
    window: 'PT15M'
    query: '''
customMetrics
| where name == 'presence.changes.retried_after_outage'
| summarize changes = sum(value) by queue = tostring(customDimensions['queue']), reason = tostring(customDimensions['reason'])
| where changes > 0
'''
  }
  {
    key: 'subscription-failures'
    displayName: 'Presence bridge: Graph subscription renewal failing'
    description: 'Subscription maintenance failed repeatedly: Teams changes now arrive only through the sweep (slower). See docs/operations.md, "Alerts".'
    severity: 2
    frequency: 'PT15M'
    window: 'PT30M'
    query: replace('''
customMetrics
| where name == 'subscriptions.renewal_failures' and tostring(customDimensions['reason']) != 'account_broken'
| summarize failures = sum(value) by reason = tostring(customDimensions['reason'])
| where failures >= __THRESHOLD__
''', '__THRESHOLD__', string(subscriptionFailureThreshold))
  }
  {
    // One failure of reason account_broken is recorded per account, when the planner finds it
    // broken (and the exporter sends deltas): a single one is the whole signal, so it alerts at 1.
    key: 'sync-account-broken'
    displayName: 'Presence bridge: a sync account broke'
    description: 'A connected sync account can no longer get tokens (password reset, sessions revoked, consent withdrawn); its subscriptions moved to another account or fell back to the sweep until it is connected again. See docs/operations.md, "Alerts".'
    severity: 2
    frequency: 'PT15M'
    window: 'PT30M'
    query: '''
customMetrics
| where name == 'subscriptions.renewal_failures' and tostring(customDimensions['reason']) == 'account_broken'
| summarize broken = sum(value)
| where broken >= 1
'''
  }
  {
    key: 'sync-latency'
    displayName: 'Presence bridge: sync latency p95 high'
    description: 'Presence takes too long to reach the other side. See docs/operations.md, "Alerts".'
    severity: 2
    frequency: 'PT5M'
    window: 'PT15M'
    query: replace('''
dependencies
| where name == 'presence.write'
| extend latency = todouble(customDimensions['presence.sync.latency_ms']), direction = tostring(customDimensions['direction'])
| where isnotnull(latency)
| summarize p95 = percentile(latency, 95), writes = count() by direction
| where writes >= 5 and p95 > __THRESHOLD__
''', '__THRESHOLD__', string(syncLatencyP95ThresholdMs))
  }
  {
    key: 'zoom-5301'
    displayName: 'Presence bridge: Zoom 5301 (not signed in) rate high'
    description: 'Many Zoom presence writes fail because people are not signed in to a Zoom client. See docs/operations.md, "Alerts".'
    severity: 3
    frequency: 'PT15M'
    window: 'PT30M'
    query: replace('''
customMetrics
| where name == 'presence.changes.failed' and tostring(customDimensions['reason']) == 'zoom_not_signed_in'
| summarize failures = sum(value)
| where failures > __THRESHOLD__
''', '__THRESHOLD__', string(zoomNotSignedInThreshold))
  }
  {
    key: 'graph-403'
    displayName: 'Presence bridge: Microsoft Graph refusing calls (403)'
    description: 'Graph answers 403: a permission or consent was removed, or a token lacks a scope. See docs/operations.md, "Alerts".'
    severity: 1
    frequency: 'PT5M'
    window: 'PT15M'
    query: replace('''
customMetrics
| where name == 'vendor.request.duration'
| where tostring(customDimensions['vendor']) == 'graph' and tostring(customDimensions['status']) == '403'
| summarize refused = sum(valueCount) by operation = tostring(customDimensions['operation'])
| where refused > __THRESHOLD__
''', '__THRESHOLD__', string(graphForbiddenThreshold))
  }
  {
    key: 'no-webhooks'
    displayName: 'Presence bridge: no Zoom webhook during working hours'
    description: 'No Zoom presence event reached the app for a while during working hours: the Zoom app, its event subscription or the endpoint may be broken. See docs/operations.md, "Alerts".'
    severity: 2
    frequency: 'PT15M'
    window: 'PT${noWebhookMinutes}M'
    query: replace(replace(replace('''
let local = datetime_utc_to_local(now(), '__TZ__');
let working = dayofweek(local) between (1d .. 5d) and hourofday(local) >= __START__ and hourofday(local) < __END__;
customMetrics
| where name == 'webhooks.received' and tostring(customDimensions['source']) == 'zoom'
| where tostring(customDimensions['status']) == '200'
| summarize received = count()
| where working and received == 0
''', '__TZ__', workingHoursTimeZone), '__START__', string(workingHoursStart)), '__END__', string(workingHoursEnd))
  }
]

resource alerts 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [for alert in alertDefinitions: {
  name: '${namePrefix}-${alert.key}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: alert.displayName
    description: alert.description
    severity: alert.severity
    enabled: alertsEnabled
    evaluationFrequency: alert.frequency
    windowSize: alert.window
    scopes: [
      applicationInsightsId
    ]
    criteria: {
      allOf: [
        {
          query: alert.query
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroups
    }
  }
}]

// --- the workbook ----------------------------------------------------------------------------------

var changesQuery = '''
customMetrics
| where name startswith 'presence.changes.'
| extend direction = tostring(customDimensions['direction'])
| summarize changes = sum(value) by bin(timestamp, 5m), series = strcat(replace_string(name, 'presence.changes.', ''), ' ', direction)
| render timechart
'''

var latencyQuery = '''
dependencies
| where name == 'presence.write'
| extend latency = todouble(customDimensions['presence.sync.latency_ms']), direction = tostring(customDimensions['direction'])
| where isnotnull(latency)
| summarize p50 = percentile(latency, 50), p95 = percentile(latency, 95) by bin(timestamp, 5m), direction
| render timechart
'''

var averageLatencyQuery = '''
customMetrics
| where name == 'presence.sync.latency'
| summarize average_ms = sum(valueSum) / sum(valueCount), max_ms = max(valueMax), writes = sum(valueCount) by direction = tostring(customDimensions['direction'])
'''

var figuresQuery = '''
customMetrics
| where timestamp > ago(1d)
| where name in ('presence.changes.observed', 'presence.changes.written', 'presence.changes.suppressed_echo', 'presence.changes.dropped_stale', 'presence.changes.coalesced', 'presence.changes.dead_lettered', 'presence.changes.retried_after_outage', 'presence.changes.failed')
| summarize total = sum(value) by name, direction = tostring(customDimensions['direction']), reason = tostring(customDimensions['reason'])
| order by name asc, total desc
'''

var vendorQuery = '''
customMetrics
| where name == 'vendor.request.duration'
| summarize calls = sum(valueCount), average_ms = sum(valueSum) / sum(valueCount), max_ms = max(valueMax) by vendor = tostring(customDimensions['vendor']), operation = tostring(customDimensions['operation']), status = tostring(customDimensions['status'])
| order by calls desc
'''

var healthQuery = '''
customMetrics
| where name in ('subscriptions.count', 'subscriptions.nearest_expiry_seconds', 'connections.count', 'links.count', 'queues.poison_messages', 'matching.disables_held')
| extend label = coalesce(tostring(customDimensions['state']), tostring(customDimensions['health']), tostring(customDimensions['queue']), '')
| summarize arg_max(timestamp, value) by name, label
| project name, label, value, as_of = timestamp
| order by name asc, label asc
'''

var webhooksQuery = '''
customMetrics
| where name in ('webhooks.received', 'subscriptions.renewal_failures')
| summarize n = sum(value) by bin(timestamp, 15m), series = strcat(name, ' ', tostring(customDimensions['source']), tostring(customDimensions['reason']), ' ', tostring(customDimensions['status']))
| render timechart
'''

var panels = [
  {
    title: 'Changes per direction (observed, written, echoes suppressed, stale dropped, coalesced, dead-lettered, failed)'
    query: changesQuery
    visualization: 'timechart'
  }
  {
    title: 'Sync latency p50 / p95 (ms): the event reaching the app to the target write'
    query: latencyQuery
    visualization: 'timechart'
  }
  {
    title: 'Sync latency per direction (ms)'
    query: averageLatencyQuery
    visualization: 'table'
  }
  {
    title: 'Changes in the last day by direction and reason'
    query: figuresQuery
    visualization: 'table'
  }
  {
    title: 'Vendor calls: Zoom, Graph, Entra by operation and status'
    query: vendorQuery
    visualization: 'table'
  }
  {
    title: 'Subscriptions, connections, links, poison queues, disables held by matching (latest)'
    query: healthQuery
    visualization: 'table'
  }
  {
    title: 'Webhooks received and subscription renewal failures'
    query: webhooksQuery
    visualization: 'timechart'
  }
]

var panelItems = [for (panel, i) in panels: {
  type: 3
  name: 'panel-${i}'
  content: {
    version: 'KqlItem/1.0'
    title: panel.title
    query: panel.query
    size: 0
    queryType: 0
    resourceType: 'microsoft.insights/components'
    visualization: panel.visualization
    timeContext: {
      durationMs: 86400000
    }
  }
}]

var introItem = {
  type: 1
  name: 'intro'
  content: {
    json: '## Presence bridge\nIs the sync healthy, how fresh is it, who is failing and why, and is anything about to break. What each alert means: docs/operations.md.'
  }
}

var workbookContent = {
  version: 'Notebook/1.0'
  items: concat([
    introItem
  ], panelItems)
  fallbackResourceIds: [
    applicationInsightsId
  ]
  '$schema': 'https://github.com/Microsoft/Application-Insights-Workbooks/blob/master/schema/workbook.json'
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, applicationInsightsId, 'presence-bridge-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'Presence bridge'
    category: 'workbook'
    sourceId: applicationInsightsId
    serializedData: string(workbookContent)
    version: 'Notebook/1.0'
  }
}

// Standard module outputs (Azure Verified Modules): the workbook is the module's primary resource.
@description('The name of the workbook.')
output name string = workbook.name

@description('The resource id of the workbook.')
output resourceId string = workbook.id

@description('The resource group the workbook and alert rules were deployed into.')
output resourceGroupName string = resourceGroup().name

@description('The location of the workbook and alert rules.')
output location string = workbook.location

@description('The resource id of the workbook (the same as resourceId).')
output workbookId string = workbook.id

@description('The names of the alert rules.')
output alertRuleNames array = [for (alert, i) in alertDefinitions: alerts[i].name]

@description('The resource ids of the alert rules.')
output alertRuleResourceIds array = [for (alert, i) in alertDefinitions: alerts[i].id]
