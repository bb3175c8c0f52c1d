// Package certs is ambit's workload identity: SPIFFE IDs of the form
// spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>, the CA that
// signs X.509-SVIDs for them, and the proxies' certificate manager. It builds on
// go-spiffe's types (spiffeid.ID, x509svid.SVID, x509bundle.Bundle) rather
// than re-writing them.
//
// The pieces:
//
//   - CA signs CSRs (SignCSR refuses anything but one SPIFFE URI SAN for the
//     requested identity in its trust domain, with a P-256/P-384 or
//     2048..8192-bit RSA key). Its root comes from LoadOrCreateCA over a
//     RootStore (FileStore here; a Kubernetes Secret in istiod-lite/ca), or
//     from an operator's files (LoadCAFiles). Its bundle may hold several
//     roots (Options.ExtraRoots, or a roots file) for rotation.
//   - Issuer is what signs for a Manager: *CA in process, or the gRPC client
//     of istiod-lite's certificate service (caclient.Client).
//   - Provider is what the proxies consume: GetX509SVID(ctx, id) plus
//     x509bundle.Source, SetIdentities and Certificates. Manager implements
//     it over an Issuer; a SPIRE-backed provider can implement it too.
//   - GetCertificate and GetClientCertificate plug a Provider into
//     crypto/tls; go-spiffe's tlsconfig.VerifyPeerCertificate(provider, ...)
//     verifies peers against its live bundle.
package certs
