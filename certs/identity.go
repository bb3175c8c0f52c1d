package certs

import (
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultTrustDomain is the trust domain used when none is configured.
var DefaultTrustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")

// WorkloadID returns spiffe://<td>/ns/<namespace>/sa/<serviceAccount>.
func WorkloadID(td spiffeid.TrustDomain, namespace, serviceAccount string) (spiffeid.ID, error) {
	if namespace == "" || serviceAccount == "" {
		return spiffeid.ID{}, fmt.Errorf("workload id: namespace and service account are required (got %q, %q)", namespace, serviceAccount)
	}
	id, err := spiffeid.FromSegments(td, "ns", namespace, "sa", serviceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("workload id: %w", err)
	}
	return id, nil
}

// ParseWorkloadID splits a workload identity into its namespace and service
// account. It fails for IDs that are not of the form /ns/<ns>/sa/<sa>.
func ParseWorkloadID(id spiffeid.ID) (namespace, serviceAccount string, err error) {
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) != 4 || segs[0] != "ns" || segs[2] != "sa" || segs[1] == "" || segs[3] == "" {
		return "", "", fmt.Errorf("spiffe id %s: not a workload identity (want /ns/<namespace>/sa/<serviceaccount>)", id)
	}
	return segs[1], segs[3], nil
}
