package translate

import (
	"strings"
	"testing"
)

const waypointQUICYAML = `apiVersion: v1
kind: Node
metadata: {name: node-q, labels: {ambit.dev/hbone-quic: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: fast, labels: {istio.io/dataplane-mode: ambient, ambit.dev/hbone-quic: enabled}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-quic, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-plain, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-off, namespace: fast}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-ns, namespace: fast}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-node, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-quic-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp-quic, ambit.dev/hbone-quic: enabled}}
spec: {nodeName: node-p, serviceAccountName: wp-quic, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.1.0.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-plain-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp-plain}}
spec: {nodeName: node-p, serviceAccountName: wp-plain, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.1.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-off-0, namespace: fast, labels: {gateway.networking.k8s.io/gateway-name: wp-off, ambit.dev/hbone-quic: disabled}}
spec: {nodeName: node-q, serviceAccountName: wp-off, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.1.0.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-ns-0, namespace: fast, labels: {gateway.networking.k8s.io/gateway-name: wp-ns}}
spec: {nodeName: node-p, serviceAccountName: wp-ns, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.1.0.4, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-node-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp-node}}
spec: {nodeName: node-q, serviceAccountName: wp-node, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.1.0.5, conditions: [{type: Ready, status: "True"}]}
`

// TestWaypointQUIC: a waypoint's pod advertises HBONE over QUIC by the same
// rule as any pod (its own label, else its namespace's, else its node's),
// and is still a waypoint (no waypoint of its own).
func TestWaypointQUIC(t *testing.T) {
	objs, skipped, err := Decode(strings.NewReader(waypointQUICYAML))
	if err != nil || len(skipped) != 0 {
		t.Fatalf("decode: %v, skipped %v", err, skipped)
	}
	o := NewObjects()
	for _, obj := range objs {
		o.Set(obj)
	}
	snap := Build(o, Options{}).Snapshot
	for key, want := range map[string]bool{
		"shop/wp-quic-0":  true,  // its own label
		"shop/wp-plain-0": false, // nothing says so
		"fast/wp-off-0":   false, // its own "disabled" wins over namespace and node
		"fast/wp-ns-0":    true,  // its namespace's label
		"shop/wp-node-0":  true,  // its node's label
	} {
		ns, name, _ := strings.Cut(key, "/")
		w := snap.Workloads[WorkloadUID("", ns, name)]
		if w == nil {
			t.Fatalf("no workload %s", key)
		}
		if w.QUIC != want {
			t.Errorf("%s advertises QUIC %v, want %v", key, w.QUIC, want)
		}
		if w.Waypoint != nil {
			t.Errorf("%s (a waypoint) has a waypoint: %+v", key, w.Waypoint)
		}
	}
}
