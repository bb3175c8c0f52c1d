package xds

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/ambit-mesh/ambit/api/workload"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
)

// adsMethodPrefix prefixes the full method names of the ADS service.
var adsMethodPrefix = "/" + discovery.AggregatedDiscoveryService_ServiceDesc.ServiceName + "/"

// RequireAuthentication makes the server serve only callers that a
// authenticates by the bearer token of their stream ("authorization: Bearer
// <token>", as the certificate service takes it) and that are node proxies
// (ztunnels, local hosts) or waypoints, and returns the stream interceptor
// that does it. Install the interceptor on the gRPC server the service is
// registered on (grpc.ChainStreamInterceptor), before it serves; it passes
// the streams of other services through untouched. From this call on, a
// stream that did not come through the interceptor is refused.
//
// Callers without a usable token are refused with codes.Unauthenticated,
// other kinds of callers (a workload's token) with codes.PermissionDenied.
// Each request is then authorized by the caller's kind (authorize): a node
// proxy reads the workload types as its own node (a request whose xDS Node
// id names another node is PermissionDenied; proxy-status shows the
// authenticated node), a waypoint the Envoy types of its own waypoint.
//
// A stream lives no longer than its credential: it ends Unauthenticated
// when the caller is revoked (Caller.Revoked) or its token expires
// (Caller.Expires), and the client reconnects with a fresh one.
func (s *Server) RequireAuthentication(a auth.Authenticator) grpc.StreamServerInterceptor {
	s.authRequired = true
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if !strings.HasPrefix(info.FullMethod, adsMethodPrefix) {
			return handler(srv, ss)
		}
		ctx := ss.Context()
		caller, err := auth.AuthenticateIncoming(ctx, a)
		if err != nil {
			if errors.Is(err, auth.ErrUnauthenticated) {
				s.refuse("xds client refused", peerAddr(ctx), "peer", peerAddr(ctx), "code", codes.Unauthenticated.String(), "reason", err)
				return status.Error(codes.Unauthenticated, err.Error())
			}
			s.log.Error("xds client not authenticated: cannot check its token", "peer", peerAddr(ctx), "err", err)
			return status.Error(codes.Unavailable, "cannot verify the token now")
		}
		if caller.Kind != auth.NodeProxy && caller.Kind != auth.Waypoint {
			msg := fmt.Sprintf("%s is a %s, neither a node proxy nor a waypoint: it may not read xDS configuration", caller.Name, caller.Kind)
			s.refuse("xds client refused", caller.Name, "peer", peerAddr(ctx), "caller", caller.Name, "callerKind", caller.Kind.String(), "node", caller.Node, "code", codes.PermissionDenied.String(), "reason", msg)
			return status.Error(codes.PermissionDenied, msg)
		}
		cs := callerStream{ServerStream: ss, ctx: context.WithValue(ctx, callerKey{}, caller)}
		if caller.Revoked != nil || !caller.Expires.IsZero() {
			// The stream ends when the caller's credential is revoked or
			// expires: the client reconnects and authenticates again.
			end := &streamEnd{ch: make(chan struct{})}
			cs.end = end
			var cancel context.CancelFunc
			cs.ctx, cancel = context.WithCancel(cs.ctx)
			defer cancel()
			if !caller.Expires.IsZero() {
				t := time.AfterFunc(time.Until(caller.Expires), func() {
					s.log.Info("xds stream ended: its token expired", "peer", peerAddr(ctx), "caller", caller.Name, "expired", caller.Expires)
					end.stop(errExpired)
					cancel()
				})
				defer t.Stop()
			}
			if caller.Revoked != nil {
				go func() {
					select {
					case <-caller.Revoked:
						s.log.Warn("xds stream ended: its credential was revoked", "peer", peerAddr(ctx), "caller", caller.Name)
						end.stop(errRevoked)
						cancel()
					case <-cs.ctx.Done():
					}
				}()
			}
		}
		err = handler(srv, cs)
		if cs.end != nil {
			select {
			case <-cs.end.ch:
				return cs.end.err // the handler ends a stream whose receive failed without an error
			default:
			}
		}
		return err
	}
}

