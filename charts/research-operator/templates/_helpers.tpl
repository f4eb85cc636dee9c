{{/*
The chart name, or nameOverride.
*/}}
{{- define "research-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The fully qualified app name: the release name, plus the chart name unless the release name
already contains it; at most 63 characters (DNS label). fullnameOverride replaces it.
The model server's objects append "-modelserver", so this leaves room for that suffix.
*/}}
{{- define "research-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 51 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 51 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 51 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "research-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object of the release.
*/}}
{{- define "research-operator.labels" -}}
helm.sh/chart: {{ include "research-operator.chart" . }}
{{ include "research-operator.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: research-operator
{{- end }}

{{/*
Selector labels: name and instance only (immutable in a Deployment's selector, so nothing that
changes between releases). Each workload adds app.kubernetes.io/component so that the operator's
and the model server's Services never select each other's pods.
*/}}
{{- define "research-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "research-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "research-operator.operatorSelectorLabels" -}}
{{ include "research-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "research-operator.modelServerSelectorLabels" -}}
{{ include "research-operator.selectorLabels" . }}
app.kubernetes.io/component: modelserver
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "research-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "research-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest if a digest is given, else repository:tag (tag defaults
to the chart's appVersion).
*/}}
{{- define "research-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "research-operator.settingsConfigMapName" -}}
{{- printf "%s-settings" (include "research-operator.fullname" .) }}
{{- end }}

{{- /* The ValidatingAdmissionPolicy and its binding (cluster-scoped, one pair per release). */ -}}
{{- define "research-operator.admissionPolicyName" -}}
{{- printf "%s-tenancy" (include "research-operator.fullname" .) }}
{{- end }}

{{- define "research-operator.modelServerName" -}}
{{- printf "%s-modelserver" (include "research-operator.fullname" .) }}
{{- end }}

{{- define "research-operator.leaseName" -}}
{{- default (printf "%s-leader" (include "research-operator.fullname" .)) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/*
The model endpoint workers use when a ResearchJob sets no spec.model.baseUrl:
settings.defaultModelBaseUrl if set; else the bundled model server (modelServer.baseUrl if set,
else its Service's cluster DNS name). With neither, rendering fails with what to set.
*/}}
{{- define "research-operator.defaultModelBaseUrl" -}}
{{- if .Values.settings.defaultModelBaseUrl }}
{{- .Values.settings.defaultModelBaseUrl }}
{{- else if .Values.modelServer.enabled }}
{{- if .Values.modelServer.baseUrl }}
{{- .Values.modelServer.baseUrl }}
{{- else }}
{{- printf "http://%s.%s.svc:%d/v1" (include "research-operator.modelServerName" .) .Release.Namespace (int .Values.modelServer.service.port) }}
{{- end }}
{{- else }}
{{- fail "modelServer.enabled is false, so set settings.defaultModelBaseUrl to your OpenAI-compatible endpoint (for example https://api.openai.com/v1); ResearchJobs may still override it with spec.model.baseUrl" }}
{{- end }}
{{- end }}

{{/*
The image worker Jobs run: settings.workerImage, else the operator's own image.
*/}}
{{- define "research-operator.workerImage" -}}
{{- default (include "research-operator.image" .) .Values.settings.workerImage }}
{{- end }}

{{/*
The egress rules of the worker pods' NetworkPolicy (networkPolicy.workers), as JSON: DNS anywhere
in the cluster, the lease broker (the operator's pods) and the bundled model server, then the
rules admins add (the API server, model endpoints, search, PostgreSQL).
*/}}
{{- define "research-operator.workerEgress" -}}
{{- $rules := list -}}
{{- $dns := dict "to" (list (dict "namespaceSelector" (dict) "podSelector" (dict "matchLabels" .Values.networkPolicy.workers.dnsPodLabels))) "ports" (list (dict "port" 53 "protocol" "UDP") (dict "port" 53 "protocol" "TCP")) -}}
{{- $rules = append $rules $dns -}}
{{- $release := dict "kubernetes.io/metadata.name" .Release.Namespace -}}
{{- if .Values.operator.leaseBroker.enabled -}}
{{- $operator := fromYaml (include "research-operator.operatorSelectorLabels" .) -}}
{{- $rules = append $rules (dict "to" (list (dict "namespaceSelector" (dict "matchLabels" $release) "podSelector" (dict "matchLabels" $operator))) "ports" (list (dict "port" (int .Values.operator.leaseBroker.port) "protocol" "TCP"))) -}}
{{- end -}}
{{- if .Values.modelServer.enabled -}}
{{- $model := fromYaml (include "research-operator.modelServerSelectorLabels" .) -}}
{{- $rules = append $rules (dict "to" (list (dict "namespaceSelector" (dict "matchLabels" $release) "podSelector" (dict "matchLabels" $model))) "ports" (list (dict "port" (int .Values.modelServer.port) "protocol" "TCP"))) -}}
{{- end -}}
{{- concat $rules .Values.networkPolicy.workers.egress | toJson -}}
{{- end }}
