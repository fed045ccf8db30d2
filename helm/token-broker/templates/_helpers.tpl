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
{{- include "token-broker.nonZeroDuration" $d -}}
{{- end }}

{{/* A duration as given, or "" when it is zero ("0", "0s", "0.0ms"...) or empty. */}}
{{- define "token-broker.nonZeroDuration" -}}
{{- if not (regexMatch "^0+(\\.0+)?(ns|us|ms|s|m|h|d)?$" .) -}}
{{- . -}}
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

{{/* The sidecar's config as a map (JSON): a follower's in follower mode. */}}
{{- define "token-broker.configMap" -}}
{{- include "token-broker.configFor" (dict "ctx" . "role" (ternary "follower" "sidecar" (eq (include "token-broker.following" .) "true"))) -}}
{{- end }}

{{/* The broker's (DaemonSet or Deployment) config as a map (JSON). */}}
{{- define "token-broker.brokerConfigMap" -}}
{{- include "token-broker.configFor" (dict "ctx" . "role" "broker") -}}
{{- end }}

{{/* A config as a map (JSON): the user's `config` plus what the chart manages, for a role:
`sidecar` (the token API on loopback or the socket, `[store]` with store.enabled), `broker` (the
token API on the network at broker.port, over TLS from broker.tls, `[store]` with store.enabled)
or `follower` (a sidecar with no `[store]`, no `[http]` and one `kind = "broker"` source per
collection). Fails on values the schema cannot check: every referenced variable must be provided
by secrets.env (not given to a follower) or extraEnv. */}}
{{- define "token-broker.configFor" -}}
{{- $role := .role -}}
{{- with .ctx -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- if not (get $cfg "collections") -}}
{{- /* Nothing configured: a demo collection, so the chart installs as it is. (A default in
values.yaml could not be removed from a parent chart: Helm keeps subchart defaults that a parent
sets to null.) */ -}}
{{- $_ := set $cfg "collections" (dict "demo" (dict "source" (dict "kind" "demo" "ttl" "5m"))) -}}
{{- end -}}
{{- $server := get $cfg "server" | default dict -}}
{{- if eq $role "broker" -}}
{{- $b := .Values.broker -}}
{{- $_ := set $server "listen" (printf "%s:%d" (toString .Values.admin.bindAddress) (int $b.port)) -}}
{{- with include "token-broker.nonZeroDuration" (toString ($b.shutdownDelay | default "")) -}}
{{- $_ := set $server "shutdown_delay" . -}}
{{- end -}}
{{- $tls := include "token-broker.brokerTls" . | fromJson -}}
{{- if $b.insecure -}}
{{- $_ := set $server "insecure" true -}}
{{- else -}}
{{- $section := dict "reload_interval" ($b.tls.reloadInterval | default "5s") -}}
{{- range $field, $key := $tls.files -}}
{{- $_ := set $section $field (printf "%s/%s" $tls.dir $key) -}}
{{- end -}}
{{- if ne $b.tls.clientAuth "none" -}}
{{- $_ := set $section "client_cert" $b.tls.clientAuth -}}
{{- end -}}
{{- $_ := set $server "tls" $section -}}
{{- end -}}
{{- else -}}
{{- $_ := set $server "listen" (include "token-broker.tokenApiAddr" .) -}}
{{- with include "token-broker.shutdownDelay" . -}}
{{- $_ := set $server "shutdown_delay" . -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- $_ := set $cfg "admin" (dict "enabled" true "listen" (printf "%s:%d" (toString .Values.admin.bindAddress) (int .Values.admin.port))) -}}
{{- $store := include "token-broker.storeSection" . | fromJson -}}
{{- $_ := include "token-broker.storeUsed" . -}}
{{- if and .Values.store.enabled (ne $role "follower") -}}
{{- $_ := set $cfg "store" $store -}}
{{- end -}}
{{- if eq $role "follower" -}}
{{- $_ := unset $cfg "http" -}}
{{- $_ := set $cfg "collections" (include "token-broker.followerCollections" (dict "ctx" . "collections" $cfg.collections) | fromJson) -}}
{{- end -}}
{{- $provided := list -}}
{{- if ne $role "follower" -}}
{{- range .Values.secrets.env -}}
{{- $provided = append $provided .name -}}
{{- end -}}
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
{{- end -}}
{{- end }}

