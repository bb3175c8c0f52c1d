package xds

import (
	"context"
	"errors"
	"fmt"
	"strings"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/ambit-mesh/ambit/istiod-lite/auth"
)

// adsMethodPrefix prefixes the full method names of the ADS service.
var adsMethodPrefix = "/" + discovery.AggregatedDiscoveryService_ServiceDesc.ServiceName + "/"

// RequireAuthentication makes the server serve only node proxies (ztunnels,
// local hosts) that a authenticates by the bearer token of their stream
// ("authorization: Bearer <token>", as the certificate service takes it),
// and returns the stream interceptor that does it. Install the interceptor
// on the gRPC server the service is registered on
// (grpc.ChainStreamInterceptor), before it serves; it passes the streams of
// other services through untouched. From this call on, a stream that did not
// come through the interceptor is refused.
//
// Callers without a usable token are refused with codes.Unauthenticated,
// callers that are not node proxies (a workload's token) with
// codes.PermissionDenied, and so is a stream whose xDS Node id names another
// node than the caller's: proxy-status shows the authenticated node.
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
				s.log.Warn("xds client refused", "peer", peerAddr(ctx), "code", codes.Unauthenticated.String(), "reason", err)
				return status.Error(codes.Unauthenticated, err.Error())
			}
			s.log.Error("xds client not authenticated: cannot check its token", "peer", peerAddr(ctx), "err", err)
			return status.Error(codes.Unavailable, "cannot verify the token now")
		}
		if caller.Kind != auth.NodeProxy {
			msg := fmt.Sprintf("%s is a %s, not a node proxy: it may not read the mesh's configuration", caller.Name, caller.Kind)
			s.log.Warn("xds client refused", "peer", peerAddr(ctx), "caller", caller.Name, "callerKind", caller.Kind.String(), "node", caller.Node, "code", codes.PermissionDenied.String(), "reason", msg)
			return status.Error(codes.PermissionDenied, msg)
		}
		return handler(srv, callerStream{ServerStream: ss, ctx: context.WithValue(ctx, callerKey{}, caller)})
	}
}

// callerKey is the context key of the authenticated *auth.Caller of a stream.
type callerKey struct{}

func callerFrom(ctx context.Context) *auth.Caller {
	c, _ := ctx.Value(callerKey{}).(*auth.Caller)
	return c
}

// callerStream carries the authenticated caller in its context to the
// stream callbacks.
type callerStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s callerStream) Context() context.Context { return s.ctx }

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}
