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

{{- define "sandboxd.runtimeImage" -}}
{{- include "sandboxd.imageRef" (list .Values.runtimeImage .Chart.AppVersion) -}}
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
runtime_image = {{ include "sandboxd.runtimeImage" . | toJson }}
network_mode = {{ toJson .Values.networkMode }}
egress_allowed_hosts = {{ include "sandboxd.tomlValue" .Values.egress.allowedHosts }}
egress_audit = {{ .Values.egress.audit }}
shutdown_mode = {{ toJson .Values.shutdownMode }}
warm_pool_size = {{ include "sandboxd.tomlValue" .Values.warmPoolSize }}
warm_pool_max_age_seconds = {{ include "sandboxd.tomlValue" .Values.warmPoolMaxAgeSeconds }}
workspace_retention_seconds = {{ include "sandboxd.tomlValue" .Values.workspaceRetentionSeconds }}
workspace_store_max_bytes = {{ include "sandboxd.tomlValue" .Values.workspaceStoreMaxBytes }}
{{- if include "sandboxd.workspaceStoreClaim" . }}
workspace_store_dir = {{ printf "%s/workspaces" .Values.workspaceStore.mountPath | toJson }}
{{- end }}
{{- if eq .Values.docker.mode "dind" }}
socket_dir = {{ include "sandboxd.dindSocketDir" . | toJson }}
{{- end }}
{{- range $key, $value := .Values.config }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "sandboxd.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The claim holding the shared workspace store, or nothing when the store is pod-local. */}}
{{- define "sandboxd.workspaceStoreClaim" -}}
{{- if .Values.workspaceStore.existingClaim -}}
{{- .Values.workspaceStore.existingClaim -}}
{{- else if .Values.workspaceStore.create -}}
{{- printf "%s-workspaces" (include "sandboxd.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
The broker and proxy sockets. The engine bind-mounts socket_dir into each sandbox, so the path
must name the same directory on the engine's filesystem as in the daemon: in dind an emptyDir
mounted at the same path in both containers (not under /run, which rootless dind copies up), in
hostSocket a directory of the node mounted at its own path. socket_dir is a subdirectory the
daemon creates, so the daemon owns it (it sets its mode).
*/}}
{{- define "sandboxd.dindSocketDir" -}}/var/lib/sandboxd-channels/run{{- end -}}
{{- define "sandboxd.hostSocketDir" -}}
{{- default (printf "/run/sandboxd/%s" (include "sandboxd.fullname" .)) .Values.docker.hostSocket.socketDir -}}
{{- end -}}

{{/*
The daemon's identity on the engine (worker_id, the sandboxes' instance label) with
shutdownMode=handoff: stable across pods, so the successor of a pod adopts what it left. Per node
in hostSocket mode (one pod per node), per release in external mode (one pod per engine). Empty
with drain: each pod is its own instance (its hostname).
*/}}
{{- define "sandboxd.handoffIdentity" -}}
{{- if eq .Values.shutdownMode "handoff" -}}
{{- printf "%s-%s" .Release.Namespace (include "sandboxd.fullname" .) -}}
{{- if eq .Values.docker.mode "hostSocket" -}}-$(NODE_NAME){{- end -}}
{{- end -}}
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
{{- if and (eq .Values.docker.mode "dind") .Values.docker.dind.rootless (not .Values.config.allow_unenforced_limits) -}}
{{- fail "docker.dind.rootless=true trades the per-sandbox memory, pids and CPU limits away (a rootless engine in a pod has no cgroup delegation and drops them), and the daemon refuses sessions without them. Set config.allow_unenforced_limits=true to run that way (docker.dind.resources then bound all sandboxes of a pod together), or docker.dind.rootless=false (a root engine that enforces them)" -}}
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
{{- if and (eq .Values.docker.mode "external") (eq .Values.networkMode "none") -}}
{{- fail "docker.mode=external with networkMode=none: the API broker and the egress proxy are unix sockets the engine bind-mounts into sandboxes, and a remote engine cannot mount them, so its sandboxes could not even reach the API. Set networkMode to an opted-out mode (bridge or a Docker network of the engine's host) and enforce egress there yourself" -}}
{{- end -}}
{{- if eq .Values.shutdownMode "handoff" -}}
{{- if eq .Values.docker.mode "dind" -}}
{{- fail "shutdownMode=handoff with docker.mode=dind: the pod's engine, and every sandbox on it, dies with the pod, so there is nothing to hand off. Use shutdownMode=drain, or docker.mode hostSocket or external" -}}
{{- end -}}
{{- $rolling := .Values.updateStrategy.rollingUpdate | default dict -}}
{{- $surge := ternary (toString $rolling.maxSurge) "25%" (hasKey $rolling "maxSurge") -}}
{{- if and (ne (toString .Values.updateStrategy.type) "Recreate") (not (has $surge (list "0" "0%"))) -}}
{{- fail "shutdownMode=handoff needs updateStrategy without surge (type Recreate, or rollingUpdate.maxSurge 0 with maxUnavailable 1): a pod's successor takes over its sandboxes under the same identity and must not run beside it" -}}
{{- end -}}
{{- if .Values.keda.enabled -}}
{{- fail "shutdownMode=handoff with keda.enabled: a scale-down would hand running sessions to a daemon that never comes. Use shutdownMode=drain with KEDA" -}}
{{- end -}}
{{- if and (eq .Values.docker.mode "external") (gt (int .Values.replicas) 1) -}}
{{- fail (printf "shutdownMode=handoff with docker.mode=external needs replicas 1 (not %d): the daemons of a release share one identity on the engine; run one release per daemon" (int .Values.replicas)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.workspaceStore.existingClaim .Values.workspaceStore.create -}}
{{- fail "set either workspaceStore.existingClaim or workspaceStore.create, not both" -}}
{{- end -}}
{{- if and (eq .Values.docker.mode "hostSocket") (gt (add (len (include "sandboxd.hostSocketDir" .)) (len (include "sandboxd.fullname" .)) 30) 107) -}}
{{- fail (printf "docker.hostSocket.socketDir %q is too long: with the pod's subdirectory and egress.sock the socket path would exceed the 107 bytes of a unix socket address; choose a shorter directory or fullnameOverride" (include "sandboxd.hostSocketDir" .)) -}}
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

{{/*
The daemon pods' affinity: values.affinity, plus (hostSocket + handoff) one pod of the release per
node, since the pods of a node share its engine and, with handoff, their identity on it.
*/}}
{{- define "sandboxd.affinity" -}}
{{- $affinity := deepCopy (.Values.affinity | default dict) -}}
{{- if and (eq .Values.docker.mode "hostSocket") (eq .Values.shutdownMode "handoff") -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (merge (dict "app.kubernetes.io/component" "daemon") (fromYaml (include "sandboxd.selectorLabels" .)))) -}}
{{- $anti := get $affinity "podAntiAffinity" | default dict -}}
{{- $required := get $anti "requiredDuringSchedulingIgnoredDuringExecution" | default list -}}
{{- $_ := set $anti "requiredDuringSchedulingIgnoredDuringExecution" (append $required $term) -}}
{{- $_ := set $affinity "podAntiAffinity" $anti -}}
{{- end -}}
{{- if $affinity }}{{ toYaml $affinity }}{{ end -}}
{{- end -}}

{{/*
The TCP ports the pods reach with networkMode none, as a JSON list of numbers: 443, the ports of
base_url and sandbox_base_url (where the broker forwards), the external engine's, 22 for ssh git URLs, what egress.allowedHosts entries name (a bare or
wildcard entry means 80 and 443), and networkPolicy.egressPorts.
*/}}
{{- define "sandboxd.egressPorts" -}}
{{- $ports := list 443 -}}
{{- range list .Values.config.base_url .Values.config.sandbox_base_url -}}
{{- if . -}}
{{- $url := urlParse . -}}
{{- $suffix := regexFind ":[0-9]+$" $url.host -}}
{{- $ports = append $ports (ternary (trimPrefix ":" $suffix | atoi) (ternary 80 443 (eq $url.scheme "http")) (ne $suffix "")) -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.docker.mode "external" -}}
{{- $ports = append $ports (regexFind "[0-9]+$" .Values.docker.external.host | atoi) -}}
{{- end -}}
{{- if .Values.config.git_ssh_key_files -}}
{{- $ports = append $ports 22 -}}
{{- end -}}
{{- range .Values.egress.allowedHosts -}}
{{- $suffix := regexFind ":[0-9]+$" . -}}
{{- if $suffix -}}
{{- $ports = append $ports (trimPrefix ":" $suffix | atoi) -}}
{{- else -}}
{{- $ports = append $ports 80 -}}
{{- end -}}
{{- end -}}
{{- range .Values.networkPolicy.egressPorts -}}
{{- $ports = append $ports (int .) -}}
{{- end -}}
{{- $padded := list -}}
{{- range uniq $ports -}}{{- $padded = append $padded (printf "%05d" (int .)) -}}{{- end -}}
{{- $sorted := list -}}
{{- range sortAlpha $padded -}}{{- $sorted = append $sorted (atoi .) -}}{{- end -}}
{{- toJson $sorted -}}
{{- end -}}
