{{/*
Labels of every object of one component. Call with (dict "root" $ "component" "webhook").
The selector labels are exactly the site's podLabels (app.kubernetes.io/name and /component),
which project NetworkPolicies use to reach the API and the mirror.
*/}}
{{- define "noexit.selectorLabels" -}}
app.kubernetes.io/name: noexit
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "noexit.labels" -}}
{{ include "noexit.selectorLabels" . }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/part-of: noexit
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{- define "noexit.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The in-cluster DNS name of a Service of this release. */}}
{{- define "noexit.serviceHost" -}}
{{ printf "%s.%s.svc" .name .root.Release.Namespace }}
{{- end }}

{{/* Pod-level fields shared by every Deployment. */}}
{{- define "noexit.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- /* The Secret holding the webhook's serving certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "noexit.webhookTlsSecret" -}}
{{ .Values.webhook.tls.secretName }}
{{- end }}
