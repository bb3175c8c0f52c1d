package caclient

import (
	"bytes"
	"fmt"
	"os"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/identity"
)

// BundleFile is an x509bundle.Source backed by a PEM file (e.g. the mounted
// ambit-ca-root ConfigMap), re-read when its content changes, so a rotated
// root reaches new handshakes without a restart. The zero value with Path
// set is usable.
type BundleFile struct {
	// Path of the PEM roots (required).
	Path string
	// TrustDomain of the roots (identity.DefaultTrustDomain if zero).
	TrustDomain spiffeid.TrustDomain

	mu     sync.Mutex // guards raw and bundle
	raw    []byte
	bundle *x509bundle.Bundle
}

var _ x509bundle.Source = (*BundleFile)(nil)

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (b *BundleFile) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	own := b.TrustDomain
	if own.IsZero() {
		own = identity.DefaultTrustDomain
	}
	if td != own {
		return nil, fmt.Errorf("bundle file %s: no bundle for trust domain %s", b.Path, td)
	}
	raw, err := os.ReadFile(b.Path)
	if err != nil {
		return nil, fmt.Errorf("bundle file: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.bundle != nil && bytes.Equal(raw, b.raw) {
		return b.bundle, nil
	}
	roots, err := certs.ParseCertificates(raw)
	if err != nil {
		return nil, fmt.Errorf("bundle file %s: %w", b.Path, err)
	}
	b.raw, b.bundle = raw, x509bundle.FromX509Authorities(own, roots)
	return b.bundle, nil
}
