// Package authz evaluates ambit's L4 authorization over the config model:
// AuthorizationPolicy (security.istio.io/v1 subset: ALLOW and DENY rules on
// source principals, namespaces and IP blocks, and destination ports) and
// PeerAuthentication (whether plaintext may reach a workload).
//
// Evaluation is a pure function of a *model.Snapshot, the destination
// workload and the connection's attributes, so the ztunnel (at the
// destination) and the waypoint (later, for L7) share it. Semantics follow
// Istio:
//
//   - DENY policies are evaluated first; any match denies.
//   - When no ALLOW policy selects the workload the connection is allowed;
//     once one does, some ALLOW policy must match.
//   - A policy selects a workload when it lives in the workload's namespace
//     (or is mesh-wide: MeshWide, or in the root namespace) and its selector's
//     labels are all on the workload (an empty selector selects every
//     workload in scope).
//   - A connection without a peer identity (plaintext) never matches
//     principals or namespaces; their Not* counterparts always match it.
package authz
