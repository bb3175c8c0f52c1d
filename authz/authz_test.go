package authz

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/model"
)

var (
	web = &model.Workload{UID: "c/Pod/shop/web", Name: "web", Namespace: "shop", ServiceAccount: "web",
		Labels: map[string]string{"app": "web", "tier": "front"}, Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.10")}}
	db = &model.Workload{UID: "c/Pod/data/db", Name: "db", Namespace: "data", ServiceAccount: "db",
		Labels: map[string]string{"app": "db"}, Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.20")}}

	idCart    = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	idAdmin   = spiffeid.RequireFromString("spiffe://cluster.local/ns/ops/sa/admin")
	idForeign = spiffeid.RequireFromString("spiffe://other.org/ns/shop/sa/cart")
	idOdd     = spiffeid.RequireFromString("spiffe://cluster.local/host/vm1") // not a workload ID: no namespace
)

func ip(s string) netip.Addr              { return netip.MustParseAddr(s) }
func pfx(s string) netip.Prefix           { return netip.MustParsePrefix(s) }
func from(s ...model.Source) []model.Rule { return []model.Rule{{From: s}} }

func pol(ns, name string, action model.Action, sel map[string]string, rules ...model.Rule) *model.Policy {
	return &model.Policy{Name: name, Namespace: ns, Action: action, Selector: sel, Rules: rules}
}

func TestEvaluate(t *testing.T) {
	cart := Conn{SrcIdentity: idCart, SrcIP: ip("10.0.1.5"), DstPort: 8080}
	admin := Conn{SrcIdentity: idAdmin, SrcIP: ip("10.0.2.5"), DstPort: 8080}
	plain := Conn{SrcIP: ip("10.0.1.5"), DstPort: 8080}

	tests := []struct {
		name      string
		policies  []*model.Policy
		dst       *model.Workload
		conn      Conn
		allow     bool
		decidedBy string
	}{
		{name: "no policy allows", dst: web, conn: cart, allow: true},
		{name: "no policy allows plaintext", dst: web, conn: plain, allow: true},
		{name: "nil destination denied", dst: nil, conn: cart, allow: false},
		{name: "policy in another namespace does not select",
			policies: []*model.Policy{pol("data", "only-admin", model.ActionAllow, nil, from(model.Source{Principals: []string{"cluster.local/ns/ops/sa/admin"}})...)},
			dst:      web, conn: cart, allow: true},
		{name: "allow exact principal matches",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"cluster.local/ns/shop/sa/cart"}})...)},
			dst:      web, conn: cart, allow: true, decidedBy: "shop/a"},
		{name: "allow principal with spiffe scheme matches",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"spiffe://cluster.local/ns/shop/sa/cart"}})...)},
			dst:      web, conn: cart, allow: true, decidedBy: "shop/a"},
		{name: "allow selects then denies by default",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"cluster.local/ns/shop/sa/cart"}})...)},
			dst:      web, conn: admin, allow: false},
		{name: "allow with no rules denies everything",
			policies: []*model.Policy{pol("shop", "nothing", model.ActionAllow, nil)},
			dst:      web, conn: cart, allow: false},
		{name: "allow with an empty rule allows everything",
			policies: []*model.Policy{pol("shop", "all", model.ActionAllow, nil, model.Rule{})},
			dst:      web, conn: plain, allow: true, decidedBy: "shop/all"},
		{name: "deny with no rules denies nothing",
			policies: []*model.Policy{pol("shop", "none", model.ActionDeny, nil)},
			dst:      web, conn: cart, allow: true},
		{name: "principal wildcard",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"*"}})...)},
			dst:      web, conn: cart, allow: true},
		{name: "principal wildcard does not match plaintext",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"*"}})...)},
			dst:      web, conn: plain, allow: false},
		{name: "principal prefix",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"cluster.local/ns/shop/*"}})...)},
			dst:      web, conn: cart, allow: true},
		{name: "principal prefix misses other namespace",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"cluster.local/ns/shop/*"}})...)},
			dst:      web, conn: admin, allow: false},
		{name: "principal suffix",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"*/sa/admin"}})...)},
			dst:      web, conn: admin, allow: true},
		{name: "foreign trust domain does not match local principal",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"cluster.local/ns/shop/sa/cart"}})...)},
			dst:      web, conn: Conn{SrcIdentity: idForeign, DstPort: 8080}, allow: false},
		{name: "namespaces match the identity's namespace",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Namespaces: []string{"ops"}})...)},
			dst:      web, conn: admin, allow: true},
		{name: "namespaces miss",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Namespaces: []string{"ops"}})...)},
			dst:      web, conn: cart, allow: false},
		{name: "namespaces never match plaintext",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Namespaces: []string{"*"}})...)},
			dst:      web, conn: plain, allow: false},
		{name: "namespaces never match a non-workload identity",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Namespaces: []string{"*"}})...)},
			dst:      web, conn: Conn{SrcIdentity: idOdd}, allow: false},
		{name: "deny beats allow",
			policies: []*model.Policy{
				pol("shop", "allow-all", model.ActionAllow, nil, model.Rule{}),
				pol("shop", "deny-ops", model.ActionDeny, nil, from(model.Source{Namespaces: []string{"ops"}})...),
			},
			dst: web, conn: admin, allow: false, decidedBy: "shop/deny-ops"},
		{name: "deny not matching lets allow decide",
			policies: []*model.Policy{
				pol("shop", "allow-all", model.ActionAllow, nil, model.Rule{}),
				pol("shop", "deny-ops", model.ActionDeny, nil, from(model.Source{Namespaces: []string{"ops"}})...),
			},
			dst: web, conn: cart, allow: true, decidedBy: "shop/allow-all"},
		{name: "deny notPrincipals matches plaintext",
			policies: []*model.Policy{pol("shop", "d", model.ActionDeny, nil, from(model.Source{NotPrincipals: []string{"cluster.local/ns/shop/sa/cart"}})...)},
			dst:      web, conn: plain, allow: false},
		{name: "deny notPrincipals spares the listed principal",
			policies: []*model.Policy{pol("shop", "d", model.ActionDeny, nil, from(model.Source{NotPrincipals: []string{"cluster.local/ns/shop/sa/cart"}})...)},
			dst:      web, conn: cart, allow: true},
		{name: "deny notNamespaces",
			policies: []*model.Policy{pol("shop", "d", model.ActionDeny, nil, from(model.Source{NotNamespaces: []string{"shop"}})...)},
			dst:      web, conn: admin, allow: false},
		{name: "ip block allows",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{IPBlocks: []netip.Prefix{pfx("10.0.1.0/24")}})...)},
			dst:      web, conn: plain, allow: true},
		{name: "ip block matches v4-mapped source",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{IPBlocks: []netip.Prefix{pfx("10.0.1.0/24")}})...)},
			dst:      web, conn: Conn{SrcIP: ip("::ffff:10.0.1.9")}, allow: true},
		{name: "ip block misses",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{IPBlocks: []netip.Prefix{pfx("10.0.1.0/24")}})...)},
			dst:      web, conn: admin, allow: false},
		{name: "notIpBlocks deny",
			policies: []*model.Policy{pol("shop", "d", model.ActionDeny, nil, from(model.Source{NotIPBlocks: []netip.Prefix{pfx("10.0.0.0/16")}})...)},
			dst:      web, conn: Conn{SrcIdentity: idCart, SrcIP: ip("192.168.1.1")}, allow: false},
		{name: "all fields of a source must match",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Namespaces: []string{"shop"}, IPBlocks: []netip.Prefix{pfx("10.9.0.0/16")}})...)},
			dst:      web, conn: cart, allow: false},
		{name: "any source of a rule may match",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, from(model.Source{Namespaces: []string{"ops"}}, model.Source{Namespaces: []string{"shop"}})...)},
			dst:      web, conn: cart, allow: true},
		{name: "to ports match",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, model.Rule{To: []model.Target{{Ports: []uint16{8080}}}})},
			dst:      web, conn: cart, allow: true},
		{name: "to ports miss",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, model.Rule{To: []model.Target{{Ports: []uint16{9090}}}})},
			dst:      web, conn: cart, allow: false},
		{name: "deny notPorts",
			policies: []*model.Policy{pol("shop", "d", model.ActionDeny, nil, model.Rule{To: []model.Target{{NotPorts: []uint16{80}}}})},
			dst:      web, conn: cart, allow: false},
		{name: "from and to must both match",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil, model.Rule{
				From: []model.Source{{Namespaces: []string{"shop"}}}, To: []model.Target{{Ports: []uint16{9090}}}})},
			dst: web, conn: cart, allow: false},
		{name: "any rule may match",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, nil,
				model.Rule{To: []model.Target{{Ports: []uint16{9090}}}},
				model.Rule{From: []model.Source{{Namespaces: []string{"shop"}}}})},
			dst: web, conn: cart, allow: true},
		{name: "selector matching labels selects",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, map[string]string{"app": "web"}, from(model.Source{Namespaces: []string{"ops"}})...)},
			dst:      web, conn: cart, allow: false},
		{name: "selector with a missing label does not select",
			policies: []*model.Policy{pol("shop", "a", model.ActionAllow, map[string]string{"app": "web", "tier": "back"}, from(model.Source{Namespaces: []string{"ops"}})...)},
			dst:      web, conn: cart, allow: true},
		{name: "root namespace policy applies mesh-wide",
			policies: []*model.Policy{pol("ambit-system", "mesh-deny", model.ActionDeny, nil, from(model.Source{Namespaces: []string{"ops"}})...)},
			dst:      db, conn: admin, allow: false, decidedBy: "ambit-system/mesh-deny"},
		{name: "root namespace policy with selector applies to matching workloads anywhere",
			policies: []*model.Policy{pol("ambit-system", "dbs", model.ActionAllow, map[string]string{"app": "db"}, from(model.Source{Namespaces: []string{"ops"}})...)},
			dst:      db, conn: cart, allow: false},
		{name: "root namespace policy with selector skips others",
			policies: []*model.Policy{pol("ambit-system", "dbs", model.ActionAllow, map[string]string{"app": "db"}, from(model.Source{Namespaces: []string{"ops"}})...)},
			dst:      web, conn: cart, allow: true},
		{name: "MeshWide flag applies anywhere",
			policies: []*model.Policy{{Name: "m", Namespace: "mesh-config", MeshWide: true, Action: model.ActionDeny, Rules: from(model.Source{Namespaces: []string{"shop"}})}},
			dst:      db, conn: cart, allow: false, decidedBy: "mesh-config/m"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			snap := model.NewSnapshot([]*model.Workload{web, db}, nil, tt.policies, nil)
			d := Evaluate(snap, tt.dst, tt.conn)
			if d.Allow != tt.allow {
				t.Fatalf("allow = %v, want %v (%+v)", d.Allow, tt.allow, d)
			}
			if tt.decidedBy != "" && d.Policy != tt.decidedBy {
				t.Fatalf("decided by %q, want %q", d.Policy, tt.decidedBy)
			}
			if d.Reason == "" {
				t.Fatal("empty reason")
			}
		})
	}
}

