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
// A Proxy is made with New, which binds every configured listener (so tests
// can ask for ephemeral ports and read them back with Addr), and runs with Run
// until its context ends, then drains: it stops accepting and lets
// connections finish until Config.DrainTimeout.
package ztunnel
