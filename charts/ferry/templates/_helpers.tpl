{{/* Names */}}
{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's objects; cluster-scoped objects (ClusterRoles, the peering,
the admission policy) carry it too, so two releases need two names. */}}
{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ferry.operator.name" -}}{{ include "ferry.fullname" . }}-operator{{- end -}}
{{- define "ferry.agent.name" -}}{{ include "ferry.fullname" . }}-agent{{- end -}}
{{- define "ferry.metadata.name" -}}{{ include "ferry.fullname" . }}-metadata{{- end -}}
{{- define "ferry.settings.name" -}}{{ include "ferry.fullname" . }}-settings{{- end -}}
{{- define "ferry.peering.name" -}}{{ default (include "ferry.fullname" .) .Values.operator.peering.name }}{{- end -}}

{{/* Full user name of a component's ServiceAccount, as the API server authenticates it. */}}
{{- define "ferry.serviceAccountUser" -}}
system:serviceaccount:{{ .root.Release.Namespace }}:{{ .name }}
{{- end -}}

{{/* Labels */}}
{{- define "ferry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
{{- end -}}

{{/* Selector labels of a component: include "ferry.selectorLabels" (dict "root" $ "component" "agent") */}}
{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ferry.componentLabels" -}}
{{ include "ferry.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Images */}}
{{- define "ferry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ferry.agent.image" -}}
{{- $repo := default .Values.image.repository .Values.agent.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.agent.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* The RuntimeClass of the launcher pods (launcher-runtimeclass.yaml): cluster-scoped, so
named after the release; empty when agent.launcherPod.overhead is. */}}
{{- define "ferry.launcherRuntimeClass" -}}
{{- if .Values.agent.launcherPod.overhead -}}{{ include "ferry.fullname" . }}-vm{{- end -}}
{{- end -}}

{{/* agent.launcherPod.deviceResources as FERRY_LAUNCHER_DEVICE_RESOURCES: name=count,... (sorted) */}}
{{- define "ferry.launcherDeviceResources" -}}
{{- $out := list -}}
{{- range $name, $count := .Values.agent.launcherPod.deviceResources -}}
{{- $out = append $out (printf "%s=%v" $name (int $count)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* A setting's value as the environment carries it: strings as they are, numbers without
an exponent (JSON form: 1000000, not 1e+06), booleans as true/false. */}}
{{- define "ferry.settingValue" -}}
{{- if kindIs "string" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{/* FERRY_* name of a camelCase setting: downtimeBudgetMs -> FERRY_DOWNTIME_BUDGET_MS */}}
{{- define "ferry.settingEnvName" -}}
FERRY_{{ . | snakecase | upper }}
{{- end -}}

{{/* Environment every ferry container gets: the settings ConfigMap (then its own env, then
extraEnv). */}}
{{- define "ferry.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "ferry.settings.name" . }}
{{- end -}}

{{/* The checksum that rolls pods when the settings change. */}}
{{- define "ferry.settingsChecksum" -}}
checksum/settings: {{ include (print $.Template.BasePath "/settings-configmap.yaml") . | sha256sum }}
{{- end -}}

{{/* A container security context for a non-root ferry process. */}}
{{- define "ferry.restrictedSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Checks the schema cannot express (it cannot compare two values). */}}
{{- define "ferry.validate" -}}
{{- $s := .Values.settings -}}
{{- if le (float64 $s.heartbeatTimeoutSeconds) (float64 $s.heartbeatSeconds) -}}
{{- fail (printf "settings.heartbeatTimeoutSeconds (%v) must be greater than settings.heartbeatSeconds (%v): otherwise every Host flaps to NotReady between heartbeats" $s.heartbeatTimeoutSeconds $s.heartbeatSeconds) -}}
{{- end -}}
{{- if and (gt (int $s.metricsPort) 0) (eq (int $s.metricsPort) (int .Values.operator.livenessPort)) -}}
{{- fail (printf "settings.metricsPort and operator.livenessPort are both %v; they need two ports" $s.metricsPort) -}}
{{- end -}}
{{- end -}}

{{/* Binding of a component's <name>-secrets ClusterRole: one ClusterRoleBinding, or one
RoleBinding per namespace listed in rbac.secretNamespaces. */}}
{{- define "ferry.secretsBinding" -}}
{{- $root := .root -}}
{{- $name := .name -}}
{{- $component := .component -}}
{{- if not $root.Values.rbac.secretNamespaces }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ $name }}-secrets
  labels:
    {{- include "ferry.componentLabels" (dict "root" $root "component" $component) | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ $name }}-secrets
subjects:
  - kind: ServiceAccount
    name: {{ $name }}
    namespace: {{ $root.Release.Namespace }}
{{- else }}
{{- range $ns := $root.Values.rbac.secretNamespaces }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ $name }}-secrets
  namespace: {{ $ns }}
  labels:
    {{- include "ferry.componentLabels" (dict "root" $root "component" $component) | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ $name }}-secrets
subjects:
  - kind: ServiceAccount
    name: {{ $name }}
    namespace: {{ $root.Release.Namespace }}
{{- end }}
{{- end }}
{{- end -}}
