package translate

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/istiod-lite/security"
)

// Decode reads a stream of YAML (or JSON) documents and returns the objects
// translation reads, typed. Documents of other kinds (Deployments, CRDs...)
// are returned in skipped as "apiVersion/kind name"; a document that does not
// parse is an error. Lists (kind: List) are expanded.
func Decode(r io.Reader) (objs []any, skipped []string, err error) {
	rd := utilyaml.NewYAMLReader(bufio.NewReader(r))
	for i := 0; ; i++ {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			return objs, skipped, nil
		}
		if err != nil {
			return nil, nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		o, s, err := decodeDoc(doc)
		if err != nil {
			return nil, nil, fmt.Errorf("document %d: %w", i, err)
		}
		objs = append(objs, o...)
		skipped = append(skipped, s...)
	}
}

func decodeDoc(doc []byte) ([]any, []string, error) {
	var tm struct {
		metav1.TypeMeta `json:",inline"`
		Metadata        struct {
			Name string `json:"name"`
		} `json:"metadata"`
		Items []map[string]any `json:"items"`
	}
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return nil, nil, err
	}
	if tm.Kind == "" && tm.APIVersion == "" {
		return nil, nil, nil // a comment-only document
	}
	if tm.Kind == "List" {
		var objs []any
		var skipped []string
		for _, it := range tm.Items {
			b, err := yaml.Marshal(it)
			if err != nil {
				return nil, nil, err
			}
			o, s, err := decodeDoc(b)
			if err != nil {
				return nil, nil, err
			}
			objs, skipped = append(objs, o...), append(skipped, s...)
		}
		return objs, skipped, nil
	}
	var obj any
	switch tm.APIVersion + "/" + tm.Kind {
	case "v1/Namespace":
		obj = &corev1.Namespace{}
	case "v1/Pod":
		obj = &corev1.Pod{}
	case "v1/Node":
		obj = &corev1.Node{}
	case "v1/Service":
		obj = &corev1.Service{}
	case "discovery.k8s.io/v1/EndpointSlice":
		obj = &discoveryv1.EndpointSlice{}
	case "gateway.networking.k8s.io/v1/Gateway", "gateway.networking.k8s.io/v1beta1/Gateway":
		obj = &gwv1.Gateway{}
	case "gateway.networking.k8s.io/v1/HTTPRoute", "gateway.networking.k8s.io/v1beta1/HTTPRoute":
		obj = &gwv1.HTTPRoute{}
	case "gateway.networking.k8s.io/v1/GRPCRoute":
		obj = &gwv1.GRPCRoute{}
	case "networking.istio.io/v1/DestinationRule", "networking.istio.io/v1beta1/DestinationRule", "networking.istio.io/v1alpha3/DestinationRule":
		obj = &networkingv1.DestinationRule{}
	case "security.istio.io/v1/AuthorizationPolicy", "security.istio.io/v1beta1/AuthorizationPolicy":
		obj = &security.AuthorizationPolicy{}
	case "security.istio.io/v1/PeerAuthentication", "security.istio.io/v1beta1/PeerAuthentication":
		obj = &security.PeerAuthentication{}
	default:
		return nil, []string{tm.APIVersion + "/" + tm.Kind + " " + tm.Metadata.Name}, nil
	}
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		return nil, nil, fmt.Errorf("%s %s: %w", tm.Kind, tm.Metadata.Name, err)
	}
	if m, ok := obj.(interface {
		GetNamespace() string
		SetNamespace(string)
	}); ok && m.GetNamespace() == "" {
		switch obj.(type) {
		case *corev1.Namespace, *corev1.Node: // cluster-scoped
		default:
			m.SetNamespace("default")
		}
	}
	return []any{obj}, nil, nil
}
