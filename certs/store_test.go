package certs

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/identity"
)

func TestLoadOrCreateCAFileStore(t *testing.T) {
	store := FileStore{Dir: filepath.Join(t.TempDir(), "ca")}
	ca1, err := LoadOrCreateCA(t.Context(), store, identity.DefaultTrustDomain, Options{Now: fixedClock()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ca2, err := LoadOrCreateCA(t.Context(), store, identity.DefaultTrustDomain, Options{Now: fixedClock()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !ca1.SigningCertificate().Equal(ca2.SigningCertificate()) {
		t.Fatal("second start generated a new root instead of loading the stored one")
	}
	// A certificate from the first instance verifies against the second's bundle.
	svid, err := ca1.IssueSVID(mustID(t, "shop", "cart"), 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, ca2.Bundle(), x509svid.WithTime(testNow)); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(store.Dir, KeyFileName))
	if err != nil || st.Mode().Perm()&0o077 != 0 {
		t.Fatalf("key file: %v, mode %v", err, st.Mode())
	}
}

// Several replicas starting at once end up with one root.
func TestLoadOrCreateCARace(t *testing.T) {
	store := FileStore{Dir: filepath.Join(t.TempDir(), "ca")}
	const n = 8
	cas := make([]*CA, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			cas[i], errs[i] = LoadOrCreateCA(t.Context(), store, identity.DefaultTrustDomain, Options{Now: fixedClock()}, nil)
		})
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		if !cas[i].SigningCertificate().Equal(cas[0].SigningCertificate()) {
			t.Fatalf("replica %d uses a different root", i)
		}
	}
}

// An operator-provided intermediate from files; the roots file holds two
// roots (rotation), and certificates from either verify.
func TestLoadCAFilesIntermediateAndTwoRoots(t *testing.T) {
	oldRoot := newTestCA(t)
	newRoot := newTestCA(t)
	inter := newIntermediate(t, newRoot)
	m, err := inter.Material()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	certFile := write("ca.crt", m.Cert)
	keyFile := write("ca.key", m.Key)
	rootsFile := write("roots.pem", EncodeCertificates([]*x509.Certificate{oldRoot.cert, newRoot.cert}))
	ca, err := LoadCAFiles(identity.DefaultTrustDomain, certFile, keyFile, rootsFile, Options{Now: fixedClock()})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(ca.Bundle().X509Authorities()); n != 2 {
		t.Fatalf("bundle has %d roots, want 2", n)
	}
	id := mustID(t, "shop", "cart")
	fromNew, err := ca.IssueSVID(id, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(fromNew.Certificates) != 2 {
		t.Fatalf("issued chain has %d certificates, want leaf + intermediate", len(fromNew.Certificates))
	}
	fromOld, err := oldRoot.IssueSVID(id, 0)
	if err != nil {
		t.Fatal(err)
	}
	for name, s := range map[string]*x509svid.SVID{"new": fromNew, "old": fromOld} {
		if _, _, err := x509svid.Verify(s.Certificates, ca.Bundle(), x509svid.WithTime(testNow)); err != nil {
			t.Errorf("%s-root certificate: %v", name, err)
		}
	}
	// Without a roots file an intermediate has no anchor.
	if _, err := LoadCAFiles(identity.DefaultTrustDomain, certFile, keyFile, "", Options{Now: fixedClock()}); err == nil {
		t.Fatal("loaded an intermediate without roots")
	}
	// A key that does not match is refused.
	other, _ := oldRoot.Material()
	badKey := write("other.key", other.Key)
	if _, err := LoadCAFiles(identity.DefaultTrustDomain, certFile, badKey, rootsFile, Options{Now: fixedClock()}); err == nil {
		t.Fatal("loaded a CA with a mismatched key")
	}
}
