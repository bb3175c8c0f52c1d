package configfile

import (
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/model"
)

const yamlConfig = `
workloads:
- uid: c/Pod/shop/web-1
  name: web-1
  namespace: shop
  serviceAccount: web
  node: node1
  addresses: [10.0.0.5]
  enrolled: true
  ready: true
  labels: {app: web}
services:
- name: web
  namespace: shop
  hostname: web.shop.svc.cluster.local
  vips: [10.96.0.5]
  ports: [{port: 80, targetPort: 8080}]
  endpoints: [{workloadUid: c/Pod/shop/web-1}]
policies:
- name: allow-cart
  namespace: shop
  action: ALLOW
  selector: {app: web}
  rules:
  - from: [{principals: [cluster.local/ns/shop/sa/cart], ipBlocks: [10.0.0.0/8]}]
    to: [{ports: [8080]}]
peerAuthentications:
- {name: default, namespace: ambit-system, mode: STRICT}
`

func TestParseYAMLAndJSON(t *testing.T) {
	snap, err := Parse([]byte(yamlConfig))
	if err != nil {
		t.Fatal(err)
	}
	w := snap.WorkloadByIP(netip.MustParseAddr("10.0.0.5"))
	if w == nil || w.Name != "web-1" || !w.Enrolled || w.Labels["app"] != "web" {
		t.Fatalf("workload %+v", w)
	}
	svc := snap.ServiceByVIP(netip.MustParseAddr("10.96.0.5"))
	if svc == nil || svc.Ports[0].TargetPort != 8080 || svc.Endpoints[0].WorkloadUID != w.UID {
		t.Fatalf("service %+v", svc)
	}
	p := snap.Policies["shop/allow-cart"]
	if p == nil || p.Action != model.ActionAllow || p.Rules[0].From[0].IPBlocks[0] != netip.MustParsePrefix("10.0.0.0/8") || p.Rules[0].To[0].Ports[0] != 8080 {
		t.Fatalf("policy %+v", p)
	}
	if pa := snap.PeerAuthn["ambit-system/default"]; pa == nil || pa.Mode != model.MTLSStrict {
		t.Fatalf("peer authentication %+v", pa)
	}

	js := `{"workloads":[{"uid":"u","name":"n","namespace":"ns","addresses":["fd00::1"],"enrolled":true}]}`
	snap, err = Parse([]byte(js))
	if err != nil || snap.WorkloadByIP(netip.MustParseAddr("fd00::1")) == nil {
		t.Fatalf("json: %v", err)
	}
}

func TestParseRejects(t *testing.T) {
	for name, in := range map[string]string{
		"unknown field":     "workloads: [{uid: a, colour: blue}]",
		"missing uid":       "workloads: [{name: a}]",
		"bad address":       "workloads: [{uid: a, addresses: [not-an-ip]}]",
		"bad action":        "policies: [{name: p, namespace: n, action: AUDIT}]",
		"bad mode":          "peerAuthentications: [{name: p, namespace: n, mode: LOOSE}]",
		"service hostname":  "services: [{name: s, namespace: n}]",
		"not a config file": "just text",
		"empty":             " \n",
	} {
		if _, err := Parse([]byte(in)); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}

// TestWatcherKeepsLastGoodConfig: the file changes, breaks, disappears and
// comes back; the store follows good versions only. Each broken state is
// waited for until the watcher has rejected it (OnError), so the checks
// that the store kept its config come after the watcher looked.
func TestWatcherKeepsLastGoodConfig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mesh.yaml")
	write := func(content string) {
		t.Helper()
		if err := os.WriteFile(path+".tmp", []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(path+".tmp", path); err != nil {
			t.Fatal(err)
		}
	}
	write(yamlConfig)
	var store model.Store
	changed := store.Changed()
	errs := make(chan error, 64)
	w := &Watcher{Path: path, Store: &store, Interval: 10 * time.Millisecond,
		OnError: func(err error) {
			select {
			case errs <- err:
			default: // the test drains as it waits; older errors are stale
			}
		}}
	done := make(chan error, 1)
	go func() { done <- w.Run(t.Context()) }()
	wait := func(what string, cond func(*model.Snapshot) bool) {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for !cond(store.Load()) {
			select {
			case <-changed:
			case <-time.After(10 * time.Millisecond):
			case <-deadline:
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	rejected := func(what string, match func(error) bool) {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case err := <-errs:
				if match(err) {
					return
				}
			case <-deadline:
				t.Fatalf("timed out waiting for the watcher to reject %s", what)
			}
		}
	}
	wait("first load", func(s *model.Snapshot) bool { return len(s.Workloads) == 1 })
	good, version := store.LoadVersion()
	kept := func(what string) {
		t.Helper()
		s, v := store.LoadVersion()
		if v != version || s != good || s.Workloads["c/Pod/shop/web-1"] == nil {
			t.Fatalf("%s replaced the config (version %d, was %d; workloads %v)", what, v, version, s.Workloads)
		}
	}

	// A broken file: the store keeps the last good config.
	write("workloads: [{uid: broken, colour: red}]")
	rejected("the broken file", func(err error) bool { return strings.Contains(err.Error(), "colour") })
	kept("a broken file")
	// A missing file: the same.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	rejected("the missing file", func(err error) bool { return errors.Is(err, fs.ErrNotExist) })
	kept("a missing file")
	// A good new version is picked up.
	write(strings.Replace(yamlConfig, "web-1", "web-2", -1))
	wait("reload", func(s *model.Snapshot) bool { return s.Workloads["c/Pod/shop/web-2"] != nil })
	select {
	case err := <-done:
		t.Fatalf("watcher stopped: %v", err)
	default:
	}
}

func TestWatcherFirstLoadMustSucceed(t *testing.T) {
	var store model.Store
	w := &Watcher{Path: filepath.Join(t.TempDir(), "missing.yaml"), Store: &store}
	if err := w.Run(t.Context()); err == nil {
		t.Fatal("Run succeeded without a config file")
	}
}
