{{/*
The chart's name, or nameOverride.
*/}}
{{- define "geoml.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of the operator's objects: fullnameOverride, else "<release>-operator"
when the release name already contains the chart's name (release "geoml" gives
"geoml-operator"), else "<release>-<chart>-operator". Truncated to 63
characters, as DNS labels must be.
*/}}
{{- define "geoml.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s-operator" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "geoml.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels every object of the chart carries.
*/}}
{{- define "geoml.labels" -}}
helm.sh/chart: {{ include "geoml.chart" . }}
{{ include "geoml.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: geoml
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels that select the operator's pods (never change them on upgrade: a
Deployment's selector is immutable).
*/}}
{{- define "geoml.selectorLabels" -}}
app.kubernetes.io/name: {{ include "geoml.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "geoml.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "geoml.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {registry, repository, tag, digest}; the tag defaults
to the chart's appVersion, a digest wins over the tag.
*/}}
{{- define "geoml.image" -}}
{{- $ref := .image.repository }}
{{- with .image.registry }}
{{- $ref = printf "%s/%s" . $ref }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $ref .image.digest }}
{{- else }}
{{- printf "%s:%s" $ref (.image.tag | default .chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The operator's image.
*/}}
{{- define "geoml.operatorImage" -}}
{{- include "geoml.image" (dict "image" .Values.image "chart" .Chart) }}
{{- end }}

{{/*
The image of TrainingJob pods that do not name one.
*/}}
{{- define "geoml.jobImage" -}}
{{- include "geoml.image" (dict "image" .Values.jobImage "chart" .Chart) }}
{{- end }}
