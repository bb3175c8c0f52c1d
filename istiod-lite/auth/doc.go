// Package auth authenticates the callers of istiod-lite's gRPC services on
// 15012 (the certificate service and xDS) and says what kind of caller each
// is. Authorization (which identity the CA may issue, which xDS types a
// stream may read) stays with the services; they branch on Caller.Kind.
//
// A caller presents a bearer token in its call's metadata
// ("authorization: Bearer <token>"); AuthenticateIncoming extracts it and asks
// an Authenticator:
//
//   - KubeAuthenticator (cluster mode) verifies a Kubernetes service-account
//     token with a TokenReview: it must be issued for the audience "istio-ca"
//     and bound to a pod that still exists, runs as that service account, is
//     scheduled, and is on the node the token names. The bound pod, read once
//     per authentication (the TokenReview and that Get are the whole cost; the
//     services authenticate once per stream or call), decides the kind:
//     a pod of a node-proxy service account (ambit-system/ztunnel) is a
//     NodeProxy; a pod labelled gateway.networking.k8s.io/gateway-name=<gw>
//     whose service account is <gw> (Istio names a waypoint's service account
//     after its Gateway) is the Waypoint <namespace>/<gw>; any other pod is a
//     Workload.
//   - HostAuthenticator (local mode) maps per-host secrets to callers.
//
// Caller kinds and what the services let them do:
//
//	NodeProxy  ztunnel or local host: certificates of workloads on its node;
//	           xDS ambit.workload.v1 types, as its own node.
//	Waypoint   certificate of its own identity only; xDS Envoy types
//	           (LDS/RDS/CDS/EDS), its own waypoint's resources only.
//	Workload   certificate of its own identity only; no xDS.
//	Operator   reserved for the CLI (reading proxy-status); no authenticator
//	           issues it yet.
//
// # Host credentials file (local mode)
//
// One credential per line; blank lines and lines starting with # are ignored:
//
//	# a host (its ztunnel): a NodeProxy whose node is <host>
//	<host> <secret>
//	# a waypoint: the Waypoint <namespace>/<name>, identity
//	# spiffe://<trust domain>/ns/<namespace>/sa/<name>
//	waypoint <namespace>/<name> <secret>
//
// Two-field lines are hosts, as in files written before waypoints existed
// (those stay valid; a host may even be named "waypoint"). Three-field lines
// must start with the keyword "waypoint". Secrets are at least
// MinHostSecretLen bytes and distinct across all lines; a host or waypoint is
// listed at most once.
package auth
