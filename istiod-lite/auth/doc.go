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
//   - HostAuthenticator (local mode) maps per-host secrets to callers;
//     HostFile is one read from the host credentials file and reloaded when
//     the file changes (rotation without a restart).
//   - Cache wraps another Authenticator (istiod-lite wraps
//     KubeAuthenticator in it): answers remembered by the token's SHA-256,
//     an accepted token until its expiry or Cache.MaxAge, a refused one for
//     Cache.NegativeAge, one check at a time per token, a bounded number of
//     checks at once and a share of them per source IP. Its Precheck
//     (JWTFilter in cluster mode) refuses, without a TokenReview, tokens
//     that cannot be valid: not a JWT, another issuer, not for istio-ca,
//     expired. Callers it returns carry their token's expiry
//     (Caller.Expires): xDS ends their streams then.
//
// istiod-lite authenticates each call once, in its 15012 gate
// (istiod-lite/gate), before the call's stream exists, and passes the
// caller on in the call's context (NewContext); AuthenticateIncoming takes
// it from there. RefusalLog logs refusals a few lines and a count per
// interval, whatever their number.
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
//
// Secrets are static bearer credentials: whoever holds one is that host (or
// waypoint) to istiod-lite until it is rotated. Keep the file readable by
// istiod-lite only (0600) and each host's copy readable by its ztunnel only.
// To rotate a host's secret, write the new one to the host's token file
// (the ztunnel reads it at every call: credential.Bearer with File) and
// replace the host's line in the credentials file (write a temporary file
// and rename it over); istiod-lite reloads the file within two
// DefaultHostFileInterval, refuses the old secret from then on, ends the
// xDS streams opened with it (Caller.Revoked) and accepts the new one; the
// ztunnel reconnects with the new secret. A file that does not parse, or
// lists no credential, is not taken.
package auth
