package translate

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/authz"
	"github.com/ambit-mesh/ambit/model"
)

// policyMesh is the fixture of the policy tests: the workload shop/web
// (app=web), and a namespace to put policies in.
const policyMesh = `
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web}
status: {phase: Running, podIP: 10.1.1.10, conditions: [{type: Ready, status: "True"}]}
`

// buildYAML translates policyMesh plus the documents in extra.
func buildYAML(t *testing.T, opts Options, extra string) Result {
	t.Helper()
	objs, _, err := Decode(strings.NewReader(policyMesh + "---\n" + extra))
	if err != nil {
		t.Fatal(err)
	}
	o := NewObjects()
	for _, obj := range objs {
		o.Set(obj)
	}
	return Build(o, opts)
}

func hasProblem(r Result, substr string) bool {
	for _, p := range r.Problems {
		if strings.Contains(p.String(), substr) {
			return true
		}
	}
	return false
}

func authPolicy(action, rules string) string {
	return `apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: "` + action + `"
  rules: ` + rules + "\n"
}

// TestPolicyFailsClosed: an AuthorizationPolicy that ztunnel cannot fully
// understand never opens the workload it selects.
func TestPolicyFailsClosed(t *testing.T) {
	cart := authz.Conn{SrcIdentity: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart"), SrcIP: netip.MustParseAddr("10.1.2.20"), DstPort: 5432}
	const fromCart = `{source: {principals: ["cluster.local/ns/shop/sa/cart"]}}`
	for _, c := range []struct {
		name    string
		action  string
		rules   string
		allow   bool   // for cart -> web:5432
		problem string // a substring of a reported problem; "" for none
	}{
		{"allow: bad port allows nothing", "ALLOW", `[{to: [{operation: {ports: ["5432", "postgres"]}}]}]`, false, `"postgres" is not a port`},
		{"allow: bad notPorts allows nothing", "ALLOW", `[{to: [{operation: {notPorts: ["x"]}}]}]`, false, "allows nothing"},
		{"allow: bad CIDR allows nothing", "ALLOW", `[{from: [{source: {ipBlocks: ["10.1.0.0/33"]}}]}]`, false, "not a CIDR"},
		{"allow: bad notIpBlocks allows nothing", "ALLOW", `[{from: [{source: {notIpBlocks: ["nope"]}}]}]`, false, "allows nothing"},
		{"allow: a good rule beside a bad one still allows", "ALLOW", `[{to: [{operation: {ports: ["x"]}}]}, {from: [` + fromCart + `]}]`, true, "rules[0]"},
		{"allow: empty source allows nothing", "ALLOW", `[{from: [{source: {}}]}]`, false, "from[0].source is empty"},
		{"allow: from without source allows nothing", "ALLOW", `[{from: [{}]}]`, false, "from[0].source is empty"},
		{"allow: empty from allows nothing", "ALLOW", `[{from: []}]`, false, "from is empty"},
		{"allow: empty operation allows nothing", "ALLOW", `[{to: [{operation: {}}]}]`, false, "to[0].operation is empty"},
		{"allow: empty to allows nothing", "ALLOW", `[{from: [` + fromCart + `], to: []}]`, false, "to is empty"},
		{"allow: an empty rule allows all (valid)", "ALLOW", `[{}]`, true, ""},
		{"allow: valid rule", "", `[{from: [` + fromCart + `], to: [{operation: {ports: ["5432"]}}]}]`, true, ""},
		{"deny: bad port denies on every port", "DENY", `[{from: [` + fromCart + `], to: [{operation: {ports: ["5432", "postgres"]}}]}]`, false, "denies without the invalid fields"},
		{"deny: bad notPorts denies on every port", "DENY", `[{from: [` + fromCart + `], to: [{operation: {notPorts: ["x"]}}]}]`, false, "not a port"},
		{"deny: bad CIDR denies from every address", "DENY", `[{from: [{source: {ipBlocks: ["10.0.0.0/8", "bad"]}}]}]`, false, "not an IP or CIDR"},
		{"deny: bad notIpBlocks denies from every address", "DENY", `[{from: [{source: {notIpBlocks: ["10.1.2.0/24", "bad"]}}]}]`, false, "not an IP or CIDR"},
		{"deny: empty source denies all", "DENY", `[{from: [{source: {}}]}]`, false, "from[0].source is empty"},
		{"deny: empty to denies all", "DENY", `[{to: []}]`, false, "to is empty"},
		{"deny: valid rule for another port", "DENY", `[{to: [{operation: {ports: ["80"]}}]}]`, true, ""},
		{"unknown action denies all", "REJECT", `[{from: [` + fromCart + `]}]`, false, `unknown action "REJECT"`},
		{"lowercase deny is unknown: denies all", "deny", `[{from: [{source: {principals: ["cluster.local/ns/x/sa/y"]}}]}]`, false, `unknown action "deny"`},
		{"lowercase allow is unknown: denies all", "allow", `[{from: [` + fromCart + `]}]`, false, `unknown action "allow"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := buildYAML(t, Options{}, authPolicy(c.action, c.rules))
			web := r.Snapshot.Workloads[WorkloadUID("", "shop", "web")]
			if web == nil {
				t.Fatal("no workload shop/web")
			}
			if d := authz.Evaluate(r.Snapshot, web, cart); d.Allow != c.allow {
				t.Errorf("cart -> web:5432: allow = %v (%s), want %v; policies %+v", d.Allow, d.Reason, c.allow, r.Snapshot.Policies)
			}
			if c.problem == "" && len(r.Problems) > 0 {
				t.Errorf("problems %v, want none", r.Problems)
			}
			if c.problem != "" && !hasProblem(r, c.problem) {
				t.Errorf("problems %v, want one containing %q", r.Problems, c.problem)
			}
		})
	}
}

// TestUnknownActionKeepsSelector: the deny-all that replaces a policy with an
// unknown action applies only to the workloads the policy selects.
func TestUnknownActionKeepsSelector(t *testing.T) {
	r := buildYAML(t, Options{}, `apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: {matchLabels: {app: other}}
  action: Deny
`)
	p := r.Snapshot.Policies["shop/p"]
	if p == nil || p.Action != model.ActionDeny || len(p.Rules) != 1 || p.Selector["app"] != "other" {
		t.Fatalf("policy = %+v, want a deny-all for app=other", p)
	}
	web := r.Snapshot.Workloads[WorkloadUID("", "shop", "web")]
	if d := authz.Evaluate(r.Snapshot, web, authz.Conn{DstPort: 80}); !d.Allow {
		t.Errorf("web (not selected) denied: %s", d.Reason)
	}
}

// TestPeerAuthnFailsClosed: a PeerAuthentication mode ztunnel does not
// understand, or a port-level STRICT, refuses plaintext.
func TestPeerAuthnFailsClosed(t *testing.T) {
	plain := authz.Conn{SrcIP: netip.MustParseAddr("10.1.2.20"), DstPort: 5432}
	for _, c := range []struct {
		name    string
		spec    string
		mode    model.PeerAuthnMode
		problem string
	}{
		{"lowercase strict is unknown: STRICT", `{mtls: {mode: strict}}`, model.MTLSStrict, `unknown mtls mode "strict"`},
		{"unknown mode: STRICT", `{mtls: {mode: STRIKT}}`, model.MTLSStrict, `unknown mtls mode "STRIKT"`},
		{"port-level STRICT makes the workload STRICT", `{mtls: {mode: PERMISSIVE}, portLevelMtls: {5432: {mode: STRICT}}}`, model.MTLSStrict, "port 5432 is STRICT"},
		{"port-level STRICT under UNSET", `{portLevelMtls: {8080: {mode: PERMISSIVE}, 5432: {mode: STRICT}}}`, model.MTLSStrict, "port 5432 is STRICT"},
		{"port-level unknown mode: STRICT", `{mtls: {mode: PERMISSIVE}, portLevelMtls: {5432: {mode: strict}}}`, model.MTLSStrict, `portLevelMtls[5432]: unknown mtls mode "strict"`},
		{"port-level PERMISSIVE under STRICT stays STRICT", `{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}`, model.MTLSStrict, "the workload-level mode applies to every port"},
		{"PERMISSIVE", `{mtls: {mode: PERMISSIVE}}`, model.MTLSPermissive, ""},
		{"STRICT", `{mtls: {mode: STRICT}}`, model.MTLSStrict, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := buildYAML(t, Options{}, `apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: pa, namespace: shop}
spec: `+c.spec+"\n")
			web := r.Snapshot.Workloads[WorkloadUID("", "shop", "web")]
			if got := (authz.Evaluator{}).PeerAuthnMode(r.Snapshot, web); got != c.mode {
				t.Errorf("mode = %q, want %q", got, c.mode)
			}
			if d := (authz.Evaluator{}).AllowPlaintext(r.Snapshot, web, plain); d.Allow != (c.mode != model.MTLSStrict) {
				t.Errorf("plaintext to 5432: allow = %v (%s)", d.Allow, d.Reason)
			}
			if c.problem == "" && len(r.Problems) > 0 {
				t.Errorf("problems %v, want none", r.Problems)
			}
			if c.problem != "" && !hasProblem(r, c.problem) {
				t.Errorf("problems %v, want one containing %q", r.Problems, c.problem)
			}
		})
	}
}

// TestPrincipalTrustDomainAlias: "cluster.local" in a principal stands for
// the mesh's trust domain.
func TestPrincipalTrustDomainAlias(t *testing.T) {
	for _, c := range []struct {
		name        string
		trustDomain string
		source      string
		allow       bool // for <trust domain>/ns/shop/sa/cart
	}{
		{"alias", "example.org", `{principals: ["cluster.local/ns/shop/sa/cart"]}`, true},
		{"alias with scheme", "example.org", `{principals: ["spiffe://cluster.local/ns/shop/sa/cart"]}`, true},
		{"alias prefix", "example.org", `{principals: ["cluster.local/ns/shop/*"]}`, true},
		{"alias in notPrincipals", "example.org", `{principals: ["*"], notPrincipals: ["cluster.local/ns/shop/sa/cart"]}`, false},
		{"own trust domain", "example.org", `{principals: ["example.org/ns/shop/sa/cart"]}`, true},
		{"other trust domain", "example.org", `{principals: ["other.org/ns/shop/sa/cart"]}`, false},
		{"other service account", "example.org", `{principals: ["cluster.local/ns/shop/sa/admin"]}`, false},
		{"default trust domain", "", `{principals: ["cluster.local/ns/shop/sa/cart"]}`, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			td := c.trustDomain
			if td == "" {
				td = "cluster.local"
			}
			cart := authz.Conn{SrcIdentity: spiffeid.RequireFromString("spiffe://" + td + "/ns/shop/sa/cart"), DstPort: 80}
			r := buildYAML(t, Options{TrustDomain: c.trustDomain}, authPolicy("ALLOW", `[{from: [{source: `+c.source+`}]}]`))
			web := r.Snapshot.Workloads[WorkloadUID("", "shop", "web")]
			if d := authz.Evaluate(r.Snapshot, web, cart); d.Allow != c.allow {
				t.Errorf("allow = %v (%s), want %v; policy %+v", d.Allow, d.Reason, c.allow, r.Snapshot.Policies["shop/p"])
			}
			if len(r.Problems) > 0 {
				t.Errorf("problems %v", r.Problems)
			}
		})
	}
}

// TestIPv4MappedCIDR: IPv4-mapped IPv6 blocks match the IPv4 sources they
// stand for.
func TestIPv4MappedCIDR(t *testing.T) {
	from := func(ip string) authz.Conn { return authz.Conn{SrcIP: netip.MustParseAddr(ip), DstPort: 80} }
	for _, c := range []struct {
		name   string
		action string
		source string
		conn   authz.Conn
		allow  bool
	}{
		{"allow mapped CIDR", "ALLOW", `{ipBlocks: ["::ffff:10.1.0.0/112"]}`, from("10.1.2.20"), true},
		{"allow mapped CIDR, mapped source", "ALLOW", `{ipBlocks: ["::ffff:10.1.0.0/112"]}`, from("::ffff:10.1.2.20"), true},
		{"allow mapped CIDR, other source", "ALLOW", `{ipBlocks: ["::ffff:10.1.0.0/112"]}`, from("10.2.0.1"), false},
		{"allow mapped address", "ALLOW", `{ipBlocks: ["::ffff:10.1.2.20"]}`, from("10.1.2.20"), true},
		{"deny mapped CIDR", "DENY", `{ipBlocks: ["::ffff:10.0.0.0/104"]}`, from("10.1.2.20"), false},
		{"allow all but mapped CIDR", "ALLOW", `{ipBlocks: ["0.0.0.0/0"], notIpBlocks: ["::ffff:10.0.0.0/104"]}`, from("10.1.2.20"), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := buildYAML(t, Options{}, authPolicy(c.action, `[{from: [{source: `+c.source+`}]}]`))
			web := r.Snapshot.Workloads[WorkloadUID("", "shop", "web")]
			if d := authz.Evaluate(r.Snapshot, web, c.conn); d.Allow != c.allow {
				t.Errorf("allow = %v (%s), want %v; policy %+v", d.Allow, d.Reason, c.allow, r.Snapshot.Policies["shop/p"])
			}
		})
	}
}
