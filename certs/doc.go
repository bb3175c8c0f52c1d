// Package certs is ambit's workload identity: SPIFFE IDs of the form
// spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>, the CA that
// signs X.509-SVIDs for them, and the proxies' certificate manager. It builds on
// go-spiffe's types (spiffeid.ID, x509svid.SVID, x509bundle.Bundle) rather
// than re-writing them.
package certs
