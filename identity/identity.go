// Package identity names things the SPIFFE way: workload identities
// (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>), the default
// trust domain, and istiod-lite's own identity and DNS name. It is a leaf:
// names only, no X.509, keys or CA, so that the model, policy evaluation and
// the proxies can use names without linking certificate code.
package identity

import (
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultTrustDomain is the trust domain used when none is configured.
var DefaultTrustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")

// ControlPlaneNamespace is istiod-lite's namespace in a cluster.
const ControlPlaneNamespace = "ambit-system"

// ControlPlaneServiceAccount is istiod-lite's service account.
const ControlPlaneServiceAccount = "istiod-lite"

// ControlPlaneDNSName is the DNS SAN istiod-lite's serving certificate always
// carries. The CA never puts a DNS SAN on a certificate it signs from a CSR,
// so no workload or proxy certificate can pass for istiod-lite's, even one
// issued for istiod-lite's SPIFFE ID.
const ControlPlaneDNSName = ControlPlaneServiceAccount + "." + ControlPlaneNamespace + ".svc"

// Workload returns spiffe://<td>/ns/<namespace>/sa/<serviceAccount>.
func Workload(td spiffeid.TrustDomain, namespace, serviceAccount string) (spiffeid.ID, error) {
	if namespace == "" || serviceAccount == "" {
		return spiffeid.ID{}, fmt.Errorf("workload id: namespace and service account are required (got %q, %q)", namespace, serviceAccount)
	}
	id, err := spiffeid.FromSegments(td, "ns", namespace, "sa", serviceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("workload id: %w", err)
	}
	return id, nil
}

// ParseWorkload splits a workload identity into its namespace and service
// account. It fails for IDs that are not of the form /ns/<ns>/sa/<sa>.
func ParseWorkload(id spiffeid.ID) (namespace, serviceAccount string, err error) {
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) != 4 || segs[0] != "ns" || segs[2] != "sa" || segs[1] == "" || segs[3] == "" {
		return "", "", fmt.Errorf("spiffe id %s: not a workload identity (want /ns/<namespace>/sa/<serviceaccount>)", id)
	}
	return segs[1], segs[3], nil
}

// ControlPlane is istiod-lite's SPIFFE ID in td: that of its service account.
func ControlPlane(td spiffeid.TrustDomain) spiffeid.ID {
	id, _ := Workload(td, ControlPlaneNamespace, ControlPlaneServiceAccount)
	return id
}
