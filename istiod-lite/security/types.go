// Package security holds the Go types of the security.istio.io/v1 subset that
// ambit reads: AuthorizationPolicy and PeerAuthentication. They decode from
// YAML files and from the dynamic informer's unstructured objects alike; the
// CRDs that serve them are in manifests/crds.
package security

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Group, versions and resources.
var (
	GroupVersion            = schema.GroupVersion{Group: "security.istio.io", Version: "v1"}
	AuthorizationPolicies   = GroupVersion.WithResource("authorizationpolicies")
	PeerAuthentications     = GroupVersion.WithResource("peerauthentications")
	KindAuthorizationPolicy = "AuthorizationPolicy"
	KindPeerAuthentication  = "PeerAuthentication"
)

// AuthorizationPolicy is security.istio.io/v1 AuthorizationPolicy.
type AuthorizationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              AuthorizationPolicySpec `json:"spec"`
}

// AuthorizationPolicySpec is the subset of the policy spec ambit reads.
type AuthorizationPolicySpec struct {
	Selector   *WorkloadSelector       `json:"selector,omitempty"`
	TargetRefs []PolicyTargetReference `json:"targetRefs,omitempty"`
	TargetRef  *PolicyTargetReference  `json:"targetRef,omitempty"`
	// Action is ALLOW (default), DENY, AUDIT or CUSTOM; ambit supports the
	// first two.
	Action string `json:"action,omitempty"`
	// Provider names the external authorizer of a CUSTOM policy. ambit
	// cannot call one: a CUSTOM policy denies what it selects (fail closed).
	Provider *ExtensionProvider `json:"provider,omitempty"`
	Rules    []Rule             `json:"rules,omitempty"`
}

// ExtensionProvider is a CUSTOM policy's provider.
type ExtensionProvider struct {
	Name string `json:"name,omitempty"`
}

// WorkloadSelector selects workloads by labels.
type WorkloadSelector struct {
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
}

// PolicyTargetReference names a Gateway or Service (policies for waypoints).
type PolicyTargetReference struct {
	Group     string `json:"group,omitempty"`
	Kind      string `json:"kind"`
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
}

// Rule is one rule: from, to and when clauses.
type Rule struct {
	From []RuleFrom  `json:"from,omitempty"`
	To   []RuleTo    `json:"to,omitempty"`
	When []Condition `json:"when,omitempty"`
}

// RuleFrom wraps a Source.
type RuleFrom struct {
	Source Source `json:"source"`
}

// RuleTo wraps an Operation.
type RuleTo struct {
	Operation Operation `json:"operation"`
}

// Source matches the peer.
type Source struct {
	Principals           []string `json:"principals,omitempty"`
	NotPrincipals        []string `json:"notPrincipals,omitempty"`
	RequestPrincipals    []string `json:"requestPrincipals,omitempty"`
	NotRequestPrincipals []string `json:"notRequestPrincipals,omitempty"`
	Namespaces           []string `json:"namespaces,omitempty"`
	NotNamespaces        []string `json:"notNamespaces,omitempty"`
	IPBlocks             []string `json:"ipBlocks,omitempty"`
	NotIPBlocks          []string `json:"notIpBlocks,omitempty"`
	RemoteIPBlocks       []string `json:"remoteIpBlocks,omitempty"`
	NotRemoteIPBlocks    []string `json:"notRemoteIpBlocks,omitempty"`
}

// Operation matches the destination (ports are L4; the rest is L7).
type Operation struct {
	Hosts      []string `json:"hosts,omitempty"`
	NotHosts   []string `json:"notHosts,omitempty"`
	Ports      []string `json:"ports,omitempty"`
	NotPorts   []string `json:"notPorts,omitempty"`
	Methods    []string `json:"methods,omitempty"`
	NotMethods []string `json:"notMethods,omitempty"`
	Paths      []string `json:"paths,omitempty"`
	NotPaths   []string `json:"notPaths,omitempty"`
}

// Condition is an L7 "when" condition.
type Condition struct {
	Key       string   `json:"key"`
	Values    []string `json:"values,omitempty"`
	NotValues []string `json:"notValues,omitempty"`
}

// PeerAuthentication is security.istio.io/v1 PeerAuthentication.
type PeerAuthentication struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              PeerAuthenticationSpec `json:"spec"`
}

// PeerAuthenticationSpec is the subset ambit reads.
type PeerAuthenticationSpec struct {
	Selector      *WorkloadSelector    `json:"selector,omitempty"`
	MTLS          *MutualTLS           `json:"mtls,omitempty"`
	PortLevelMTLS map[string]MutualTLS `json:"portLevelMtls,omitempty"` // keyed by port number; string keys so that unstructured objects convert
}

// MutualTLS carries the mode: UNSET, DISABLE, PERMISSIVE, STRICT.
type MutualTLS struct {
	Mode string `json:"mode,omitempty"`
}
