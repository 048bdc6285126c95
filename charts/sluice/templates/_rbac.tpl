{{/*
The operator's permissions, in one place. They mirror the operator's own list of the Kubernetes
API calls it makes (operator/src/rbac.rs); tests/tests/chart.rs fails when the two differ in
either direction, so a new API call in the operator needs a rule here and a removed call takes
its rule away.
*/}}

{{/* Rules on the resources of the watched namespace(s): MessageQueues and their children. */}}
{{- define "sluice.rbac.workloadRules" -}}
- apiGroups: ["sluice.dev"]
  resources: ["messagequeues"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["sluice.dev"]
  resources: ["messagequeues/status"]
  verbs: ["patch"]
# Watched for readiness; every other child is only server-side applied (create + patch), and
# read when an apply conflicts (who holds the fields).
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
# Rolling update: the operator restarts agent pods itself, one at a time (updateStrategy OnDelete).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "delete"]
# PVC expansion when spec.storage.size grows.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* Rules in the release namespace for leader election (only rendered with several replicas). */}}
{{- define "sluice.rbac.leaderElectionRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "patch"]
{{- end -}}

{{/* True (non-empty) when the operator runs with leader election. */}}
{{- define "sluice.leaderElection" -}}
{{- if gt (int .Values.replicaCount) 1 -}}true{{- end -}}
{{- end -}}
