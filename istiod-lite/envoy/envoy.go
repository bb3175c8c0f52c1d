// Package envoy builds the Envoy v3 resources (LDS, RDS, CDS, EDS) of one
// waypoint from the model: a pure function, golden-tested, whose output is the
// subset of Envoy that waypoint/ENVOY.md lists and the waypoint implements.
package envoy

import (
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

	"github.com/ambit-mesh/ambit/model"
)

// Resources are one waypoint's Envoy resources.
type Resources struct {
	Listeners []*listener.Listener
	Routes    []*route.RouteConfiguration
	Clusters  []*cluster.Cluster
	Endpoints []*endpoint.ClusterLoadAssignment
}

// Waypoint is the key of a waypoint: its Gateway's namespace and name.
type Waypoint struct {
	Namespace string
	Name      string
}

// ForWaypoint returns the resources of waypoint wp in snapshot s: the
// services (and, for waypoint-for workload/all, the workloads) bound to it,
// their routes, clusters and endpoints, and its L7 policies. It is pure: the
// same snapshot gives the same resources, in a stable order.
func ForWaypoint(s *model.Snapshot, wp Waypoint) (*Resources, error) {
	return &Resources{}, nil
}
