package registry

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/istiod-lite/translate"
	"github.com/ambit-mesh/ambit/model"
)

type problems struct {
	mu sync.Mutex
	ps []translate.Problem
}

func (p *problems) Report(x translate.Problem) {
	p.mu.Lock()
	p.ps = append(p.ps, x)
	p.mu.Unlock()
}

func (p *problems) has(reason, name string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, x := range p.ps {
		if x.Reason == reason && x.Name == name {
			return true
		}
	}
	return false
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

const nsAndPod = `apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo, labels: {app: a}}
spec: {nodeName: node-1}
status: {phase: Running, podIP: 10.0.0.1}
`

func TestFilesLoadReloadAndKeepLastGood(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p+".tmp", []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(p+".tmp", p); err != nil {
			t.Fatal(err)
		}
	}
	write("mesh.yaml", nsAndPod)
	write("policy.yaml", `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: demo}
spec: {rules: [{to: [{operation: {ports: ["http"]}}]}]}
`)
	store := &model.Store{}
	rep := &problems{}
	errs := make(chan error, 16)
	f := &Files{Dir: dir, Store: store, Interval: 20 * time.Millisecond, Reporter: rep,
		OnError: func(err error) {
			select {
			case errs <- err:
			default:
			}
		}}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error)
	go func() { done <- f.Start(ctx) }()
	defer func() { cancel(); <-done }()

	uid := translate.WorkloadUID("", "demo", "a")
	eventually(t, "first model", func() bool { w := store.Load().Workloads[uid]; return w != nil && w.Enrolled && w.Node == "node-1" })
	eventually(t, "the bad policy reported", func() bool { return rep.has(translate.ReasonInvalidPolicy, "bad") })
	if bad := store.Load().Policies["demo/bad"]; bad == nil || len(bad.Rules) != 0 {
		t.Fatalf("the invalid ALLOW policy must stay without its broken rule (it allows nothing): %+v", bad)
	}

	// A change to one file is picked up.
	write("mesh.yaml", nsAndPod+`---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: demo}
spec: {nodeName: node-2}
status: {phase: Running, podIP: 10.0.0.2}
`)
	uidB := translate.WorkloadUID("", "demo", "b")
	eventually(t, "reload", func() bool { return store.Load().Workloads[uidB] != nil })

	// A file that does not parse keeps its last good objects: wait until
	// the reload rejected it, then add a pod in a new file. Once that pod is
	// in the model, the model was built from a load that rejected mesh.yaml
	// (the builder publishes asynchronously), and it still holds a and b.
	write("mesh.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: [broken\n")
	select {
	case err := <-errs:
		if !strings.Contains(err.Error(), "mesh.yaml") {
			t.Fatalf("rejected: %v, want mesh.yaml", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("timed out waiting for the broken file to be rejected")
	}
	write("more.yaml", `apiVersion: v1
kind: Pod
metadata: {name: c, namespace: demo}
spec: {nodeName: node-3}
status: {phase: Running, podIP: 10.0.0.3}
`)
	uidC := translate.WorkloadUID("", "demo", "c")
	eventually(t, "the new file", func() bool { return store.Load().Workloads[uidC] != nil })
	if ws := store.Load().Workloads; ws[uid] == nil || ws[uidB] == nil {
		t.Fatalf("a broken file lost its last good objects: workloads %v", ws)
	}

	// Removing the file removes its objects.
	if err := os.Remove(filepath.Join(dir, "mesh.yaml")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "removal", func() bool {
		ws := store.Load().Workloads
		return len(ws) == 1 && ws[uidC] != nil
	})
}
