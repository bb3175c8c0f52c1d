package authz

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/model"
)

// benchSnapshot is a mesh of ns namespaces with perNS ALLOW policies each
// (one selecting app=web, the others other apps), a mesh-wide DENY and
// namespace-wide and mesh-wide PeerAuthentications.
func benchSnapshot(ns, perNS int) *model.Snapshot {
	var pols []*model.Policy
	var pas []*model.PeerAuthentication
	for i := range ns {
		name := fmt.Sprintf("ns-%03d", i)
		for j := range perNS {
			app := fmt.Sprintf("app-%d", j)
			if j == 0 {
				app = "web"
			}
			pols = append(pols, pol(name, fmt.Sprintf("allow-%d", j), model.ActionAllow, map[string]string{"app": app},
				from(model.Source{Principals: []string{fmt.Sprintf("cluster.local/ns/%s/sa/client-%d", name, j)}})...))
		}
		pas = append(pas, &model.PeerAuthentication{Name: "default", Namespace: name, Mode: model.MTLSPermissive})
	}
	pols = append(pols, pol(DefaultRootNamespace, "deny-blocked", model.ActionDeny, nil, from(model.Source{IPBlocks: []netip.Prefix{pfx("192.0.2.0/24")}})...))
	pas = append(pas, &model.PeerAuthentication{Name: "default", Namespace: DefaultRootNamespace, Mode: model.MTLSStrict})
	return model.NewSnapshot(nil, nil, pols, pas)
}

// BenchmarkEvaluate is the per-connection cost of L4 policy: an HBONE
// connection's Evaluate and a plaintext one's AllowPlaintext, in a mesh of
// 100 namespaces with 10 policies each.
//
//	go test -run '^$' -bench . -benchmem ./authz/
func BenchmarkEvaluate(b *testing.B) {
	snap := benchSnapshot(100, 10)
	dst := &model.Workload{UID: "c/Pod/ns-042/web", Name: "web", Namespace: "ns-042", ServiceAccount: "web",
		Labels: map[string]string{"app": "web"}}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/ns-042/sa/client-0")
	b.Run("allowed", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if d := Evaluate(snap, dst, Conn{SrcIdentity: id, SrcIP: ip("10.0.1.5"), DstPort: 8080}); !d.Allow {
				b.Fatal(d.Reason)
			}
		}
	})
	b.Run("plaintext", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if d := (Evaluator{}).AllowPlaintext(snap, dst, Conn{SrcIP: ip("10.0.1.5"), DstPort: 8080}); d.Allow {
				b.Fatal("plaintext allowed without an identity")
			}
		}
	})
}