func TestCustomRootNamespace(t *testing.T) {
	snap := model.NewSnapshot(nil, nil, []*model.Policy{
		pol("mesh-root", "deny-all", model.ActionDeny, nil, model.Rule{}),
	}, nil)
	c := Conn{SrcIdentity: idCart, DstPort: 80}
	if d := Evaluate(snap, db, c); !d.Allow {
		t.Fatalf("default root namespace: mesh-root should not apply: %+v", d)
	}
	if d := (Evaluator{RootNamespace: "mesh-root"}).Evaluate(snap, db, c); d.Allow {
		t.Fatalf("custom root namespace: policy should apply: %+v", d)
	}
}

func TestMatchString(t *testing.T) {
	for _, tt := range []struct {
		p, v string
		want bool
	}{
		{"a", "a", true}, {"a", "ab", false}, {"*", "x", true}, {"*", "", false},
		{"ab*", "abc", true}, {"ab*", "xab", false}, {"*bc", "abc", true}, {"*bc", "bcd", false},
	} {
		if got := MatchString(tt.p, tt.v); got != tt.want {
			t.Errorf("MatchString(%q, %q) = %v", tt.p, tt.v, got)
		}
	}
}

func TestPeerAuthn(t *testing.T) {
	pa := func(ns, name string, mode model.PeerAuthnMode, sel map[string]string) *model.PeerAuthentication {
		return &model.PeerAuthentication{Name: name, Namespace: ns, Mode: mode, Selector: sel}
	}
	tests := []struct {
		name string
		pas  []*model.PeerAuthentication
		dst  *model.Workload
		want model.PeerAuthnMode
	}{
		{name: "nothing set is permissive", dst: web, want: model.MTLSPermissive},
		{name: "mesh-wide strict", pas: []*model.PeerAuthentication{pa("ambit-system", "default", model.MTLSStrict, nil)}, dst: web, want: model.MTLSStrict},
		{name: "MeshWide flag", pas: []*model.PeerAuthentication{{Name: "m", Namespace: "cfg", MeshWide: true, Mode: model.MTLSStrict}}, dst: db, want: model.MTLSStrict},
		{name: "namespace beats mesh", pas: []*model.PeerAuthentication{
			pa("ambit-system", "default", model.MTLSStrict, nil), pa("shop", "default", model.MTLSPermissive, nil)}, dst: web, want: model.MTLSPermissive},
		{name: "namespace of another workload does not apply", pas: []*model.PeerAuthentication{
			pa("ambit-system", "default", model.MTLSStrict, nil), pa("shop", "default", model.MTLSPermissive, nil)}, dst: db, want: model.MTLSStrict},
		{name: "workload selector beats namespace", pas: []*model.PeerAuthentication{
			pa("shop", "default", model.MTLSPermissive, nil), pa("shop", "web", model.MTLSStrict, map[string]string{"app": "web"})}, dst: web, want: model.MTLSStrict},
		{name: "non-matching selector ignored", pas: []*model.PeerAuthentication{
			pa("shop", "default", model.MTLSPermissive, nil), pa("shop", "other", model.MTLSStrict, map[string]string{"app": "other"})}, dst: web, want: model.MTLSPermissive},
		{name: "unset inherits", pas: []*model.PeerAuthentication{
			pa("ambit-system", "default", model.MTLSStrict, nil), pa("shop", "web", model.MTLSUnset, map[string]string{"app": "web"})}, dst: web, want: model.MTLSStrict},
		{name: "disable at workload", pas: []*model.PeerAuthentication{
			pa("ambit-system", "default", model.MTLSStrict, nil), pa("shop", "web", model.MTLSDisable, map[string]string{"app": "web"})}, dst: web, want: model.MTLSDisable},
		{name: "nil destination is strict", dst: nil, want: model.MTLSStrict},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			snap := model.NewSnapshot(nil, nil, nil, tt.pas)
			if got := (Evaluator{}).PeerAuthnMode(snap, tt.dst); got != tt.want {
				t.Fatalf("mode %q, want %q", got, tt.want)
			}
		})
	}
}

