package ambitctl

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// --set identity=spire renders what `kubectl kustomize` renders with
// manifests/components/spire.
func TestSetIdentitySPIREIsTheComponent(t *testing.T) {
	objs, err := render(images{})
	if err != nil {
		t.Fatal(err)
	}
	if err := applySettings(objs, []string{"identity=spire"}); err != nil {
		t.Fatal(err)
	}
	repo, _ := filepath.Abs("..")
	dir := t.TempDir()
	rel, err := filepath.Rel(dir, filepath.Join(repo, "manifests"))
	if err != nil {
		t.Fatal(err)
	}
	k := "resources: [" + rel + "]\ncomponents: [" + rel + "/components/spire]\n"
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("kubectl", "kustomize", dir).Output()
	if err != nil {
		t.Fatalf("kubectl kustomize: %v", err)
	}
	want, err := decodeUnstructured(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	find := func(objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
		for _, o := range objs {
			if o.GetKind() == kind && o.GetName() == name {
				return o
			}
		}
		t.Fatalf("no %s %s", kind, name)
		return nil
	}
	for _, kn := range [][2]string{{"DaemonSet", "ztunnel"}, {"Deployment", "istiod-lite"}} {
		got, exp := find(objs, kn[0], kn[1]), find(want, kn[0], kn[1])
		gj, _ := json.Marshal(got.Object) // sorted keys; int64 and float64 alike
		ej, _ := json.Marshal(exp.Object)
		if !bytes.Equal(gj, ej) {
			t.Errorf("%s %s differs from kubectl kustomize's:\n got %s\nwant %s", kn[0], kn[1], gj, ej)
		}
		args, _, _ := unstructured.NestedSlice(got.Object, "spec", "template", "spec", "containers")
		if !strings.Contains(strings.Join(argsOf(args[0]), " "), "--identity=spire") {
			t.Errorf("%s %s has no --identity=spire: %v", kn[0], kn[1], argsOf(args[0]))
		}
	}
	// The default leaves the base alone; unknown settings are refused.
	base, _ := render(images{})
	if err := applySettings(base, []string{"identity=ca"}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(strings.Join(argsOf(mustContainer(t, find(base, "DaemonSet", "ztunnel"))), " "), "spire") {
		t.Error("identity=ca changed the ztunnel")
	}
	for _, bad := range []string{"identity=vault", "colour=blue", "identity"} {
		if err := applySettings(base, []string{bad}); err == nil {
			t.Errorf("--set %s accepted", bad)
		}
	}
}

func argsOf(c any) []string {
	m, _ := c.(map[string]any)
	raw, _ := m["args"].([]any)
	out := make([]string, len(raw))
	for i, a := range raw {
		out[i], _ = a.(string)
	}
	return out
}

func mustContainer(t *testing.T, o *unstructured.Unstructured) any {
	t.Helper()
	cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
	if len(cs) == 0 {
		t.Fatalf("%s has no containers", o.GetName())
	}
	return cs[0]
}
