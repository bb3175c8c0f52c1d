package envoy

import (
	"os"
	"path/filepath"
	"testing"
)

// quicYAML labels node-2 to advertise HBONE over QUIC and adds pods on it
// that do (by the Node), that opt out (their own label) and that are not
// enrolled; _base.yaml's reviews-v1-0 on node-1 does not advertise it.
const quicYAML = `apiVersion: v1
kind: Node
metadata: {name: node-2, labels: {ambit.dev/hbone-quic: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-off, namespace: shop, labels: {app: reviews, version: v1, ambit.dev/hbone-quic: disabled}}
spec: {nodeName: node-2, serviceAccountName: reviews}
status: {phase: Running, podIP: 10.1.2.13, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-own, namespace: shop, labels: {app: reviews, version: v1, ambit.dev/hbone-quic: enabled}}
spec: {nodeName: node-1, serviceAccountName: reviews}
status: {phase: Running, podIP: 10.1.1.14, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-1, namespace: shop, labels: {app: ratings, istio.io/dataplane-mode: none}}
spec: {nodeName: node-2, serviceAccountName: ratings}
status: {phase: Running, podIP: 10.1.2.21, conditions: [{type: Ready, status: "True"}]}
`

// TestEndpointQUIC: an enrolled endpoint whose pod advertises HBONE over
// QUIC (by its own label, else its namespace's, else its Node's) carries
// hbone_quic=true and its node in filter_metadata["ambit"]; others carry
// neither, nor does an endpoint that is not enrolled (plain TCP), whatever
// its node says.
func TestEndpointQUIC(t *testing.T) {
	extra := filepath.Join(t.TempDir(), "quic.yaml")
	if err := os.WriteFile(extra, []byte(quicYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	tr := translateFiles(t, "testdata/_base.yaml", extra)
	r, err := ForWaypoint(tr.Snapshot, shop)
	if err != nil {
		t.Fatal(err)
	}
	check(t, r)
	type want struct {
		quic bool
		node string
	}
	wants := map[string]want{
		"10.1.1.11": {},                           // node-1, no label
		"10.1.2.12": {quic: true, node: "node-2"}, // node-2's label
		"10.1.2.13": {},                           // node-2, but the pod says disabled
		"10.1.1.14": {quic: true, node: "node-1"}, // its own label
		"10.1.1.20": {},                           // not enrolled
		"10.1.2.21": {},                           // not enrolled, on node-2
	}
	seen := map[string]bool{}
	for _, cla := range r.Endpoints {
		for _, lle := range cla.GetEndpoints() {
			for _, le := range lle.GetLbEndpoints() {
				addr := le.GetEndpoint().GetAddress().GetSocketAddress().GetAddress()
				w, ok := wants[addr]
				if !ok {
					continue
				}
				seen[addr] = true
				f := le.GetMetadata().GetFilterMetadata()["ambit"].GetFields()
				q, hasQ := f["hbone_quic"]
				if hasQ != w.quic || (hasQ && !q.GetBoolValue()) {
					t.Errorf("%s (%s): hbone_quic %v, want %v", addr, cla.GetClusterName(), q, w.quic)
				}
				if n := f["node"].GetStringValue(); n != w.node {
					t.Errorf("%s (%s): node %q, want %q", addr, cla.GetClusterName(), n, w.node)
				}
				if w.quic && f["hbone_port"].GetNumberValue() != 15008 {
					t.Errorf("%s: hbone_quic without hbone_port", addr)
				}
			}
		}
	}
	for addr := range wants {
		if !seen[addr] {
			t.Errorf("no endpoint %s", addr)
		}
	}
}