// refuse logs a refused stream from source through s.Refusals, else on
// the server's logger.
func (s *Server) refuse(msg, source string, attrs ...any) {
	if s.Refusals != nil {
		s.Refusals.Refuse(msg, source, attrs...)
		return
	}
	s.log.Warn(msg, attrs...)
}

// authorize says whether a stream of caller (nil on a server that does not
// authenticate) may subscribe to typeURL: node proxies to the workload
// types, waypoints to the Envoy types; nothing else. The error is a
// PermissionDenied status.
func authorize(caller *auth.Caller, typeURL string) error {
	kind, name := auth.NodeProxy, "an unauthenticated client"
	if caller != nil {
		kind, name = caller.Kind, caller.Name
	}
	switch {
	case kind == auth.NodeProxy && slices.Contains(workload.TypeURLs, typeURL):
		return nil
	case kind == auth.Waypoint && isEnvoyType(typeURL):
		return nil
	case kind == auth.NodeProxy && isEnvoyType(typeURL):
		return status.Errorf(codes.PermissionDenied, "%s is a node proxy: it may subscribe to the ambit.workload.v1 types, not to %s (Envoy types are served to waypoints)", name, typeURL)
	case kind == auth.NodeProxy:
		return status.Errorf(codes.PermissionDenied, "%s is a node proxy: it may subscribe to the ambit.workload.v1 types, not to %s", name, typeURL)
	case kind == auth.Waypoint && slices.Contains(workload.TypeURLs, typeURL):
		return status.Errorf(codes.PermissionDenied, "%s is a waypoint: it may subscribe to its own Envoy resources (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment), not to %s (served to node proxies)", name, typeURL)
	case kind == auth.Waypoint:
		return status.Errorf(codes.PermissionDenied, "%s is a waypoint: it may subscribe to its own Envoy resources (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment), not to %s", name, typeURL)
	}
	return status.Errorf(codes.PermissionDenied, "%s is a %s: it may not subscribe to %s", name, kind, typeURL)
}

// callerKey is the context key of the authenticated *auth.Caller of a stream.
type callerKey struct{}

func callerFrom(ctx context.Context) *auth.Caller {
	c, _ := ctx.Value(callerKey{}).(*auth.Caller)
	return c
}

// callerStream carries the authenticated caller in its context to the
// stream callbacks, and ends the stream when the caller's credential is
// revoked or expires: its context is cancelled and RecvMsg fails, which
// ends the xDS handler.
type callerStream struct {
	grpc.ServerStream
	ctx context.Context
	end *streamEnd // nil: never
}

// streamEnd is closed once, with the reason, when a stream must end.
type streamEnd struct {
	once sync.Once
	ch   chan struct{}
	err  error // set before ch is closed
}

func (e *streamEnd) stop(err error) {
	e.once.Do(func() { e.err = err; close(e.ch) })
}

func (s callerStream) Context() context.Context { return s.ctx }

// errRevoked and errExpired end the stream of a revoked caller and of one
// whose token expired.
var (
	errRevoked = status.Error(codes.Unauthenticated, "credential revoked")
	errExpired = status.Error(codes.Unauthenticated, "token expired: reconnect with a fresh one")
)

func (s callerStream) RecvMsg(m any) error {
	if s.end == nil {
		return s.ServerStream.RecvMsg(m)
	}
	select {
	case <-s.end.ch:
		return s.end.err
	default:
	}
	// The receive goes on in its own goroutine until the stream ends
	// (when the handler returns), so an end need not wait for the
	// client's next request. go-control-plane gives each RecvMsg a new m.
	done := make(chan error, 1)
	go func() { done <- s.ServerStream.RecvMsg(m) }()
	select {
	case err := <-done:
		return err
	case <-s.end.ch:
		return s.end.err
	}
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}
