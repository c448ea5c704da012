{{- define "ztunnel.tag" -}}
{{- .Values.tag | default .Values.global.tag | default .Chart.AppVersion -}}
{{- end -}}

{{- define "ztunnel.image" -}}
{{- if contains "/" .Values.image -}}
{{ .Values.image }}
{{- else -}}
{{ .Values.hub | default .Values.global.hub }}/{{ .Values.image }}:{{ include "ztunnel.tag" . }}
{{- end -}}
{{- end -}}

{{/* istiod[-<revision>].<ns>.svc:15012 - the default CA and xDS address. */}}
{{- define "ztunnel.istiodAddress" -}}
istiod{{ if .Values.revision }}-{{ .Values.revision }}{{ end }}.{{ .Values.istioNamespace }}.svc:15012
{{- end -}}

{{- define "ztunnel.labels" -}}
app: ztunnel
istio.io/rev: {{ .Values.revision | default "default" }}
app.kubernetes.io/name: ztunnel
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: istiopy
app.kubernetes.io/version: {{ include "ztunnel.tag" . | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
