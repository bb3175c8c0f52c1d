// Package waypoint is ambit's L7 proxy: it terminates HBONE (15008) with
// its own SPIFFE identity, serves the tunnelled HTTP/1.1 or HTTP/2 (prior
// knowledge, gRPC included) with net/http and x/net/http2, routes by the
// Envoy v3 resources istiod-lite sends (Listener, RouteConfiguration,
// Cluster, ClusterLoadAssignment; the subset and its semantics are in
// ENVOY.md), and forwards to endpoints over HBONE with its own identity.
//
// Config arrives through Apply as one complete resource set; it is
// validated (protoc-gen-validate rules, then a field allowlist: a field the
// waypoint does not implement is refused, naming its path), compiled
// (matchers, regexes, weighted picks) and swapped in atomically. Requests
// load the snapshot once. Per-cluster runtime state (connection pools,
// circuit-breaker counters, outlier state) lives on while the cluster and
// endpoint exist.
//
// The router follows Envoy: route timeout (504 UT), retries (retry_on,
// per-try timeout, jittered exponential backoff, previous-host avoidance,
// bodies buffered up to RetryBufferBytes, never after the response
// started; URX when exhausted), circuit breakers (503 UO), outlier
// detection (consecutive 5xx and gateway failures; 503 UH when no host is
// left), mirroring, header mutations, redirects, rewrites, direct
// responses, and RBAC (DENY filters before ALLOW; 403). Every request is
// counted in Istio's metrics (reporter="waypoint") and logged once.
package waypoint
