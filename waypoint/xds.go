package waypoint

import (
	"cmp"
	"errors"
	"slices"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	resource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"

	"github.com/ambit-mesh/ambit/xdsclient"
)

// XDSTypes are the waypoint's wildcard subscriptions, for
// xdsclient.Client.Types (with OnUpdate set to Proxy.OnXDSUpdate).
func XDSTypes() []xdsclient.Type {
	return []xdsclient.Type{
		{URL: resource.ClusterType, Decode: xdsclient.Proto[clusterv3.Cluster]()},
		{URL: resource.EndpointType, Decode: xdsclient.Proto[endpointv3.ClusterLoadAssignment]()},
		{URL: resource.ListenerType, Decode: xdsclient.Proto[listenerv3.Listener]()},
		{URL: resource.RouteType, Decode: xdsclient.Proto[routev3.RouteConfiguration]()},
	}
}

// OnXDSUpdate applies the xDS client's whole state as one snapshot once
// every type has answered. A valid but incomplete state is ACKed and
// waited out (the previous snapshot serves); an invalid one is NACKed with
// Apply's error.
func (p *Proxy) OnXDSUpdate(s *xdsclient.Snapshot) error {
	if !s.Complete() {
		return nil
	}
	var rs []Resource
	for _, t := range []string{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
		var part []Resource
		for _, r := range s.Resources(t) {
			if m, ok := r.Value.(proto.Message); ok {
				part = append(part, Resource{Version: r.Version, Resource: m})
			}
		}
		slices.SortFunc(part, func(a, b Resource) int { return cmp.Compare(resourceName(a.Resource), resourceName(b.Resource)) })
		rs = append(rs, part...)
	}
	err := p.Apply(rs)
	if errors.Is(err, ErrIncomplete) {
		p.log.Info("waypoint: waiting for a consistent config", "err", err)
		return nil
	}
	return err
}

func resourceName(m proto.Message) string {
	switch r := m.(type) {
	case *listenerv3.Listener:
		return r.GetName()
	case *routev3.RouteConfiguration:
		return r.GetName()
	case *clusterv3.Cluster:
		return r.GetName()
	case *endpointv3.ClusterLoadAssignment:
		return r.GetClusterName()
	}
	return ""
}
