// Package ztunnel is ambit's per-node L4 proxy. It accepts the TCP
// connections that eBPF steers to it (outbound capture on 15001, inbound
// plaintext on 15006), HBONE tunnels on 15008 and SOCKS5 on 15080 for hosts
// without eBPF; it resolves each outbound destination over the config model
// (a Service VIP is balanced over its ready endpoints, a pod IP goes to that
// pod, a waypoint takes the traffic it is configured for, anything else passes
// through), carries meshed connections in mutual-TLS HBONE tunnels (package
// hbone) between workload identities, enforces L4 policy at the destination
// (package authz) and delivers to the local pod with the client's own source
// address. It serves an admin API (15000, localhost), Prometheus metrics with
// Istio's names (15020) and readiness (15021).
//
// No waypoint bypass (ambit's default; Istio needs a hand-written L4 policy
// for it): a target is waypoint-bound when its workload has a waypoint
// (waypoint-for workload/all), or when it is an endpoint of a Service with a
// waypoint and the target port is one that Service sends to on this endpoint
// (the endpoint's port map, else the target port, else the port; the pod's
// other ports are not bound). A tunnel to a bound target is accepted only from
// one of the binding waypoints' identities, spiffe://<the pod's trust
// domain>/ns/<waypoint namespace>/sa/<waypoint name> (Istio's and ambit's
// deployer's naming: the service account is the Gateway's name); anything
// else is refused with 401 as a policy denial (response flag DENY, counted in
// ambit_ztunnel_waypoint_bypass_refused_total, the reason in the access log).
// A binding waypoint without an address (missing, not ready) changes
// nothing, so the target fails closed. Plaintext captured on 15006 has no
// identity: to a bound target it is reset, whatever PeerAuthentication says.
// A tunnel from the waypoint then passes the normal L4 policy (package authz)
// with the waypoint as the source principal. Which (pod IP, port) are bound is
// indexed once per config snapshot, for the node's workloads. Since the
// destination cannot tell which Service a tunnel was addressed to, a port
// shared with a Service without a waypoint is bound too. A workload labelled
// ambit.dev/waypoint-bypass=allow (on the pod or its namespace;
// model.Workload.WaypointBypass) opts out of the Service bindings, for
// Istio's behaviour: a connection addressed to the pod's own IP reaches it
// directly, through its L4 policy; its own waypoint is still enforced.
//
// A Proxy is made with New, which binds every configured listener (so tests
// can ask for ephemeral ports and read them back with Addr), and runs with Run
// until its context ends, then drains: it stops accepting and lets
// connections finish until Config.DrainTimeout.
package ztunnel
