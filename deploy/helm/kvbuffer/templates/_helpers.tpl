{{/* Names, labels and images shared by the templates. */}}

{{- define "kvbuffer.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The direct server's name: its Deployment, ConfigMap and Services (NAME, NAME-headless) as the operator names them. */}}
{{- define "kvbuffer.serverName" -}}
{{- include "kvbuffer.fullname" . | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvbuffer.operatorName" -}}
{{- printf "%s-operator" (include "kvbuffer.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "kvbuffer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: kvbuffer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvbuffer
{{- end -}}

{{/* Pod labels of the direct server: those of an operator-managed KVBufferService's pods (CONTRACTS.md), so the
ServiceMonitor, dashboard and alerts see both alike; managed-by says who made it. */}}
{{- define "kvbuffer.serverSelectorLabels" -}}
app.kubernetes.io/name: kvbuffer
app.kubernetes.io/instance: {{ include "kvbuffer.serverName" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "kvbuffer.operatorSelectorLabels" -}}
app.kubernetes.io/name: kvbuffer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kvbuffer.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "kvbuffer.cpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.cpuTag | default (printf "%s-cpu" .Chart.AppVersion)) -}}
{{- end -}}

{{/* The image of a serving pod with `gpus` GPUs. */}}
{{- define "kvbuffer.serverImage" -}}
{{- if gt (int .gpus) 0 -}}{{ include "kvbuffer.gpuImage" .root }}{{- else -}}{{ include "kvbuffer.cpuImage" .root }}{{- end -}}
{{- end -}}

{{/* Restricted pod security: non-root, no privilege escalation, every capability dropped, read-only root. */}}
{{- define "kvbuffer.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "kvbuffer.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Names of the services this release serves (its KVBufferServices and the direct server). */}}
{{- define "kvbuffer.servedNames" -}}
{{- $names := list -}}
{{- range .Values.services }}{{ $names = append $names .name }}{{ end -}}
{{- if .Values.server.enabled }}{{ $names = append $names (include "kvbuffer.serverName" .) }}{{ end -}}
{{- toJson $names -}}
{{- end -}}

{{/* DNS name of the direct server's Service, which its TLS certificate must carry unless tls.serverName says otherwise. */}}
{{- define "kvbuffer.tlsServerName" -}}
{{- .Values.tls.serverName | default (printf "%s.%s.svc" (include "kvbuffer.serverName" .) .Release.Namespace) -}}
{{- end -}}

{{/* The health probe of a serving pod: Kubernetes' native gRPC probe (grpc.health.v1) on plaintext; it speaks no TLS,
so with TLS the pod runs the same check over TLS itself (kvbuffer.service.server.health_check). */}}
{{- define "kvbuffer.healthProbe" -}}
{{- if .Values.tls.secretName -}}
exec:
  command:
    - python3
    - -m
    - kvbuffer.service.server.health_check
    - 127.0.0.1:50051
    - --ca-file
    - /etc/kvbuffer/tls/{{ .Values.tls.caKey }}
    - --server-name
    - {{ include "kvbuffer.tlsServerName" . }}
timeoutSeconds: 10
{{- else -}}
grpc:
  port: 50051
  service: kvbuffer.v1.KVBufferService
timeoutSeconds: 5
{{- end -}}
{{- end -}}
