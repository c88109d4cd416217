{{- define "push.labels" -}}
app.kubernetes.io/part-of: push
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "push.securityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "push.secretEnv" -}}
- name: PUSH_AUTH_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.existingSecret }}
      key: {{ .Values.secrets.authSecretKey }}
- name: PUSH_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.existingSecret }}
      key: {{ .Values.secrets.adminTokenKey }}
{{- end -}}

{{- /* The registry URL: from a Secret when registry.urlSecret.name is set, else the plain value. */ -}}
{{- define "push.registryEnv" -}}
- name: {{ .name }}
{{- if .root.Values.registry.urlSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.registry.urlSecret.name }}
      key: {{ .root.Values.registry.urlSecret.key }}
{{- else }}
  value: {{ required "registry.url (or registry.urlSecret.name) is required" .root.Values.registry.url | quote }}
{{- end }}
{{- end -}}
