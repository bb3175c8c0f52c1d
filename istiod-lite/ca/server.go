package ca

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	capb "github.com/ambit-mesh/ambit/api/ca/v1"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/istiod-lite/auth"
	"github.com/ambit-mesh/ambit/istiod-lite/monitoring"
)

// DefaultNamespace is istiod-lite's namespace: the CA's Secret and bundle
// ConfigMap live there, and its identities are never a node's to hold.
const DefaultNamespace = identity.ControlPlaneNamespace

// maxCSRPEM bounds the PEM text of a CSR before it is decoded.
const maxCSRPEM = 2*certs.MaxCSRSize + 1024

// maxValidity bounds the requested validity in seconds before it becomes a
// time.Duration (the CA caps it further at its leaf TTL).
const maxValidity = int64(365 * 24 * time.Hour / time.Second)

// Server is the certificate service. Register it on istiod-lite's gRPC
// server (the one on 15012 that xDS shares).
type Server struct {
	// CA signs the certificates (required).
	CA *certs.CA
	// Authenticator checks callers' bearer tokens (required).
	Authenticator auth.Authenticator
	// Workloads tells which service accounts have workloads on a node
	// (required for NodeProxy callers; without it they are denied).
	Workloads Workloads
	// Logger (discard if nil). Every issuance is logged, and refusals with
	// the caller, its node and the identity asked for, through Refusals.
	Logger *slog.Logger
	// Refusals rate-limits the refusals' log lines (nil: one line each, on
	// Logger).
	Refusals *auth.RefusalLog
	// Metrics counts requests, issuances and failures (nil: not counted).
	Metrics *monitoring.Metrics
}

// MaxRequestSize bounds a call's request to the certificate service (a CSR
// of at most certs.MaxCSRSize in PEM, an identity): istiod-lite gives the
// service's calls this limit on the wire (istiod-lite/gate), a thousandth of
// xDS's. It is also the server's per-stream receive window (the gate's
// limits may not be smaller).
const MaxRequestSize = 64 << 10

// MethodPrefix prefixes the full method names of the certificate service.
var MethodPrefix = "/" + capb.CertificateService_ServiceDesc.ServiceName + "/"

// Register adds the service to g.
func (s *Server) Register(g *grpc.Server) {
	capb.RegisterCertificateServiceServer(g, &service{s: s})
}

// service adapts Server to the generated interface without exporting the
// RPC methods on Server.
type service struct {
	capb.UnimplementedCertificateServiceServer
	s *Server
}

func (v *service) CreateCertificate(ctx context.Context, req *capb.CreateCertificateRequest) (*capb.CreateCertificateResponse, error) {
	return v.s.createCertificate(ctx, req)
}

func (v *service) GetTrustBundle(ctx context.Context, _ *capb.GetTrustBundleRequest) (*capb.GetTrustBundleResponse, error) {
	if _, err := v.s.authenticate(ctx, "trust bundle"); err != nil {
		return nil, err
	}
	return &capb.GetTrustBundleResponse{
		TrustDomain: v.s.CA.TrustDomain().Name(),
		TrustBundle: v.s.bundlePEM(),
	}, nil
}

func (s *Server) log() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.New(slog.DiscardHandler)
}

func (s *Server) bundlePEM() []string {
	var out []string
	for _, c := range s.CA.Bundle().X509Authorities() {
		out = append(out, string(certs.EncodeCertificates([]*x509.Certificate{c})))
	}
	return out
}

// refuse logs a refusal from source through Refusals, else on Logger.
func (s *Server) refuse(msg, source string, attrs ...any) {
	if s.Refusals != nil {
		s.Refusals.Refuse(msg, source, attrs...)
		return
	}
	s.log().Warn(msg, attrs...)
}

// authenticate extracts the bearer token and asks the Authenticator.
func (s *Server) authenticate(ctx context.Context, what string) (*auth.Caller, error) {
	addr := ""
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		addr = p.Addr.String()
	}
	c, err := auth.AuthenticateIncoming(ctx, s.Authenticator)
	if err == nil {
		return c, nil
	}
	if errors.Is(err, auth.ErrUnauthenticated) {
		s.refuse("certificate service: unauthenticated", addr, "request", what, "peer", addr, "err", err)
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	s.log().Error("certificate service: cannot authenticate", "request", what, "peer", addr, "err", err)
	return nil, status.Error(codes.Unavailable, "cannot verify the token now")
}

