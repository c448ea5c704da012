{{/* istiod, or istiod-<revision>: the name of the Deployment, Service, ServiceAccount and friends. */}}
{{- define "istiod.name" -}}
{{- if .Values.revision -}}istiod-{{ .Values.revision }}{{- else -}}istiod{{- end -}}
{{- end -}}

{{/* "-<revision>" or "" for names that embed the revision in the middle (Istio's naming). */}}
{{- define "istiod.revSuffix" -}}
{{- if .Values.revision -}}-{{ .Values.revision }}{{- end -}}
{{- end -}}

{{- define "istiod.rev" -}}
{{- .Values.revision | default "default" -}}
{{- end -}}

{{- define "istiod.tag" -}}
{{- .Values.tag | default .Values.global.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* <hub>/<image>:<tag>, unless the image is already a full reference (contains a slash). */}}
{{- define "istiod.image" -}}
{{- if contains "/" .Values.image -}}
{{ .Values.image }}
{{- else -}}
{{ .Values.hub | default .Values.global.hub }}/{{ .Values.image }}:{{ include "istiod.tag" . }}
{{- end -}}
{{- end -}}

{{- define "istiod.waypointImage" -}}
{{- if contains "/" .Values.waypoint.image -}}
{{ .Values.waypoint.image }}
{{- else -}}
{{ .Values.hub | default .Values.global.hub }}/{{ .Values.waypoint.image }}:{{ include "istiod.tag" . }}
{{- end -}}
{{- end -}}

{{- define "istiod.labels" -}}
app: istiod
istio.io/rev: {{ include "istiod.rev" . }}
app.kubernetes.io/name: istiod
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: istiopy
app.kubernetes.io/version: {{ include "istiod.tag" . | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "istiod.selectorLabels" -}}
app: istiod
istio.io/rev: {{ include "istiod.rev" . }}
{{- end -}}
