{{/* Labels every object of this chart carries (Istio's istio.io/rev plus the Helm recommended ones). */}}
{{- define "base.labels" -}}
app.kubernetes.io/name: istiopy-base
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: istiopy
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The istiod Service a revision is served by: istiod, or istiod-<rev>. */}}
{{- define "base.istiodService" -}}
{{- if or (eq .Values.defaultRevision "default") (eq .Values.defaultRevision "") -}}
istiod
{{- else -}}
istiod-{{ .Values.defaultRevision }}
{{- end -}}
{{- end -}}
