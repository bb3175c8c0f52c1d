package translate

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambit-mesh/ambit/model"
)

const nodesYAML = `apiVersion: v1
kind: Node
metadata: {name: node-q, labels: {ambit.dev/hbone-quic: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: slow, labels: {istio.io/dataplane-mode: ambient, ambit.dev/hbone-quic: disabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: on-q, namespace: demo}
spec: {nodeName: node-q, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: on-q-off, namespace: demo, labels: {ambit.dev/hbone-quic: disabled}}
spec: {nodeName: node-q, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: on-q, namespace: slow}
spec: {nodeName: node-q, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: on-p, namespace: demo}
spec: {nodeName: node-p, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.2.0.1}
`

// TestNodeQUIC: a Node (decoded from local mode's YAML, cluster-scoped)
// labelled ambit.dev/hbone-quic=enabled makes its pods advertise QUIC
// unless their own or their namespace's label says otherwise; a node
// appearing, changing its label or going re-translates its pods only, and
// incrementally as a full build would.
func TestNodeQUIC(t *testing.T) {
	objs, skipped, err := Decode(strings.NewReader(nodesYAML))
	if err != nil || len(skipped) != 0 {
		t.Fatalf("decode: %v, skipped %v", err, skipped)
	}
	o := NewObjects()
	for _, obj := range objs {
		o.Set(obj)
	}
	if n := o.Nodes["node-q"]; n == nil || n.Namespace != "" {
		t.Fatalf("node-q: %+v", n)
	}
	snap := Build(o, Options{}).Snapshot
	quic := func(key string) bool {
		ns, name, _ := strings.Cut(key, "/")
		w := snap.Workloads[WorkloadUID("", ns, name)]
		if w == nil {
			t.Fatalf("no workload %s", key)
		}
		return w.QUIC
	}
	want := func(step string, m map[string]bool) {
		t.Helper()
		for k, v := range m {
			if quic(k) != v {
				t.Errorf("%s: %s advertises QUIC %v, want %v", step, k, !v, v)
			}
		}
		if full := Build(o, Options{}).Snapshot; !reflect.DeepEqual(snap.Workloads, full.Workloads) {
			t.Errorf("%s: incremental != full", step)
		}
	}
	want("built", map[string]bool{"demo/on-q": true, "demo/on-q-off": false, "slow/on-q": false, "demo/on-p": false})

	steps := []struct {
		name  string
		node  *corev1.Node // nil: delete node-q
		pods  int          // pods the change names
		state map[string]bool
	}{
		{"node-p appears labelled", &corev1.Node{}, 1, map[string]bool{"demo/on-p": true, "demo/on-q": true}},
		{"node-p relabelled, same value", &corev1.Node{}, 0, map[string]bool{"demo/on-p": true}},
		{"node-q deleted", nil, 3, map[string]bool{"demo/on-q": false, "demo/on-p": true}},
	}
	for _, s := range steps {
		var ch Changes
		if s.node != nil {
			s.node.Name = "node-p"
			s.node.Labels = map[string]string{model.LabelHBONEQUIC: "enabled", "other": s.name}
			ch = o.Set(s.node)
		} else {
			ch = o.Delete(&corev1.Node{}, "node-q")
		}
		if len(ch.Pods) != s.pods {
			t.Errorf("%s: %d pods to re-translate (%v), want %d", s.name, len(ch.Pods), ch.Pods, s.pods)
		}
		d, _ := Update(o, snap, ch, Options{})
		snap = snap.Apply(d)
		want(s.name, s.state)
	}
}
