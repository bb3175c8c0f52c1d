// Package ca is istiod-lite's certificate service: ztunnels and waypoints
// send a CSR for one SPIFFE identity over gRPC (api/ca/v1, on the TLS port
// 15012 that xDS shares) and get an X.509-SVID signed by certs.CA.
//
// Who may hold which identity:
//
//   - A caller authenticates with a bearer token, checked by an
//     auth.Authenticator (package istiod-lite/auth): in cluster mode a
//     Kubernetes service-account token, bound to a pod and issued for the
//     audience "istio-ca" (auth.KubeAuthenticator); in local mode a secret
//     from a file (auth.HostAuthenticator). The caller's kind decides.
//   - A node proxy (a ztunnel pod, by its service account, or a local host)
//     may obtain certificates only for service accounts that have a workload
//     on its own node (Workloads: PodIndex in cluster mode, StoreWorkloads
//     over model.Store in local mode), never of istiod-lite's namespace. A
//     waypoint and any other pod (a workload) may obtain only their own
//     identity. An operator may obtain none. Everything else is
//     PermissionDenied, logged with the caller, its node and the identity
//     asked for.
//
// Wiring in istiod-lite:
//
//	srv := &ca.Server{CA: authority, Authenticator: &auth.KubeAuthenticator{Client: cs}, Workloads: pods, Logger: log}
//	serving := &ca.ServingCert{CA: authority, DNSNames: extraSANs}
//	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(serving.TLSConfig())))
//	srv.Register(g) // xDS registers on the same server
//
// The client side (caclient.Client, caclient.TLSConfig, caclient.BundleFile,
// caclient.ServerID) lives in certs/caclient, which ztunnels link without
// client-go; this package is for istiod-lite only.
//
// The CA's root lives in the Secret ambit-system/ambit-ca (SecretStore, with
// certs.LoadOrCreateCA) unless the operator provides one.
package ca