{{/* A config file's text, from a config map (JSON). */}}
{{- define "token-broker.tomlFile" -}}
# Rendered by the token-broker Helm chart from its values; edit the values, not this file.
{{ include "token-broker.toml.table" (dict "prefix" "" "table" (. | fromJson)) -}}
{{- end }}

{{/* The sidecar's config file. */}}
{{- define "token-broker.configToml" -}}
{{- include "token-broker.tomlFile" (include "token-broker.configMap" .) -}}
{{- end }}

{{/* The broker's config file. */}}
{{- define "token-broker.brokerConfigToml" -}}
{{- include "token-broker.tomlFile" (include "token-broker.brokerConfigMap" .) -}}
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

{{/* ---------------------------------------------------------------- Tree mode.
A broker (broker.enabled: a DaemonSet or a Deployment behind a Service) holds the store and the
upstream secrets and serves the token API over TLS; sidecars in follower mode
(sidecar.follow.enabled) hold neither and follow its collections (`kind = "broker"`). */}}

{{/* "true" when the sidecar is a follower, else "". */}}
{{- define "token-broker.following" -}}
{{- if (((.Values.sidecar | default dict).follow | default dict).enabled) -}}true{{- end -}}
{{- end }}

{{/* "true" when something renders `[store]` (the broker, or sidecars that are not followers):
the migration Job runs only then. A store that nothing uses fails. */}}
{{- define "token-broker.storeUsed" -}}
{{- if .Values.store.enabled -}}
{{- if or ((.Values.broker | default dict).enabled) (ne (include "token-broker.following" .) "true") -}}
true
{{- else -}}
{{- fail "token-broker: store.enabled with sidecar.follow.enabled and no broker (broker.enabled): followers hold no database; the store belongs to the broker's release" -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* <fullname>-broker: the broker's ConfigMap, Service and DaemonSet or Deployment. */}}
{{- define "token-broker.brokerName" -}}
{{- printf "%s-broker" (include "token-broker.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end }}

{{/* Labels that select the broker's pods. */}}
{{- define "token-broker.brokerSelectorLabels" -}}
{{ include "token-broker.selectorLabels" . }}
app.kubernetes.io/component: broker
{{- end }}

{{/* The broker's TLS files (JSON): `secret` (broker.tls.secretName, "" when broker.insecure),
`dir` (where it is mounted) and `files` (config field -> key of the Secret): the server's
certificate and key, and with client certificates (tls.clientAuth required or optional) the CA
that verifies them. One source for the config's paths and the projected volume's items. */}}
{{- define "token-broker.brokerTls" -}}
{{- $b := .Values.broker -}}
{{- $files := dict -}}
{{- $secret := "" -}}
{{- if not $b.insecure -}}
{{- $secret = $b.tls.secretName | default "" -}}
{{- if not $secret -}}
{{- fail "token-broker: broker.tls.secretName is empty: name the kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt; a cert-manager Certificate's) the broker serves with, or set broker.insecure: true for plain TCP" -}}
{{- end -}}
{{- $files = dict "cert_file" "tls.crt" "key_file" "tls.key" -}}
{{- if ne $b.tls.clientAuth "none" -}}
{{- $_ := set $files "client_ca_file" "ca.crt" -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "secret" $secret "dir" (printf "%s/tls" (include "token-broker.configDir" .)) "subdir" "tls" "files" $files) -}}
{{- end }}

{{/* A follower's TLS files (JSON), as token-broker.brokerTls: sidecar.follow.tls.secretName, else
the broker's own Secret when the broker is in this release (its ca.crt only: its key never
leaves the broker's pods); `ca.crt` always, `tls.crt`/`tls.key` with tls.clientCert. */}}
{{- define "token-broker.followTls" -}}
{{- $f := .Values.sidecar.follow -}}
{{- $ftls := $f.tls | default dict -}}
{{- $b := .Values.broker | default dict -}}
{{- $secret := $ftls.secretName | default "" -}}
{{- if and (not $secret) $b.enabled (not $b.insecure) -}}
{{- if $ftls.clientCert -}}
{{- fail "token-broker: sidecar.follow.tls.clientCert needs sidecar.follow.tls.secretName, a Secret with the followers' own tls.crt and tls.key (the broker's Secret holds the broker's server key, which must not reach every pod)" -}}
{{- end -}}
{{- $secret = $b.tls.secretName | default "" -}}
{{- end -}}
{{- if and $b.enabled (not $b.insecure) (eq ($b.tls.clientAuth | default "") "required") (not $ftls.clientCert) -}}
{{- fail "token-broker: broker.tls.clientAuth is required, so followers must present a certificate: set sidecar.follow.tls.clientCert: true and sidecar.follow.tls.secretName (tls.crt, tls.key, ca.crt), or broker.tls.clientAuth: optional" -}}
{{- end -}}
{{- $files := dict -}}
{{- if $secret -}}
{{- $_ := set $files "ca_file" "ca.crt" -}}
{{- if $ftls.clientCert -}}
{{- $_ := set $files "cert_file" "tls.crt" -}}
{{- $_ := set $files "key_file" "tls.key" -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "secret" $secret "dir" (printf "%s/broker-tls" (include "token-broker.configDir" .)) "subdir" "broker-tls" "files" $files) -}}
{{- end }}

{{/* The broker addresses a follower tries in order (JSON list): sidecar.follow.addrs, else this
release's broker Service, https://<fullname>-broker.<namespace>.svc:<broker.port>. Plain http
only with sidecar.follow.insecure. */}}
{{- define "token-broker.followAddrs" -}}
{{- $f := .Values.sidecar.follow -}}
{{- $b := .Values.broker | default dict -}}
{{- $addrs := $f.addrs | default list -}}
{{- if not $addrs -}}
{{- if not $b.enabled -}}
{{- fail "token-broker: sidecar.follow.addrs is empty and this release has no broker (broker.enabled): give the broker's addresses" -}}
{{- end -}}
{{- $addrs = list (printf "%s://%s.%s.svc:%d" (ternary "http" "https" (eq (toString $b.insecure) "true")) (include "token-broker.brokerName" .) .Release.Namespace (int $b.port)) -}}
{{- end -}}
{{- range $addrs -}}
{{- if and (not (hasPrefix "https://" .)) (not $f.insecure) -}}
{{- fail (printf "token-broker: the broker address %s is not https: followers reach the broker over TLS; set sidecar.follow.insecure: true to allow plain http (and broker.insecure on the broker)" .) -}}
{{- end -}}
{{- end -}}
{{- toJson $addrs -}}
{{- end }}

{{/* A follower's collections (JSON): for each configured collection one that follows the
broker's collection of the same name, keeping `required` and `prefetch` (the source, its policy
and readers stay with the broker). dict: ctx, collections. */}}
{{- define "token-broker.followerCollections" -}}
{{- $ctx := .ctx -}}
{{- $f := $ctx.Values.sidecar.follow -}}
{{- $addrs := include "token-broker.followAddrs" $ctx | fromJsonArray -}}
{{- $tls := include "token-broker.followTls" $ctx | fromJson -}}
{{- if and (not $tls.secret) (not $f.insecure) -}}
{{- fail "token-broker: sidecar.follow.tls.secretName is empty: name the Secret whose ca.crt the followers trust (or set sidecar.follow.insecure: true)" -}}
{{- end -}}
{{- $out := dict -}}
{{- range $name, $c := .collections -}}
{{- $src := dict "kind" "broker" "addrs" $addrs "collection" $name -}}
{{- range $field, $key := $tls.files -}}
{{- $_ := set $src $field (printf "%s/%s" $tls.dir $key) -}}
{{- end -}}
{{- with ($f.tls | default dict).serverName -}}
{{- $_ := set $src "server_name" . -}}
{{- end -}}
{{- $col := dict "source" $src -}}
{{- range $k := list "required" "prefetch" -}}
{{- if hasKey ($c | default dict) $k -}}
{{- $_ := set $col $k (index $c $k) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $out $name $col -}}
{{- end -}}
{{- toJson $out -}}
{{- end }}

{{/* A config volume (a list item for `volumes:`): the ConfigMap alone, or projected with the
TLS files of a Secret under a subdirectory (one volume, so no mount is nested in a read-only
ConfigMap mount; the kubelet updates projected Secrets, so cert-manager's rotations reach the
files). dict: name, configMap, tls (token-broker.brokerTls or token-broker.followTls). */}}
{{- define "token-broker.configVolume" -}}
- name: {{ .name }}
{{- if .tls.secret }}
  projected:
    sources:
      - configMap:
          name: {{ .configMap }}
      - secret:
          name: {{ .tls.secret }}
          items:
          {{- range $key := values .tls.files | uniq | sortAlpha }}
            - key: {{ $key }}
              path: {{ $.tls.subdir }}/{{ $key }}
          {{- end }}
{{- else }}
  configMap:
    name: {{ .configMap }}
{{- end }}
{{- end }}

{{/* Pod annotations for a config file's text (dict: ctx, toml): a checksum of the config, so
pods roll when it changes, and the Prometheus scrape annotations. */}}
{{- define "token-broker.annotationsFor" -}}
checksum/token-broker-config: {{ .toml | sha256sum }}
{{- with .ctx }}
{{- if .Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.admin.port | int | toString | quote }}
prometheus.io/path: {{ .Values.metrics.path | quote }}
{{- end }}
{{- end }}
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
{{- $wait := ((.Values.sidecar | default dict).waitOnStart | default dict).enabled -}}
{{- include "token-broker.containerSpec" (dict "ctx" . "name" .Values.containerName "native" $native "wait" (and (not $native) $wait) "startup" (ternary "readiness" "liveness" $native) "secrets" (ne (include "token-broker.following" .) "true") "ports" list "resources" .Values.resources "volume" (include "token-broker.configVolumeName" .) "socket" .Values.tokenApi.socket.enabled) -}}
{{- end -}}
{{- end }}

{{/* One token-broker container, a list item: what the sidecar and the broker's DaemonSet or
Deployment share. dict: ctx; name; native (restartPolicy: Always); wait (the plain sidecar's
postStart wait); startup ("readiness" or "liveness": the startup probe's check); secrets (the
secrets.env variables; a follower gets none); ports (further container ports: dicts of name and
port); resources; volume (the config volume, mounted read-only at the config directory);
socket (mount the token API's socket directory). */}}
{{- define "token-broker.containerSpec" -}}
{{- $p := . -}}
{{- with .ctx -}}
- name: {{ $p.name }}
  image: {{ include "token-broker.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if $p.native }}
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
    {{- if $p.secrets }}
    {{- with include "token-broker.secretEnv" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: {{ .Values.admin.portName | default "tb-admin" }}
      containerPort: {{ int .Values.admin.port }}
      protocol: TCP
    {{- range $p.ports }}
    - name: {{ .name }}
      containerPort: {{ int .port }}
      protocol: TCP
    {{- end }}
  {{- if $p.wait }}
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
          - {{ .Values.sidecar.waitOnStart.timeout | default "60s" }}
  {{- end }}
  {{- if .Values.probes.startup.enabled }}
  startupProbe:
    {{- /* A native sidecar: the pod's containers start once this passes, so it waits for
    readiness (every required collection servable). Otherwise it only waits for the process to
    answer. */}}
    {{- include "token-broker.probeHandler" (dict "ctx" . "kind" $p.startup) | nindent 4 }}
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
    {{- toYaml $p.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: {{ $p.volume }}
      mountPath: {{ include "token-broker.configDir" . }}
      readOnly: true
    {{- if $p.socket }}
    - name: {{ include "token-broker.socketVolumeName" . }}
      mountPath: {{ .Values.tokenApi.socket.dir }}
    {{- end }}
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
{{- end }}

{{/* The pod's volumes for the sidecar: list items for `volumes:`. A follower's config volume
also holds its broker TLS files (token-broker.followTls). */}}
{{- define "token-broker.volumes" -}}
{{- $tls := dict -}}
{{- if eq (include "token-broker.following" .) "true" -}}
{{- $tls = include "token-broker.followTls" . | fromJson -}}
{{- end -}}
{{- include "token-broker.configVolume" (dict "name" (include "token-broker.configVolumeName" .) "configMap" (include "token-broker.fullname" .) "tls" $tls) }}
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
{{- include "token-broker.annotationsFor" (dict "ctx" . "toml" (include "token-broker.configToml" .)) -}}
{{- end }}
