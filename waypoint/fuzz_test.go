package waypoint

import (
	"regexp"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/proto"
)

var traceParentRE = regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$`)

// FuzzTraceParent: whatever arrives, the waypoint sends a well-formed
// traceparent, continuing the caller's trace only when it was well formed.
func FuzzTraceParent(f *testing.F) {
	f.Add("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	f.Add("")
	f.Add("00-00000000000000000000000000000000-b7ad6b7169203331-01")
	f.Add("zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra")
	f.Fuzz(func(t *testing.T, in string) {
		out := childTraceParent(in)
		if !traceParentRE.MatchString(out) {
			t.Fatalf("childTraceParent(%q) = %q", in, out)
		}
		if traceParentRE.MatchString(in) && in[3:35] != "00000000000000000000000000000000" && out[3:35] != in[3:35] {
			t.Fatalf("trace id not continued: %q -> %q", in, out)
		}
	})
}

// FuzzCompile: arbitrary (valid protobuf) resources never panic the
// compiler: they compile or are refused with an error.
func FuzzCompile(f *testing.F) {
	for _, r := range simple(svc, []*routev3.Route{toCluster(prefixMatch("/"), "c", retries("5xx", 2, 0))},
		map[string][]ep{"c": nil}, outlier(5, 1, 1, 10), circuitBreakers(1, 1, 1, 1), protocolOptions(true, 2)) {
		b, _ := proto.Marshal(r.Resource)
		var kind byte
		switch r.Resource.(type) {
		case *routev3.RouteConfiguration:
			kind = 1
		case *clusterv3.Cluster:
			kind = 2
		}
		f.Add(kind, b)
	}
	f.Fuzz(func(t *testing.T, kind byte, b []byte) {
		var m proto.Message
		switch kind % 3 {
		case 0:
			m = &listenerv3.Listener{}
		case 1:
			m = &routev3.RouteConfiguration{}
		default:
			m = &clusterv3.Cluster{}
		}
		if proto.Unmarshal(b, m) != nil {
			return
		}
		compile([]Resource{{Version: "f", Resource: m}})
	})
}