func TestAllowPlaintext(t *testing.T) {
	strict := &model.PeerAuthentication{Name: "default", Namespace: "shop", Mode: model.MTLSStrict}
	allowCart := pol("shop", "a", model.ActionAllow, nil, from(model.Source{Principals: []string{"cluster.local/ns/shop/sa/cart"}})...)
	allowNet := pol("shop", "n", model.ActionAllow, nil, from(model.Source{IPBlocks: []netip.Prefix{pfx("10.0.1.0/24")}})...)
	c := Conn{SrcIdentity: idCart /* ignored: plaintext has no identity */, SrcIP: ip("10.0.1.5"), DstPort: 80}

	if d := (Evaluator{}).AllowPlaintext(model.NewSnapshot(nil, nil, nil, []*model.PeerAuthentication{strict}), web, c); d.Allow {
		t.Fatalf("strict: %+v", d)
	}
	if d := (Evaluator{}).AllowPlaintext(model.NewSnapshot(nil, nil, nil, nil), web, c); !d.Allow {
		t.Fatalf("permissive without policy: %+v", d)
	}
	if d := (Evaluator{}).AllowPlaintext(model.NewSnapshot(nil, nil, []*model.Policy{allowCart}, nil), web, c); d.Allow {
		t.Fatalf("principal policy must not match plaintext: %+v", d)
	}
	if d := (Evaluator{}).AllowPlaintext(model.NewSnapshot(nil, nil, []*model.Policy{allowCart, allowNet}, nil), web, c); !d.Allow || d.Policy != "shop/n" {
		t.Fatalf("ip block policy: %+v", d)
	}
}
