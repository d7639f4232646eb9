{{/*
Names, labels, image references, the rendered sandboxd.toml, and the checks that make impossible
value combinations fail the render with a message (values.schema.json catches the rest).
*/}}

{{- define "sandboxd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sandboxd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sandboxd.exporterName" -}}
{{- printf "%s-exporter" (include "sandboxd.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sandboxd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sandboxd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sandboxd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sandboxd.labels" -}}
helm.sh/chart: {{ include "sandboxd.chart" . }}
{{ include "sandboxd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sandboxd
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "sandboxd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sandboxd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sandboxd.secretName" -}}
{{- default (include "sandboxd.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/* An image reference: repository@digest, else repository:tag, the tag defaulting to appVersion. */}}
{{- define "sandboxd.imageRef" -}}
{{- $image := index . 0 -}}
{{- $default := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $default $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "sandboxd.image" -}}
{{- include "sandboxd.imageRef" (list .Values.image .Chart.AppVersion) -}}
{{- end -}}

{{- define "sandboxd.sandboxImage" -}}
{{- include "sandboxd.imageRef" (list .Values.sandboxImage .Chart.AppVersion) -}}
{{- end -}}

{{- define "sandboxd.dindImage" -}}
{{- $dind := .Values.docker.dind -}}
{{- $tag := printf "%s-dind%s" $dind.image.version (ternary "-rootless" "" $dind.rootless) -}}
{{- include "sandboxd.imageRef" (list $dind.image $tag) -}}
{{- end -}}

{{/*
One TOML value. Helm reads every YAML number as a float, and toToml would write 4 as 4.0, so
whole numbers are written as integers; strings are JSON-quoted (a valid TOML basic string).
*/}}
{{- define "sandboxd.tomlValue" -}}
{{- if kindIs "map" . -}}
{ {{- $first := true -}}
{{- range $k, $v := . -}}
{{- if not $first }}, {{ end -}}{{- $first = false -}}
{{ toJson $k }} = {{ include "sandboxd.tomlValue" $v }}
{{- end -}} }
{{- else if kindIs "slice" . -}}
[{{- range $i, $v := . -}}{{- if $i }}, {{ end -}}{{- include "sandboxd.tomlValue" $v -}}{{- end -}}]
{{- else if kindIs "float64" . -}}
{{- if eq . (floor .) -}}{{- int64 . -}}{{- else -}}{{- . -}}{{- end -}}
{{- else if kindIs "string" . -}}
{{- toJson . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* sandboxd.toml: the chart-managed keys, then values.config. */}}
{{- define "sandboxd.configToml" -}}
# Rendered by the sandboxd Helm chart from values.config; see `sandboxd run --help`.
{{- if .Values.environmentId }}
environment_id = {{ toJson .Values.environmentId }}
{{- end }}
image = {{ include "sandboxd.sandboxImage" . | toJson }}
{{- range $key, $value := .Values.config }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "sandboxd.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The API key is needed by the exporter, and by the daemons when mountApiKey is true. */}}
{{- define "sandboxd.hasApiKey" -}}
{{- if or .Values.existingSecret .Values.secret.apiKey -}}true{{- end -}}
{{- end -}}

{{/* Impossible combinations: each fails the render with what to change. */}}
{{- define "sandboxd.validate" -}}
{{- $grace := int (default 60 .Values.config.shutdown_grace_seconds) -}}
{{- $stop := int (default 10 .Values.config.stop_timeout_seconds) -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (add $grace $stop) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed config.shutdown_grace_seconds + config.stop_timeout_seconds (%d): Kubernetes would kill the daemon while its sessions finish" (int .Values.terminationGracePeriodSeconds) (add $grace $stop)) -}}
{{- end -}}
{{- if and (eq .Values.docker.mode "hostSocket") (kindIs "invalid" .Values.docker.hostSocket.groupId) -}}
{{- fail "docker.mode=hostSocket needs docker.hostSocket.groupId: the gid that owns the engine's socket on the nodes" -}}
{{- end -}}
{{- if and (eq .Values.docker.mode "dind") (eq (int .Values.metrics.port) 2376) -}}
{{- fail "metrics.port 2376 is the dind engine's TLS port in the same pod: choose another port" -}}
{{- end -}}
{{- if and (eq .Values.docker.mode "external") (not .Values.docker.external.host) -}}
{{- fail "docker.mode=external needs docker.external.host (tcp://HOST:2376)" -}}
{{- end -}}
{{- if and (eq .Values.docker.mode "external") (not .Values.docker.external.tlsSecret) -}}
{{- fail "docker.mode=external needs docker.external.tlsSecret: the engine's API is root on its host and must not be reached without TLS client certificates" -}}
{{- end -}}
{{- if and .Values.exporter.enabled (not (include "sandboxd.hasApiKey" .)) -}}
{{- fail "exporter.enabled needs an API key: set secret.apiKey, or existingSecret with an api_key entry" -}}
{{- end -}}
{{- if and .Values.existingSecret (or .Values.secret.environmentKey .Values.secret.apiKey) -}}
{{- fail "set either existingSecret or secret.environmentKey/secret.apiKey, not both: the chart would ignore the keys" -}}
{{- end -}}
{{- if .Values.keda.enabled -}}
{{- if not .Values.keda.prometheus.serverAddress -}}
{{- fail "keda.enabled needs keda.prometheus.serverAddress" -}}
{{- end -}}
{{- if and (not .Values.keda.prometheus.query) (not .Values.environmentId) -}}
{{- fail "keda.enabled needs environmentId (or keda.prometheus.query) to build the queue-depth query" -}}
{{- end -}}
{{- if gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas) -}}
{{- fail (printf "keda.minReplicas (%d) exceeds keda.maxReplicas (%d)" (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) -}}
{{- end -}}
{{- if and (eq (int .Values.keda.minReplicas) 0) (not .Values.exporter.enabled) -}}
{{- fail "keda.minReplicas=0 needs exporter.enabled: with no daemon running, only the exporter reports the queue depth that scales the daemons back up" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.metrics.prometheusRule.enabled (not (.Files.Get "files/prometheus-rules.yaml")) -}}
{{- fail "files/prometheus-rules.yaml is missing from the chart (it links monitoring/prometheus-rules.yaml)" -}}
{{- end -}}
{{- end -}}

{{/* Pod-level scheduling fields shared by the daemon's pod spec. */}}
{{- define "sandboxd.topologySpread" -}}
{{- range .Values.topologySpreadConstraints }}
- {{ toYaml (merge (dict) . (dict "labelSelector" (dict "matchLabels" (merge (dict "app.kubernetes.io/component" "daemon") (fromYaml (include "sandboxd.selectorLabels" $))))) ) | nindent 2 | trim }}
{{- end }}
{{- end -}}