func (s *Server) createCertificate(ctx context.Context, req *capb.CreateCertificateRequest) (*capb.CreateCertificateResponse, error) {
	s.Metrics.CSRReceived()
	caller, err := s.authenticate(ctx, req.GetIdentity())
	if err != nil {
		if status.Code(err) == codes.Unauthenticated {
			s.Metrics.AuthenticationFailure()
		}
		return nil, err
	}
	log := s.log().With("caller", caller.Name, "callerKind", caller.Kind.String(), "node", caller.Node, "identity", req.GetIdentity())
	refuse := func(code codes.Code, msg string) error {
		s.refuse("certificate refused", caller.Name, "caller", caller.Name, "callerKind", caller.Kind.String(), "node", caller.Node, "identity", req.GetIdentity(), "code", code.String(), "reason", msg)
		return status.Error(code, msg)
	}

	id, err := spiffeid.FromString(req.GetIdentity())
	if err != nil {
		return nil, refuse(codes.InvalidArgument, fmt.Sprintf("identity %q: %v", req.GetIdentity(), err))
	}
	if !id.MemberOf(s.CA.TrustDomain()) {
		return nil, refuse(codes.InvalidArgument, fmt.Sprintf("identity %s is not in trust domain %s", id, s.CA.TrustDomain()))
	}
	switch caller.Kind {
	case auth.Workload, auth.Waypoint:
		if caller.Identity.IsZero() || id != caller.Identity {
			return nil, refuse(codes.PermissionDenied, fmt.Sprintf("%s may obtain only its own identity %s, not %s", caller.Name, caller.Identity, id))
		}
	case auth.NodeProxy:
		ns, sa, err := identity.ParseWorkload(id)
		if err != nil {
			return nil, refuse(codes.InvalidArgument, err.Error())
		}
		if ns == DefaultNamespace {
			// The control plane's identities (istiod-lite's own among them)
			// are never a node's to hold, whatever runs on that node.
			return nil, refuse(codes.PermissionDenied, fmt.Sprintf("%s may not obtain %s: identities of namespace %s belong to the control plane", caller.Name, id, ns))
		}
		ok := false
		if s.Workloads != nil {
			if ok, err = s.Workloads.OnNode(ctx, caller.Node, ns, sa); err != nil {
				log.Error("node authorization failed", "err", err)
				return nil, status.Error(codes.Unavailable, "cannot check node authorization now")
			}
		}
		if !ok {
			return nil, refuse(codes.PermissionDenied, fmt.Sprintf("%s on node %s may not obtain %s: no workload of service account %s/%s on that node", caller.Name, caller.Node, id, ns, sa))
		}
	default:
		return nil, refuse(codes.PermissionDenied, fmt.Sprintf("%s is a %s: it may not obtain certificates", caller.Name, caller.Kind))
	}

	if len(req.GetCsr()) > maxCSRPEM {
		s.Metrics.CSRParseError()
		return nil, refuse(codes.InvalidArgument, fmt.Sprintf("csr of %d bytes is too large", len(req.GetCsr())))
	}
	block, rest := pem.Decode([]byte(req.GetCsr()))
	if block == nil || (block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST") || len(strings.TrimSpace(string(rest))) > 0 {
		s.Metrics.CSRParseError()
		return nil, refuse(codes.InvalidArgument, "csr: want exactly one PEM CERTIFICATE REQUEST block")
	}
	v := req.GetValidityDuration()
	if v < 0 || v > maxValidity {
		return nil, refuse(codes.InvalidArgument, fmt.Sprintf("validity_duration %d out of range (0..%d s)", v, maxValidity))
	}
	chain, err := s.CA.SignCSR(block.Bytes, id, time.Duration(v)*time.Second)
	if errors.Is(err, certs.ErrBadCSR) {
		s.Metrics.CSRParseError()
		return nil, refuse(codes.InvalidArgument, err.Error())
	}
	if err != nil {
		s.Metrics.CSRSignError()
		log.Error("signing failed", "err", err)
		return nil, status.Error(codes.Internal, "signing failed")
	}
	s.Metrics.CertIssued()
	leaf := chain[0]
	log.Info("certificate issued", "serial", leaf.SerialNumber.Text(16), "notAfter", leaf.NotAfter)
	resp := &capb.CreateCertificateResponse{TrustBundle: s.bundlePEM()}
	for _, c := range chain {
		resp.CertChain = append(resp.CertChain, string(certs.EncodeCertificates([]*x509.Certificate{c})))
	}
	return resp, nil
}
