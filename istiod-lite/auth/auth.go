package auth

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/metadata"
)

// ErrUnauthenticated is wrapped by Authenticators for credentials they
// refuse (as opposed to failures to check them); services answer
// codes.Unauthenticated.
var ErrUnauthenticated = errors.New("unauthenticated")

// CallerKind says what a caller may obtain.
type CallerKind int

const (
	// NodeProxy callers (ztunnels, local hosts) may obtain the identities of
	// workloads on their node and read the mesh's workload configuration.
	NodeProxy CallerKind = iota + 1
	// Workload callers (any pod that is neither a node proxy nor a
	// waypoint) may obtain only their own identity.
	Workload
	// Waypoint callers may obtain only their own identity and read only
	// their own waypoint's Envoy configuration (Caller.Waypoint).
	Waypoint
	// Operator callers (the CLI, later) may read proxy-status. No
	// Authenticator issues this kind yet.
	Operator
)

func (k CallerKind) String() string {
	switch k {
	case NodeProxy:
		return "node-proxy"
	case Workload:
		return "workload"
	case Waypoint:
		return "waypoint"
	case Operator:
		return "operator"
	}
	return fmt.Sprintf("CallerKind(%d)", int(k))
}

// WaypointRef names a waypoint: its Gateway's namespace and name.
type WaypointRef struct {
	Namespace string
	Name      string
}

// String returns "<namespace>/<name>".
func (w WaypointRef) String() string { return w.Namespace + "/" + w.Name }

// Caller is an authenticated client of istiod-lite.
type Caller struct {
	Kind CallerKind
	// Name identifies the caller in logs: "pod <namespace>/<name>",
	// "host <name>" or "waypoint <namespace>/<name>".
	Name string
	// Node is the node the caller runs on (empty for a local-mode waypoint).
	Node string
	// Identity is the caller's own SPIFFE ID (Workload and Waypoint callers).
	Identity spiffeid.ID
	// Waypoint is the waypoint the caller is (Waypoint callers).
	Waypoint WaypointRef
	// Revoked, if not nil, is closed when the credential the caller
	// authenticated with is withdrawn (local mode: its secret removed from
	// or replaced in the credentials file); streams of the caller end then.
	Revoked <-chan struct{}
	// Expires, if not zero, is when the credential stops being valid (a
	// Kubernetes token's exp claim, set by Cache); streams of the caller
	// end then, and the caller reconnects with a fresh token.
	Expires time.Time
}

// Authenticator turns a bearer token into a Caller. Errors that wrap
// ErrUnauthenticated refuse the token; others mean it could not be checked.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (*Caller, error)
}

// AuthenticateIncoming authenticates the caller of an incoming gRPC call (or
// stream) with a, by the bearer token in its metadata
// ("authorization: Bearer <token>"). Every service on 15012 takes its callers
// from here. Errors wrap ErrUnauthenticated when the call carries no usable
// token or a refuses it; other errors mean the token could not be checked.
// A caller already in ctx (NewContext: authenticated before the call's
// body was read) is returned as it is.
func AuthenticateIncoming(ctx context.Context, a Authenticator) (*Caller, error) {
	if c, ok := FromContext(ctx); ok {
		return c, nil
	}
	token, err := BearerToken(ctx)
	if err != nil {
		return nil, err
	}
	return a.Authenticate(ctx, token)
}

// BearerToken returns the bearer token of an incoming call: exactly one
// authorization header, "Bearer <token>" (scheme case-insensitive). Errors
// wrap ErrUnauthenticated.
func BearerToken(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) != 1 {
		return "", fmt.Errorf("%w: want one authorization header with a bearer token, got %d", ErrUnauthenticated, len(vals))
	}
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "bearer") || strings.TrimSpace(tok) == "" {
		return "", fmt.Errorf("%w: authorization is not a bearer token", ErrUnauthenticated)
	}
	return strings.TrimSpace(tok), nil
}
