package xdsclient_test

import (
	"context"
	"errors"
	"sync/atomic"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	resource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/credential"
	"github.com/ambit-mesh/ambit/xdsclient"
)

// config is a waypoint's compiled configuration.
type config struct {
	clusters map[string]*clusterv3.Cluster
	// ...
}

var errUnresolved = errors.New("a reference does not resolve yet")

// build compiles the four types into one config, or says why it cannot.
func build(cs map[string]*clusterv3.Cluster, eps map[string]*endpointv3.ClusterLoadAssignment,
	ls map[string]*listenerv3.Listener, rs map[string]*routev3.RouteConfiguration) (*config, error) {
	for name, c := range cs {
		if c.GetType() == clusterv3.Cluster_EDS && eps[name] == nil {
			return nil, errUnresolved // its endpoints come in a later response
		}
	}
	return &config{clusters: cs}, nil
}

// A waypoint applies CDS, EDS, LDS and RDS as one consistent snapshot.
func Example_waypoint() {
	var live atomic.Pointer[config]
	roots := &caclient.BundleFile{Path: "/etc/ambit/roots.pem"}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	token := &credential.Bearer{File: "/var/run/secrets/tokens/istio-token"} // shared with the caclient.Client
	c := &xdsclient.Client{
		Addr:       "istiod-lite.ambit-system.svc:15012",
		TLS:        caclient.TLSConfig(roots, td, spiffeid.ID{}),
		Node:       "waypoint~demo~waypoint",
		Credential: token,
		Types: []xdsclient.Type{
			{URL: resource.ClusterType, Decode: xdsclient.Proto[clusterv3.Cluster]()},
			{URL: resource.EndpointType, Decode: xdsclient.Proto[endpointv3.ClusterLoadAssignment]()},
			{URL: resource.ListenerType, Decode: xdsclient.Proto[listenerv3.Listener]()},
			{URL: resource.RouteType, Decode: xdsclient.Proto[routev3.RouteConfiguration]()},
		},
		OnUpdate: func(s *xdsclient.Snapshot) error {
			if !s.Complete() {
				return nil // not every type has answered yet
			}
			cfg, err := build(
				xdsclient.Values[*clusterv3.Cluster](s, resource.ClusterType),
				xdsclient.Values[*endpointv3.ClusterLoadAssignment](s, resource.EndpointType),
				xdsclient.Values[*listenerv3.Listener](s, resource.ListenerType),
				xdsclient.Values[*routev3.RouteConfiguration](s, resource.RouteType))
			if errors.Is(err, errUnresolved) {
				return nil // valid but incomplete: keep serving the live config
			}
			if err != nil {
				return err // NACKed with this error; the live config stays
			}
			live.Store(cfg) // one swap: no request sees half an update
			return nil
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // an example: do not actually connect
	_ = c.Start(ctx)
}
