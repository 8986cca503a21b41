{{/* Chart name, truncated to a DNS label. */}}
{{- define "ssegate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of every object: the release name, plus the chart name unless it already contains it. */}}
{{- define "ssegate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels selecting the ssegate pods (stable across upgrades: never add to these). */}}
{{- define "ssegate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ssegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "ssegate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ssegate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ssegate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Name of the ServiceAccount ssegate runs as. */}}
{{- define "ssegate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ssegate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The container image: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "ssegate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Replicas that run at the least: decides whether a PodDisruptionBudget makes sense. */}}
{{- define "ssegate.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.minReplicas }}{{ else }}{{ .Values.replicaCount }}{{ end }}
{{- end }}

{{/*
The pod's terminationGracePeriodSeconds: ssegate exits by --grace-period after SIGTERM (it
drains by itself, no preStop hook), so the kubelet's SIGKILL comes a margin later.
*/}}
{{- define "ssegate.terminationGracePeriodSeconds" -}}
{{- $d := .Values.drain }}
{{- if le (int $d.gracePeriodSeconds) (int $d.delaySeconds) }}
{{- fail (printf "drain.gracePeriodSeconds (%d) must be greater than drain.delaySeconds (%d): streams are closed between the two" (int $d.gracePeriodSeconds) (int $d.delaySeconds)) }}
{{- end }}
{{- add (int $d.gracePeriodSeconds) (int $d.terminationMarginSeconds) }}
{{- end }}

{{/* host:port of a listener. */}}
{{- define "ssegate.bind" -}}
{{- printf "%s:%d" .addr (int .port) }}
{{- end }}

{{/*
The `ssegate run` flags, one `--flag=value` string each, from the values. This is the one
place that knows the binary's flag names: to wire a new flag, add one `(list "flag-name" value)`
line below; an empty value ("" or nil) leaves the flag out, so the binary's default applies.
A list value repeats the flag once per element. The e2e suite starts ssegate with exactly
these arguments (read back from the rendered Deployment), and scripts/test checks every flag
of every rendered values file against `ssegate run --help`, so a flag renamed in the binary
but not here fails the test command.
*/}}
{{- define "ssegate.flags" -}}
{{- $v := .Values }}
{{- $c := $v.controller }}
{{- $flags := list
  (list "listen" (include "ssegate.bind" (dict "addr" $c.bindAddress "port" $v.ports.http.containerPort)))
  (list "admin" (include "ssegate.bind" (dict "addr" $c.bindAddress "port" $v.ports.admin.containerPort)))
  (list "class" $c.className)
  (list "log-format" $c.logFormat)
  (list "namespace" $c.watchNamespaces)
  (list "lease-namespace" .Release.Namespace)
  (list "lease-name" $v.leaderElection.leaseName)
  (list "lease-duration" $v.leaderElection.leaseDuration)
  (list "lease-renew-deadline" $v.leaderElection.renewDeadline)
  (list "lease-retry-period" $v.leaderElection.retryPeriod)
  (list "listen-tls" (ternary (include "ssegate.bind" (dict "addr" $c.bindAddress "port" $v.ports.https.containerPort)) "off" $v.tls.enabled))
  (list "https-port" (ternary $v.ports.https.servicePort "" $v.tls.enabled))
  (list "default-cert-secret" (ternary $v.tls.defaultCertSecret "" $v.tls.enabled))
  (list "h2-max-concurrent-streams" $v.http2.maxConcurrentStreams)
  (list "h2-keepalive-interval" $v.http2.keepaliveInterval)
  (list "workers" $c.workers)
  (list "drain-delay" (printf "%ds" (int $v.drain.delaySeconds)))
  (list "drain-window" (printf "%ds" (int $v.drain.windowSeconds)))
  (list "grace-period" (printf "%ds" (int $v.drain.gracePeriodSeconds)))
}}
{{- range $flags }}
{{- $name := index . 0 }}
{{- $value := index . 1 }}
{{- if kindIs "float64" $value }}{{ $value = int64 $value }}{{ end }}
{{- if kindIs "slice" $value }}
{{- range $value }}
- {{ printf "--%s=%v" $name . | quote }}
{{- end }}
{{- else if not (or (kindIs "invalid" $value) (eq (toString $value) "")) }}
- {{ printf "--%s=%v" $name $value | quote }}
{{- end }}
{{- end }}
{{- range $c.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
