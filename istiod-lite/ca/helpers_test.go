package ca_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	capb "github.com/ambit-mesh/ambit/api/ca/v1"
	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/certs/caclient"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/istiod-lite/ca"
)

// logBuffer collects log output safely across goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// hasLine reports whether one log line contains every part.
func (b *logBuffer) hasLine(parts ...string) bool {
	for line := range strings.SplitSeq(b.String(), "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			return true
		}
	}
	return false
}

// serve runs srv on a TLS gRPC server on loopback, as istiod-lite does on
// 15012, and returns its address.
func serve(t *testing.T, srv *ca.Server) string {
	t.Helper()
	serving := &ca.ServingCert{CA: srv.CA, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(serving.TLSConfig())))
	srv.Register(g)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.Serve(l)
	}()
	t.Cleanup(func() {
		g.Stop()
		<-done
	})
	return l.Addr().String()
}

func newLogger(b *logBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// rawClient is a CertificateService client that sends token as is (none
// when empty), to exercise the server's checks directly.
func rawClient(t *testing.T, addr string, authority *certs.CA, token string) capb.CertificateServiceClient {
	t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(caclient.TLSConfig(authority.Bundle(), authority.TrustDomain(), spiffeid.ID{})))}
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(staticToken(token)))
	}
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return capb.NewCertificateServiceClient(conn)
}

type staticToken string

func (s staticToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(s)}, nil
}

func (staticToken) RequireTransportSecurity() bool { return true }

func csrPEM(t *testing.T, key any, uris ...string) string {
	t.Helper()
	if key == nil {
		key = ecKey(t)
	}
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func ecKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func wantCode(t *testing.T, what string, err error, code codes.Code) {
	t.Helper()
	if got := status.Code(errors.Unwrap(err)); err == nil || (got != code && status.Code(err) != code) {
		t.Errorf("%s: err = %v, want code %s", what, err, code)
	}
}

func writeFile(t *testing.T, dir, name, data string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func wid(t *testing.T, ns, sa string) spiffeid.ID {
	t.Helper()
	id, err := identity.Workload(identity.DefaultTrustDomain, ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}
