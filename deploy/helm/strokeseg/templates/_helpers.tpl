{{/* Names and labels (the usual `helm create` shapes). */}}
{{- define "strokeseg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "strokeseg.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "strokeseg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "strokeseg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "strokeseg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "strokeseg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Ports strokeseg listens on, read from the config so the pods always match it. */}}
{{- define "strokeseg.dicomPort" -}}
{{- dig "scp" "port" 11112 .Values.config | int }}
{{- end }}
{{- define "strokeseg.scpMetricsPort" -}}
{{- dig "metrics" "scp_port" 0 .Values.config | int }}
{{- end }}
{{- define "strokeseg.workerMetricsPort" -}}
{{- dig "metrics" "worker_port" 0 .Values.config | int }}
{{- end }}

{{/* Name of the Secret with STROKESEG_DATABASE_URL / STROKESEG_BROKER_URL; empty: none. */}}
{{- define "strokeseg.urlSecret" -}}
{{- if .Values.urls.existingSecret }}
{{- .Values.urls.existingSecret }}
{{- else if or .Values.urls.database .Values.urls.broker }}
{{- printf "%s-urls" (include "strokeseg.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Refuse values that would render a deployment strokeseg cannot run. Included by every
workload template, so `helm lint` / `helm template` / `helm install` all stop here.
*/}}
{{- define "strokeseg.validate" -}}
{{- $config := .Values.config | default dict }}
{{- if and (hasKey $config "spool_dir") (ne (toString $config.spool_dir) .Values.spool.mountPath) }}
{{- fail (printf "config.spool_dir (%v) must equal spool.mountPath (%s): the chart mounts the spool there and sets STROKESEG_SPOOL_DIR; leave config.spool_dir out" $config.spool_dir .Values.spool.mountPath) }}
{{- end }}
{{- if .Values.split.enabled }}
{{- $broker := toString (get $config "broker_url" | default "") }}
{{- if not (or .Values.urls.broker .Values.urls.existingSecret (and $broker (not (regexMatch "^(sqla\\+sqlite|sqlite|filesystem|memory):" $broker)))) }}
{{- fail "split.enabled needs a shared Celery broker: set urls.broker (e.g. redis://redis:6379/0) or urls.existingSecret; the embedded SQLite broker cannot be shared between pods" }}
{{- end }}
{{- $database := toString (get $config "database_url" | default "") }}
{{- if not (or .Values.urls.database .Values.urls.existingSecret (and $database (not (hasPrefix "sqlite" $database)))) }}
{{- fail "split.enabled needs a shared database: set urls.database (postgresql+psycopg://...) or urls.existingSecret; SQLite on a shared volume is not safe across pods" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by every strokeseg pod. Argument: the root context. */}}
{{- define "strokeseg.podCommon" -}}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Env, config and spool mounts shared by every strokeseg container. Argument: root context. */}}
{{- define "strokeseg.containerCommon" -}}
env:
  - name: STROKESEG_CONFIG
    value: /etc/strokeseg/config.yaml
  - name: STROKESEG_SPOOL_DIR
    value: {{ .Values.spool.mountPath | quote }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with include "strokeseg.urlSecret" . }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
volumeMounts:
  - name: config
    mountPath: /etc/strokeseg
    readOnly: true
  - name: spool
    mountPath: {{ .Values.spool.mountPath }}
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "strokeseg.volumes" -}}
volumes:
  - name: config
    configMap:
      name: {{ include "strokeseg.fullname" . }}-config
  - name: spool
    persistentVolumeClaim:
      claimName: {{ .Values.spool.existingClaim | default (printf "%s-spool" (include "strokeseg.fullname" .)) }}
  {{- with .Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Probes on the DICOM port (SCP and serve pods). */}}
{{- define "strokeseg.scpProbes" -}}
startupProbe:
  tcpSocket:
    port: dicom
  periodSeconds: 5
  failureThreshold: {{ .Values.probes.startupFailureThreshold }}
readinessProbe:
  tcpSocket:
    port: dicom
  periodSeconds: 10
livenessProbe:
  tcpSocket:
    port: dicom
  periodSeconds: 20
  failureThreshold: 3
{{- end }}

{{/* Resources of a container that runs inference: .Values.worker.resources plus the GPUs. */}}
{{- define "strokeseg.inferenceResources" -}}
{{- $res := deepCopy (.Values.worker.resources | default dict) }}
{{- if .Values.worker.gpu.enabled }}
{{- $name := .Values.worker.gpu.resourceName | default "nvidia.com/gpu" }}
{{- $count := .Values.worker.gpu.count | int }}
{{- $_ := set $res "limits" (mergeOverwrite (get $res "limits" | default dict) (dict $name $count)) }}
{{- $_ := set $res "requests" (mergeOverwrite (get $res "requests" | default dict) (dict $name $count)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "strokeseg.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/* image: "repository:tag"; argument: dict "root" $ "image" <map with repository/tag>. */}}
{{- define "strokeseg.image" -}}
{{- $repository := .image.repository | default .root.Values.image.repository }}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- printf "%s:%s" $repository (toString $tag) }}
{{- end }}
