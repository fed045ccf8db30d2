{{/*
Named templates of the token-broker chart.

The public ones (token-broker.initContainer, token-broker.container, token-broker.sidecarMode,
token-broker.volumes, token-broker.appVolumeMounts, token-broker.appEnv, token-broker.podLabels,
token-broker.podAnnotations) are what an application chart includes to add the sidecar to its
own pod spec. They take a context with `.Values` holding this chart's values, `.Release`,
`.Chart` (the default image tag, and the chart's name, which is the alias in a parent) and
`.Capabilities` (for `sidecar.mode: auto`). From a parent chart that lists token-broker as a
dependency, pass the subchart's own scope, which carries all four:

  {{- $tb := index .Subcharts "token-broker" }}
  {{- if eq (include "token-broker.sidecarMode" $tb) "native" }}
  initContainers:
    {{- include "token-broker.initContainer" $tb | nindent 4 }}
  {{- end }}

or build one: (dict "Values" (index .Values "token-broker") "Release" .Release "Capabilities"
.Capabilities "Chart" (dict "Name" "token-broker" "AppVersion" "0.1.0")).
*/}}

{{/* The chart's name: nameOverride, else .Chart.Name (the alias when a parent aliases the
dependency), else token-broker. */}}
{{- define "token-broker.name" -}}
{{- $chart := .Chart | default dict -}}
{{- .Values.nameOverride | default $chart.Name | default "token-broker" | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* <release>-<name> (or the release name when it already contains the name); two aliases of
the chart in one parent so get distinct object names. */}}
{{- define "token-broker.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "token-broker.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The chart's appVersion, or "" when the context carries no .Chart. */}}
{{- define "token-broker.appVersion" -}}
{{- $chart := .Chart | default dict -}}
{{- $chart.AppVersion | default "" -}}
{{- end }}

{{- define "token-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "token-broker.labels" -}}
{{ include "token-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ include "token-broker.appVersion" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "token-broker.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- $tag := .Values.image.tag | default (include "token-broker.appVersion" .) -}}
{{- if not $tag -}}
{{- fail "token-broker: image.tag is empty and the context has no .Chart.AppVersion: pass the subchart's scope (index .Subcharts \"token-broker\") or set image.tag" -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository (toString $tag) -}}
{{- end -}}
{{- end }}

{{/* The address the application uses: IP:PORT or unix:/path. */}}
{{- define "token-broker.tokenApiAddr" -}}
{{- if .Values.tokenApi.socket.enabled -}}
{{- printf "unix:%s/%s" (trimSuffix "/" .Values.tokenApi.socket.dir) .Values.tokenApi.socket.name -}}
{{- else -}}
{{- .Values.tokenApi.listen -}}
{{- end -}}
{{- end }}

{{/* "native" or "plain": where the sidecar goes. sidecar.mode native|plain, or auto: native on
Kubernetes 1.29+ (.Capabilities.KubeVersion; `helm template` uses Helm's built-in version unless
given --kube-version). The deprecated nativeSidecar, when set, decides instead; it may not
contradict an explicit sidecar.mode. Fails on combinations the API server would refuse. */}}
{{- define "token-broker.sidecarMode" -}}
{{- $mode := (.Values.sidecar | default dict).mode | default "auto" -}}
{{- $caps := .Capabilities -}}
{{- if and (hasKey .Values "nativeSidecar") (ne (kindOf .Values.nativeSidecar) "invalid") -}}
{{- $legacy := ternary "native" "plain" (eq (toString .Values.nativeSidecar) "true") -}}
{{- if and (ne $mode "auto") (ne $mode $legacy) -}}
{{- fail (printf "token-broker: nativeSidecar: %v (deprecated) contradicts sidecar.mode: %s; remove nativeSidecar" .Values.nativeSidecar $mode) -}}
{{- end -}}
{{- $mode = $legacy -}}
{{- end -}}
{{- if eq $mode "auto" -}}
{{- if not $caps -}}
{{- fail "token-broker: sidecar.mode auto needs .Capabilities in the context: pass the subchart's scope (index .Subcharts \"token-broker\"), add \"Capabilities\" .Capabilities to your dict, or set sidecar.mode to native or plain" -}}
{{- end -}}
{{- $mode = ternary "native" "plain" (semverCompare ">=1.29.0-0" $caps.KubeVersion.Version) -}}
{{- else if and (eq $mode "native") $caps -}}
{{- if not (semverCompare ">=1.29.0-0" $caps.KubeVersion.Version) -}}
{{- fail (printf "token-broker: sidecar.mode native needs Kubernetes 1.29+ (init containers with restartPolicy: Always), and this cluster is %s: set sidecar.mode to plain or auto" $caps.KubeVersion.Version) -}}
{{- end -}}
{{- else if not (has $mode (list "native" "plain")) -}}
{{- fail (printf "token-broker: sidecar.mode must be native, plain or auto, got %v" $mode) -}}
{{- end -}}
{{- $mode -}}
{{- end }}

{{/* [server] shutdown_delay: sidecar.shutdownDelay, or 5s in plain mode (the application gets
SIGTERM at the same moment and may still call the broker while it drains), 0 in native mode
(Kubernetes stops the broker only after the application has exited). "" when 0. */}}
{{- define "token-broker.shutdownDelay" -}}
{{- $d := toString ((.Values.sidecar | default dict).shutdownDelay | default "") -}}
{{- if not $d -}}
{{- $d = ternary "5s" "" (eq (include "token-broker.sidecarMode" .) "plain") -}}
{{- end -}}
{{- if not (regexMatch "^0+(\\.0+)?(ns|us|ms|s|m|h|d)?$" $d) -}}
{{- $d -}}
{{- end -}}
{{- end }}

{{/* ---------------------------------------------------------------- TOML rendering.
Helm's toToml turns every YAML number into a float (`pool_size = 2.0`), which the broker
refuses, so the config is rendered here: integral numbers as integers, strings JSON-escaped
(valid TOML basic strings), maps as [tables], maps inside arrays as inline tables, null skipped. */}}

{{- define "token-broker.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}
{{- . -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end }}

{{- define "token-broker.toml.value" -}}
{{- $k := kindOf . -}}
{{- if eq $k "string" -}}
{{- toJson . -}}
{{- else if eq $k "bool" -}}
{{- ternary "true" "false" . -}}
{{- else if or (eq $k "float64") (eq $k "float32") -}}
{{- if eq (floor .) (float64 .) -}}
{{- printf "%.0f" . -}}
{{- else -}}
{{- printf "%v" . -}}
{{- end -}}
{{- else if has $k (list "int" "int8" "int16" "int32" "int64" "uint" "uint8" "uint16" "uint32" "uint64") -}}
{{- printf "%d" . -}}
{{- else if eq $k "slice" -}}
{{- $items := list -}}
{{- range . -}}
{{- $items = append $items (include "token-broker.toml.value" .) -}}
{{- end -}}
{{- printf "[%s]" (join ", " $items) -}}
{{- else if eq $k "map" -}}
{{- $m := . -}}
{{- $items := list -}}
{{- range $key := keys $m | sortAlpha -}}
{{- $v := index $m $key -}}
{{- if ne (kindOf $v) "invalid" -}}
{{- $items = append $items (printf "%s = %s" (include "token-broker.toml.key" $key) (include "token-broker.toml.value" $v)) -}}
{{- end -}}
{{- end -}}
{{- printf "{ %s }" (join ", " $items) -}}
{{- else -}}
{{- fail (printf "token-broker: config: cannot render a %s as TOML" $k) -}}
{{- end -}}
{{- end }}

{{/* One table: its plain keys first, then each sub-table under its own [header]. */}}
{{- define "token-broker.toml.table" -}}
{{- $t := .table -}}
{{- $prefix := .prefix -}}
{{- range $key := keys $t | sortAlpha -}}
{{- $v := index $t $key -}}
{{- if not (has (kindOf $v) (list "map" "invalid")) -}}
{{- printf "%s = %s\n" (include "token-broker.toml.key" $key) (include "token-broker.toml.value" $v) -}}
{{- end -}}
{{- end -}}
{{- range $key := keys $t | sortAlpha -}}
{{- $v := index $t $key -}}
{{- if eq (kindOf $v) "map" -}}
{{- $path := include "token-broker.toml.key" $key -}}
{{- if $prefix -}}
{{- $path = printf "%s.%s" $prefix $path -}}
{{- end -}}
{{- /* A header only where it holds keys (or the table is empty): [a.b.c] implies [a.b]. */ -}}
{{- $plain := 0 -}}
{{- $sub := 0 -}}
{{- range $vv := values $v -}}
{{- if eq (kindOf $vv) "map" -}}
{{- $sub = add1 $sub -}}
{{- else if ne (kindOf $vv) "invalid" -}}
{{- $plain = add1 $plain -}}
{{- end -}}
{{- end -}}
{{- if or $plain (not $sub) -}}
{{- printf "\n[%s]\n" $path -}}
{{- end -}}
{{- include "token-broker.toml.table" (dict "prefix" $path "table" $v) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* Names of environment variables the config refers to (`*_env = "VAR"`, `{ env = "VAR" }`),
one per line. */}}
{{- define "token-broker.envRefs" -}}
{{- $k := kindOf . -}}
{{- if eq $k "map" -}}
{{- $m := . -}}
{{- range $key := keys $m | sortAlpha -}}
{{- $v := index $m $key -}}
{{- if and (or (hasSuffix "_env" $key) (and (eq $key "env") (eq (len $m) 1))) (eq (kindOf $v) "string") -}}
{{- printf "%s\n" $v -}}
{{- else -}}
{{- include "token-broker.envRefs" $v -}}
{{- end -}}
{{- end -}}
{{- else if eq $k "slice" -}}
{{- range . -}}
{{- include "token-broker.envRefs" . -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The `[store]` section (as JSON) from the `store` values, which use the config's own field
names: every key but `enabled` (the chart's switch) verbatim, so a field the config gains needs no
change here. A key set to "" or null is left out (how a default such as `database_url_env` is
unset for `database_url_file`). `migrate` defaults to the opposite of `migration.enabled` (the Job
migrates, the sidecars only check the schema). Fails on the chart's old camelCase names (the
schema refuses them too; this also covers --skip-schema-validation) and on a reference given both
as `X_env` and `X_file`. Evaluated whether or not `store.enabled`, so old names fail either way. */}}
{{- define "token-broker.storeSection" -}}
{{- $values := .Values.store | default dict -}}
{{- $renamed := dict "databaseUrlEnv" "was renamed to store.database_url_env" "encryptionKeyEnv" "was renamed to store.encryption_key_env" "poolSize" "was renamed to store.pool_size" "extra" "was removed: put its fields directly under store (store.query_timeout, ...)" -}}
{{- range $old := keys $renamed | sortAlpha -}}
{{- if hasKey $values $old -}}
{{- fail (printf "token-broker: store.%s %s (the store values use the config's [store] field names)" $old (index $renamed $old)) -}}
{{- end -}}
{{- end -}}
{{- $store := dict -}}
{{- range $key := keys $values | sortAlpha -}}
{{- $v := index $values $key -}}
{{- if not (or (eq $key "enabled") (eq (kindOf $v) "invalid") (and (eq (kindOf $v) "string") (eq $v ""))) -}}
{{- $_ := set $store $key $v -}}
{{- end -}}
{{- end -}}
{{- range $key := keys $store | sortAlpha -}}
{{- if and (hasSuffix "_env" $key) (hasKey $store (printf "%s_file" (trimSuffix "_env" $key))) -}}
{{- fail (printf "token-broker: store.%s and store.%s_file are both set: give one (set the other to \"\")" $key (trimSuffix "_env" $key)) -}}
{{- end -}}
{{- end -}}
{{- if not (hasKey $store "migrate") -}}
{{- $_ := set $store "migrate" (not .Values.migration.enabled) -}}
{{- end -}}
{{- toJson $store -}}
{{- end }}

{{/* The config as a map: the user's `config` plus what the chart manages. Fails on values the
schema cannot check: every referenced variable must be provided by secrets.env or extraEnv. */}}
{{- define "token-broker.configMap" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- if not (get $cfg "collections") -}}
{{- /* Nothing configured: a demo collection, so the chart installs as it is. (A default in
values.yaml could not be removed from a parent chart: Helm keeps subchart defaults that a parent
sets to null.) */ -}}
{{- $_ := set $cfg "collections" (dict "demo" (dict "source" (dict "kind" "demo" "ttl" "5m"))) -}}
{{- end -}}
{{- $server := get $cfg "server" | default dict -}}
{{- $_ := set $server "listen" (include "token-broker.tokenApiAddr" .) -}}
{{- with include "token-broker.shutdownDelay" . -}}
{{- $_ := set $server "shutdown_delay" . -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- $_ := set $cfg "admin" (dict "enabled" true "listen" (printf "%s:%d" (toString .Values.admin.bindAddress) (int .Values.admin.port))) -}}
{{- $store := include "token-broker.storeSection" . | fromJson -}}
{{- if .Values.store.enabled -}}
{{- $_ := set $cfg "store" $store -}}
{{- end -}}
{{- $provided := list -}}
{{- range .Values.secrets.env -}}
{{- $provided = append $provided .name -}}
{{- end -}}
{{- range .Values.extraEnv -}}
{{- $provided = append $provided .name -}}
{{- end -}}
{{- range $var := splitList "\n" (include "token-broker.envRefs" $cfg) -}}
{{- if and $var (not (has $var $provided)) -}}
{{- fail (printf "token-broker: the config refers to the environment variable %s, which neither secrets.env nor extraEnv provides" $var) -}}
{{- end -}}
{{- end -}}
{{- toJson $cfg -}}
{{- end }}

{{/* The config file's text. */}}
{{- define "token-broker.configToml" -}}
# Rendered by the token-broker Helm chart from its values; edit the values, not this file.
{{ include "token-broker.toml.table" (dict "prefix" "" "table" (include "token-broker.configMap" . | fromJson)) -}}
{{- end }}

{{/* The migration Job's config file: `[store]` only (`token-broker migrate` reads nothing else):
the sidecar's `[store]` without its other secret references (every `*_env` and `*_file` but the
database URL's: no listener URL, no encryption key) and without `pool_size` and `migrate`; so the
Job needs no upstream secret and no key. */}}
{{- define "token-broker.migrationConfigToml" -}}
{{- $store := dict -}}
{{- range $key, $v := include "token-broker.storeSection" . | fromJson -}}
{{- $ref := or (hasSuffix "_env" $key) (hasSuffix "_file" $key) -}}
{{- if not (or (has $key (list "pool_size" "migrate")) (and $ref (not (hasPrefix "database_url_" $key)))) -}}
{{- $_ := set $store $key $v -}}
{{- end -}}
{{- end -}}
# Rendered by the token-broker Helm chart for `token-broker migrate`: [store] only.
{{ include "token-broker.toml.table" (dict "prefix" "" "table" (dict "store" $store)) -}}
{{- end }}

{{/* The migration Job's environment: the database URL variable only (from
migration.databaseUrlSecretKey, else the sidecar's own secrets.env or extraEnv entry), plus
migration.extraEnv. With `store.database_url_file` instead of `store.database_url_env`, no
variable: the file comes from migration.extraVolumes. */}}
{{- define "token-broker.migrationEnv" -}}
{{- $v := .Values -}}
{{- $dbEnv := $v.store.database_url_env | default "" -}}
{{- $entry := dict -}}
{{- if not $dbEnv -}}
{{- if $v.migration.databaseUrlSecretKey -}}
{{- fail "token-broker: migration.databaseUrlSecretKey is given to the Job as store.database_url_env, which is empty: name the variable" -}}
{{- end -}}
{{- toYaml ($v.migration.extraEnv | default list) -}}
{{- else -}}
{{- if $v.migration.databaseUrlSecretKey -}}
{{- if not $v.secrets.existingSecret -}}
{{- fail "token-broker: migration.databaseUrlSecretKey is a key of secrets.existingSecret, which is empty: name the Secret" -}}
{{- end -}}
{{- $entry = dict "name" $dbEnv "valueFrom" (dict "secretKeyRef" (dict "name" $v.secrets.existingSecret "key" $v.migration.databaseUrlSecretKey)) -}}
{{- else -}}
{{- range $v.secrets.env -}}
{{- if eq .name $dbEnv -}}
{{- $entry = dict "name" $dbEnv "valueFrom" (dict "secretKeyRef" (dict "name" $v.secrets.existingSecret "key" .key)) -}}
{{- end -}}
{{- end -}}
{{- if not $entry -}}
{{- range $v.extraEnv -}}
{{- if eq .name $dbEnv -}}
{{- $entry = . -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $entry -}}
{{- fail (printf "token-broker: the migration Job needs %s (store.database_url_env): list it in secrets.env or extraEnv, or set migration.databaseUrlSecretKey" $dbEnv) -}}
{{- end -}}
{{- toYaml (prepend ($v.migration.extraEnv | default list) $entry) -}}
{{- end -}}
{{- end }}

{{/* ---------------------------------------------------------------- Sidecar. */}}

{{/* Volume names follow containerName, so two brokers in one pod (two aliases, distinct
containerName) do not collide; the default names are unchanged. */}}
{{- define "token-broker.configVolumeName" -}}{{ .Values.containerName | trunc 56 | trimSuffix "-" }}-config{{- end }}
{{- define "token-broker.socketVolumeName" -}}{{ .Values.containerName | trunc 56 | trimSuffix "-" }}-socket{{- end }}
{{- define "token-broker.configDir" -}}/etc/token-broker{{- end }}

{{/* The probe handler, for "liveness" or "readiness". */}}
{{- define "token-broker.probeHandler" -}}
{{- $v := .ctx.Values -}}
{{- if eq $v.probes.type "http" -}}
httpGet:
  path: {{ ternary "/livez" "/readyz" (eq .kind "liveness") }}
  port: {{ int $v.admin.port }}
{{- else -}}
grpc:
  port: {{ int $v.admin.port }}
  {{- if eq .kind "liveness" }}
  service: liveness
  {{- end }}
{{- end -}}
{{- end }}

{{/* The secret environment of the broker (sidecar and migration Job). */}}
{{- define "token-broker.secretEnv" -}}
{{- $secret := .Values.secrets.existingSecret -}}
{{- range .Values.secrets.env }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .key }}
{{- end }}
{{- end }}

{{/* The two placements of the sidecar. Each refuses the other mode, so that a pod never gets
`restartPolicy: Always` on a regular container (the API server refuses it) nor a plain sidecar
among init containers (the pod would never start). */}}

{{/* Native sidecar: one list item for the pod's `initContainers:` (Kubernetes 1.29+). */}}
{{- define "token-broker.initContainer" -}}
{{- if ne (include "token-broker.sidecarMode" .) "native" -}}
{{- fail "token-broker: the sidecar mode is plain (sidecar.mode, or auto on Kubernetes before 1.29): include \"token-broker.container\" under containers:, not \"token-broker.initContainer\" under initContainers: (branch on include \"token-broker.sidecarMode\")" -}}
{{- end -}}
{{- include "token-broker.sidecarContainer" (dict "ctx" . "native" true) -}}
{{- end }}

{{/* Plain sidecar: one list item for the pod's `containers:`, best listed first (its postStart
wait then holds the next containers back until tokens are servable). */}}
{{- define "token-broker.container" -}}
{{- if ne (include "token-broker.sidecarMode" .) "plain" -}}
{{- fail "token-broker: the sidecar mode is native (sidecar.mode, or auto on Kubernetes 1.29+): include \"token-broker.initContainer\" under initContainers:, not \"token-broker.container\" under containers: (restartPolicy: Always is refused there); or set sidecar.mode: plain" -}}
{{- end -}}
{{- include "token-broker.sidecarContainer" (dict "ctx" . "native" false) -}}
{{- end }}

{{/* Labels for the pod template's `labels:` (mapping entries): what the PodMonitor selects. */}}
{{- define "token-broker.podLabels" -}}
token-broker/sidecar: {{ include "token-broker.fullname" . }}
{{- end }}

{{- define "token-broker.sidecarContainer" -}}
{{- $native := .native -}}
{{- with .ctx -}}
- name: {{ .Values.containerName }}
  image: {{ include "token-broker.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if $native }}
  restartPolicy: Always
  {{- end }}
  args:
    - serve
    - --config
    - {{ include "token-broker.configDir" . }}/config.toml
  env:
    - name: TOKEN_BROKER_LOG_FORMAT
      value: {{ .Values.logFormat | quote }}
    - name: RUST_LOG
      value: {{ .Values.logLevel | quote }}
    {{- with include "token-broker.secretEnv" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: {{ .Values.admin.portName | default "tb-admin" }}
      containerPort: {{ int .Values.admin.port }}
      protocol: TCP
  {{- $wait := (.Values.sidecar | default dict).waitOnStart | default dict }}
  {{- if and (not $native) $wait.enabled }}
  lifecycle:
    # The image has no shell: exec the binary. The kubelet starts the pod's next container
    # only once this hook has returned, so list this container first.
    postStart:
      exec:
        command:
          - /usr/local/bin/token-broker
          - wait
          - --addr
          - {{ include "token-broker.tokenApiAddr" . }}
          - --timeout
          - {{ $wait.timeout | default "60s" }}
  {{- end }}
  {{- if .Values.probes.startup.enabled }}
  startupProbe:
    {{- /* Native: the pod's containers start once this passes, so it waits for readiness
    (every required collection servable). Plain: it only waits for the process to answer. */}}
    {{- include "token-broker.probeHandler" (dict "ctx" . "kind" (ternary "readiness" "liveness" $native)) | nindent 4 }}
    {{- toYaml (omit .Values.probes.startup "enabled") | nindent 4 }}
  {{- end }}
  livenessProbe:
    {{- include "token-broker.probeHandler" (dict "ctx" . "kind" "liveness") | nindent 4 }}
    {{- with .Values.probes.liveness }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  readinessProbe:
    {{- include "token-broker.probeHandler" (dict "ctx" . "kind" "readiness") | nindent 4 }}
    {{- with .Values.probes.readiness }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: {{ include "token-broker.configVolumeName" . }}
      mountPath: {{ include "token-broker.configDir" . }}
      readOnly: true
    {{- if .Values.tokenApi.socket.enabled }}
    - name: {{ include "token-broker.socketVolumeName" . }}
      mountPath: {{ .Values.tokenApi.socket.dir }}
    {{- end }}
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
{{- end }}

{{/* The pod's volumes for the sidecar: list items for `volumes:`. */}}
{{- define "token-broker.volumes" -}}
- name: {{ include "token-broker.configVolumeName" . }}
  configMap:
    name: {{ include "token-broker.fullname" . }}
{{- if .Values.tokenApi.socket.enabled }}
- name: {{ include "token-broker.socketVolumeName" . }}
  emptyDir:
    {{- if .Values.tokenApi.socket.memoryMedium }}
    medium: Memory
    {{- end }}
    sizeLimit: 1Mi
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The application container's mount of the socket directory: list items for its
`volumeMounts:`, empty without tokenApi.socket.enabled. */}}
{{- define "token-broker.appVolumeMounts" -}}
{{- if .Values.tokenApi.socket.enabled -}}
- name: {{ include "token-broker.socketVolumeName" . }}
  mountPath: {{ .Values.tokenApi.socket.dir }}
{{- end -}}
{{- end }}

{{/* The application container's `TOKEN_BROKER_ADDR` (read by the token-broker CLI; use it in
your client too): a list item for its `env:`. */}}
{{- define "token-broker.appEnv" -}}
- name: TOKEN_BROKER_ADDR
  value: {{ include "token-broker.tokenApiAddr" . | quote }}
{{- end }}

{{/* Pod annotations: Prometheus scrape annotations and a checksum of the config, so pods roll
when it changes. Mapping entries for the pod template's `annotations:`. */}}
{{- define "token-broker.podAnnotations" -}}
checksum/token-broker-config: {{ include "token-broker.configToml" . | sha256sum }}
{{- if .Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.admin.port | int | toString | quote }}
prometheus.io/path: {{ .Values.metrics.path | quote }}
{{- end }}
{{- end }}
