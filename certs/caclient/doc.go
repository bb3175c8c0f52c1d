// Package caclient is the client of istiod-lite's certificate service
// (api/ca/v1, on istiod-lite's TLS port 15012): what a ztunnel or a waypoint
// needs to obtain its workloads' X.509-SVIDs, and nothing of the server.
//
//   - Client sends a CSR for one SPIFFE identity with a bearer token (a
//     projected service-account token, or a host's secret in local mode)
//     and implements certs.Issuer for a certs.Manager.
//   - TLSConfig verifies istiod-lite's serving certificate the SPIFFE way:
//     it chains to the mesh's roots and carries ServerID. xDS clients use it
//     too, since xDS shares the port.
//   - BundleFile supplies those roots from a mounted PEM file (the
//     ambit-ca-root ConfigMap), following rotations.
//
// In a ztunnel:
//
//	roots := &caclient.BundleFile{Path: rootsPath}
//	client := &caclient.Client{Addr: "istiod-lite.ambit-system.svc:15012", Roots: roots, TokenFile: tokenPath}
//	mgr := &certs.Manager{Issuer: client, Logger: log}
//
// The package must not import client-go or the Kubernetes API types: every
// ztunnel links it, and those packages cost each one about 16 MB of memory.
// The server side is istiod-lite/ca.
package caclient
