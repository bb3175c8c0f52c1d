package registry

import (
	"testing"

	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
)

// TestSecurityObjectsConvertFromUnstructured: the cluster watcher turns
// dynamic-informer objects into the security types with the unstructured
// converter; an object it cannot convert is dropped, so every field of the
// subset must convert (portLevelMtls once failed: its map had integer keys,
// and a STRICT PeerAuthentication using it silently vanished).
func TestSecurityObjectsConvertFromUnstructured(t *testing.T) {
	for _, tc := range []struct {
		yaml string
		into any
	}{
		{`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "8080": {mode: PERMISSIVE}
    "5432": {mode: STRICT}
`, &security.PeerAuthentication{}},
		{`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/api"], notNamespaces: [evil], ipBlocks: [10.0.0.0/8], notIpBlocks: [10.9.0.0/16]}
    to:
    - operation: {ports: ["5432"], notPorts: ["22"]}
`, &security.AuthorizationPolicy{}},
	} {
		var obj map[string]any
		if err := yaml.Unmarshal([]byte(tc.yaml), &obj); err != nil {
			t.Fatal(err)
		}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj, tc.into); err != nil {
			t.Fatalf("convert %T: %v", tc.into, err)
		}
		if pa, ok := tc.into.(*security.PeerAuthentication); ok && pa.Spec.PortLevelMTLS["5432"].Mode != "STRICT" {
			t.Fatalf("portLevelMtls lost: %+v", pa.Spec)
		}
		if ap, ok := tc.into.(*security.AuthorizationPolicy); ok && (len(ap.Spec.Rules) != 1 || len(ap.Spec.Rules[0].From) != 1) {
			t.Fatalf("rules lost: %+v", ap.Spec)
		}
	}
}
