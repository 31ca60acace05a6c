{{/* The chart's name, or nameOverride. */}}
{{- define "instream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object: fullnameOverride, or <release>-<name> (the release alone
     when it already holds the name). */}}
{{- define "instream.fullname" -}}
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

{{/* The full name with a suffix, kept within Kubernetes' 63 characters: (list $ "suffix"). */}}
{{- define "instream.nameWith" -}}
{{- $suffix := index . 1 -}}
{{- $prefix := include "instream.fullname" (index . 0) | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $prefix $suffix -}}
{{- end -}}

{{/* Labels of every object (the recommended app.kubernetes.io set). */}}
{{- define "instream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "instream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: instream
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* What selects one service's pods: call with (dict "root" $ "component" $name). */}}
{{- define "instream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "instream.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one service's objects: (dict "root" $ "component" $name). */}}
{{- define "instream.componentLabels" -}}
{{ include "instream.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "instream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "instream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "instream.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Whether the chart makes the ingest API key: ingest runs, the config names no key and does
     not allow anonymous producers, and generation is on. */}}
{{- define "instream.generatesIngestKey" -}}
{{- $ingest := default dict .Values.config.ingest -}}
{{- if and .Values.services.ingest.enabled .Values.ingestApiKey.generate (not .Values.configToml) (not $ingest.api_keys) (not $ingest.allow_anonymous) -}}
true
{{- end -}}
{{- end -}}

{{- define "instream.ingestKeySecretName" -}}
{{- include "instream.nameWith" (list . "ingest-key") -}}
{{- end -}}

{{/* The generated ingest key: the one already in the cluster (kept across upgrades), or a new
     random one. */}}
{{- define "instream.ingestKey" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "instream.ingestKeySecretName" .) -}}
{{- if and $existing $existing.data (index $existing.data "api-key") -}}
{{- index $existing.data "api-key" | b64dec -}}
{{- else -}}
{{- if not (hasKey .Values.ingestApiKey "_generated") -}}
{{- $_ := set .Values.ingestApiKey "_generated" (randAlphaNum 40) -}}
{{- end -}}
{{- .Values.ingestApiKey._generated -}}
{{- end -}}
{{- end -}}

{{/* The platform config as JSON (instream reads *.json as JSON): `config` from the values, with
     the generated ingest key's digest when the chart makes one. JSON keeps YAML's integers
     integers, which Helm's TOML rendering turns into floats instream refuses. */}}
{{- define "instream.configJson" -}}
{{- $config := deepCopy (default dict .Values.config) -}}
{{- if include "instream.generatesIngestKey" . -}}
{{- $ingest := default dict $config.ingest -}}
{{- $key := dict "name" "generated" "sha256" (include "instream.ingestKey" . | sha256sum) -}}
{{- $_ := set $ingest "api_keys" (list $key) -}}
{{- $_ := set $config "ingest" $ingest -}}
{{- end -}}
{{- toPrettyJson $config -}}
{{- end -}}

{{/* The config file's name in the ConfigMap. */}}
{{- define "instream.configFile" -}}
{{- if .Values.configToml -}}instream.toml{{- else -}}instream.json{{- end -}}
{{- end -}}

{{/* The settings a hook or test container shares with the services' containers. */}}
{{- define "instream.hookContainer" -}}
{{- with .Values.defaults.extraEnv }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.defaults.extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
resources:
  {{- toYaml .Values.hookJob.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: config
    mountPath: /etc/instream
    readOnly: true
  {{- if .Values.pipelines }}
  - name: pipelines
    mountPath: /etc/instream-pipelines
    readOnly: true
  {{- end }}
  {{- range .Values.secretFiles }}
  - name: secret-{{ .secret }}
    mountPath: /var/run/secrets/instream/{{ .secret }}
    readOnly: true
  {{- end }}
  {{- with .Values.defaults.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The pod-level settings a hook or test pod shares with the services' pods: scheduling,
     and the volumes the config's paths (CA files, Hadoop configuration) come from. */}}
{{- define "instream.hookPodScheduling" -}}
{{- with .Values.defaults.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.defaults.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "instream.hookVolumes" -}}
- name: config
  configMap:
    name: {{ include "instream.nameWith" (list . "config") }}
{{- if .Values.pipelines }}
- name: pipelines
  configMap:
    name: {{ include "instream.nameWith" (list . "pipelines") }}
{{- end }}
{{- range .Values.secretFiles }}
- name: secret-{{ .secret }}
  secret:
    secretName: {{ .secret }}
{{- end }}
{{- with .Values.defaults.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}
