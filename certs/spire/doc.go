// Package spire is the SPIRE-backed certs.Provider: ztunnels and waypoints
// take their X.509-SVIDs and trust bundles from the node's SPIRE agent
// instead of istiod-lite's CA.
//
// Two ways in, one behaviour:
//
//   - Delegated (the ztunnel): the agent's admin socket, Delegated Identity
//     API (spire-api-sdk, agent/delegatedidentity/v1). The ztunnel is an
//     authorized delegate; for each local workload identity that
//     SetIdentities names it subscribes to X.509-SVIDs by selectors
//     (k8s:ns:<namespace>, k8s:sa:<service account>, from the SPIFFE ID's
//     path), and once to the trust bundles (SubscribeToX509Bundles: the
//     agent's own trust domain and every federated one).
//   - Workload (a waypoint): the agent's Workload API socket; the agent
//     attests the calling process and streams its own SVIDs and bundles
//     (the SPIFFE Workload API), so a waypoint gets nothing but itself.
//
// Both follow SPIRE's pushes: a new SVID replaces the old one at once (the
// next handshake uses it; established connections keep theirs), an update
// that no longer carries an identity drops it (its entry was deleted). When
// the agent is gone the last SVID stays in use until it expires; after
// that GetX509SVID fails, so new connections are refused (fail closed,
// never plaintext). Streams are re-established with backoff, so the
// identities come back when the agent does, without a restart. Identities
// are matched exactly: spiffe://<td>/ns/<ns>/sa/<sa>, where <td> is SPIRE's
// trust domain (istiod-lite's --trust-domain must name the same one).
//
// What an operator registers (spire-server entry create, or SPIRE's
// controller manager with a ClusterSPIFFEID):
//
//   - the ztunnel as a delegate: an entry for the ztunnel pods (e.g.
//     -spiffeID spiffe://<td>/ns/ambit-system/sa/ztunnel -selector
//     k8s:ns:ambit-system -selector k8s:sa:ztunnel, parented to the nodes),
//     and that ID in the agent's authorized_delegates; the agent's
//     admin_socket_path outside the directory it shares with workloads;
//   - per service account of the mesh: -spiffeID
//     spiffe://<td>/ns/<ns>/sa/<sa> -selector k8s:ns:<ns> -selector
//     k8s:sa:<sa>, parented to the nodes (a node alias, or the agents'
//     IDs), with only those two selectors (the ztunnel asks with exactly
//     them; an entry with more selectors, e.g. a pod label, does not match).
//     A ClusterSPIFFEID template
//     "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
//     with the k8s:ns/k8s:sa selectors gives the same;
//   - waypoints: the same entry for the waypoint's service account, which
//     the agent's k8s workload attestor matches for the waypoint pod.
//
// docs/spire.md has the whole set-up.
package spire
