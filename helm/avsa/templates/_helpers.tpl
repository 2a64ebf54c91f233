{{/* Names: Kubernetes object names are DNS labels of at most 63 characters. */}}
{{- define "avsa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "avsa.fullname" -}}
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

{{/* KubeRay rejects RayCluster names longer than 53 characters (it derives pod names from them). */}}
{{- define "avsa.clusterName" -}}
{{- include "avsa.fullname" . | trunc 53 | trimSuffix "-" }}
{{- end }}

{{- define "avsa.mlflowName" -}}
{{- printf "%s-mlflow" (include "avsa.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "avsa.envName" -}}
{{- printf "%s-env" (include "avsa.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "avsa.mlflowServiceAccountName" -}}
{{- if .Values.mlflow.serviceAccount.create }}
{{- default (include "avsa.mlflowName" .) .Values.mlflow.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.mlflow.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "avsa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "avsa.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "avsa.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "avsa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "avsa.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "avsa.labels" -}}
helm.sh/chart: {{ include "avsa.chart" . }}
{{ include "avsa.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* In-cluster MLflow URI or the external one; never empty: runs must be recorded somewhere. */}}
{{- define "avsa.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:%v" (include "avsa.mlflowName" .) .Release.Namespace .Values.mlflow.port }}
{{- else if .Values.mlflow.externalTrackingUri }}
{{- .Values.mlflow.externalTrackingUri }}
{{- else }}
{{- fail "mlflow.externalTrackingUri is required when mlflow.enabled is false: without a tracking server every run's metrics would be lost with the job" }}
{{- end }}
{{- end }}

{{/* Ray image. GPU workers get image.gpuTag, else image.tag, else appVersion + gpuSuffix: the
suffix only ever extends the default tag. Args: (dict "root" $ "gpu" bool). */}}
{{- define "avsa.rayImage" -}}
{{- $img := .root.Values.image }}
{{- $tag := default .root.Chart.AppVersion $img.tag }}
{{- if .gpu }}
{{- if $img.gpuTag }}
{{- $tag = $img.gpuTag }}
{{- else if not $img.tag }}
{{- $tag = printf "%s%s" $tag $img.gpuSuffix }}
{{- end }}
{{- end }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}

{{/* S3 environment shared by Ray and MLflow containers: region, endpoint, extraEnv. */}}
{{- define "avsa.s3Env" -}}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Data of the release's ConfigMap `<fullname>-env`: what every Ray container (and a RayJob
made by `avsa submit`) reads with envFrom. */}}
{{- define "avsa.envData" -}}
MLFLOW_TRACKING_URI: {{ include "avsa.trackingUri" . | quote }}
{{- with .Values.s3.region }}
AWS_REGION: {{ . | quote }}
AWS_DEFAULT_REGION: {{ . | quote }}
{{- end }}
{{- with .Values.s3.endpointUrl }}
AWS_ENDPOINT_URL: {{ . | quote }}
MLFLOW_S3_ENDPOINT_URL: {{ . | quote }}
{{- end }}
PYTHONUNBUFFERED: "1"
{{- /* `ray job stop` kills a driver this long after its SIGTERM (Ray: 3 s), time to end its MLflow run */}}
RAY_JOB_STOP_WAIT_TIME_S: "60"
{{- end }}

{{/* envFrom of Ray containers: the release's ConfigMap, then the S3 Secret. */}}
{{- define "avsa.rayEnvFrom" -}}
- configMapRef:
    name: {{ include "avsa.envName" . }}
{{ include "avsa.envFrom" . }}
{{- end }}

{{/* envFrom: the S3 credentials Secret, referenced by name only. */}}
{{- define "avsa.envFrom" -}}
{{- with .Values.s3.existingSecret }}
- secretRef:
    name: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Resources with `nvidia.com/gpu` added to requests and limits. Args: (dict "resources" r "gpus" n). */}}
{{- define "avsa.resources" -}}
{{- $r := deepCopy .resources }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $r "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $r.requests)) }}
{{- $_ := set $r "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $r.limits)) }}
{{- end }}
{{- toYaml $r }}
{{- end }}

{{/*
Pod template of one Ray node group, shared by the head and every worker group.
Args: (dict "root" $ "group" <values of the group> "component" "ray-head"|"ray-worker-cpu"|...
           "container" <container name> "gpus" <int> "head" <bool>)
*/}}
{{- define "avsa.rayPodTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- $gpus := int (default 0 .gpus) -}}
metadata:
  labels:
    {{- include "avsa.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    app.kubernetes.io/part-of: {{ include "avsa.clusterName" $root }}
spec:
  serviceAccountName: {{ include "avsa.serviceAccountName" $root }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "avsa.rayImage" (dict "root" $root "gpu" (gt $gpus 0)) }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if .head }}
      ports:
        {{- range $name, $port := $root.Values.head.ports }}
        - name: {{ $name }}
          containerPort: {{ int $port }}
        {{- end }}
      {{- end }}
      {{- with $root.Values.extraEnv }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      envFrom:
        {{- include "avsa.rayEnvFrom" $root | trim | nindent 8 }}
      resources:
        {{- include "avsa.resources" (dict "resources" $g.resources "gpus" $gpus) | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: shm
          mountPath: /dev/shm
  volumes:
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSize }}
{{- end }}

{{/* Fail early when a worker group's replica bounds are inconsistent. Args: (dict "name" n "group" g). */}}
{{- define "avsa.checkReplicas" -}}
{{- $g := .group }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "%s.minReplicas (%v) must not exceed %s.maxReplicas (%v)" .name $g.minReplicas .name $g.maxReplicas) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "%s.replicas (%v) must lie in [minReplicas, maxReplicas] = [%v, %v]" .name $g.replicas $g.minReplicas $g.maxReplicas) }}
{{- end }}
{{- end }}
