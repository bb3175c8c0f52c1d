// Package xdsclient is ambit's delta-ADS client (Envoy's Delta xDS over one
// gRPC stream to istiod-lite), generic over type URLs: the ztunnel uses it
// for the ambit.workload.v1 types, the waypoint for Envoy's
// CDS/EDS/LDS/RDS.
//
// The caller registers one Type per type URL: the names it subscribes to
// (none: wildcard), a Decode that turns one resource into a value and
// validates it, and, optionally, an Apply that applies one response of that
// type. The client then
//
//   - subscribes every type on one stream, sending initial_resource_versions
//     after a reconnection so that the server sends only what changed;
//   - decodes a whole response before anything of it is applied: a resource
//     that does not decode or validate, or an Apply or OnUpdate error, NACKs
//     the response (error_detail carries the error, the nonce the response's)
//     and the last good config stays; otherwise it ACKs with the nonce;
//   - reconnects with jittered exponential backoff (MinBackoff..MaxBackoff),
//     keeping the last good config while the server is away;
//   - reports Synced (and closes SyncedCh) once every subscribed type has had
//     its first accepted response; it stays synced across reconnections;
//   - authenticates with a bearer token (credential.Bearer, shared with the
//     certificate client) over TLS.
//
// # Two ways to consume updates
//
// Per type, as deltas (the ztunnel): Type.Apply gets each response's decoded
// resources and removed names. The client keeps only the versions it holds,
// so a large mesh is not held twice. WorkloadTypes returns the four
// ambit.workload.v1 types applied to a *model.Store; Client.Store is a
// shorthand for them.
//
// As one consistent snapshot across types (the waypoint): set
// Client.OnUpdate. The client then also keeps every accepted resource's
// decoded value, and after each response that decoded (and passed Apply, if
// any) it calls OnUpdate with an immutable Snapshot: the whole current set of
// every type, with that response applied. OnUpdate returning an error NACKs
// the response and the Snapshot is discarded (the previous one remains the
// client's state). A consumer whose types refer to each other (a listener's
// route configuration, a cluster's endpoints) checks the references in
// OnUpdate and swaps its live config only when they resolve; when they do not
// yet (a new cluster whose endpoints come in the next response), it returns
// nil and keeps serving the previous config: the resources are valid, merely
// not complete, and the next response brings a Snapshot where they are.
// Snapshot.Complete tells whether every type has been received at least once.
//
// The waypoint, for example:
//
//	tok := &credential.Bearer{File: tokenFile}
//	c := &xdsclient.Client{
//		Addr: "istiod-lite.ambit-system.svc:15012", TLS: caclient.TLSConfig(roots, td, spiffeid.ID{}),
//		Node: "waypoint~" + ns + "~" + name, Credential: tok, Logger: log,
//		Types: []xdsclient.Type{
//			{URL: resource.ClusterType, Decode: xdsclient.Proto[clusterv3.Cluster]()},
//			{URL: resource.EndpointType, Decode: xdsclient.Proto[endpointv3.ClusterLoadAssignment]()},
//			{URL: resource.ListenerType, Decode: xdsclient.Proto[listenerv3.Listener]()},
//			{URL: resource.RouteType, Decode: xdsclient.Proto[routev3.RouteConfiguration]()},
//		},
//		OnUpdate: func(s *xdsclient.Snapshot) error {
//			if !s.Complete() {
//				return nil // wait for the first response of every type
//			}
//			cfg, err := build( // pure: the whole config or an error
//				xdsclient.Values[*clusterv3.Cluster](s, resource.ClusterType),
//				xdsclient.Values[*endpointv3.ClusterLoadAssignment](s, resource.EndpointType),
//				xdsclient.Values[*listenerv3.Listener](s, resource.ListenerType),
//				xdsclient.Values[*routev3.RouteConfiguration](s, resource.RouteType))
//			if errors.Is(err, errUnresolved) {
//				return nil // keep the live config; the next response completes it
//			}
//			if err != nil {
//				return err // NACK with this error; the live config stays
//			}
//			live.Store(cfg) // one atomic swap: no request sees half an update
//			return nil
//		},
//	}
//	go c.Start(ctx)
//
// Proto decodes into a fresh message and calls its ValidateAll (or Validate)
// method when it has one, as go-control-plane's generated types do; a type
// with stricter rules wraps it: Decode: func(name string, a *anypb.Any) (any,
// error) { v, err := xdsclient.Proto[T]()(name, a); ...; return v, err }.
//
// Decode, Apply and OnUpdate run on the client's one receiving goroutine, in
// the order responses arrive; they must not block for long.
package xdsclient
