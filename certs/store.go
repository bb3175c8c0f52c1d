package certs

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Sentinels of RootStore, for LoadOrCreateCA's create race.
var (
	ErrNotFound = errors.New("no CA stored")
	ErrExists   = errors.New("a CA is already stored")
)

// File names (and Secret keys) of a persisted CA.
const (
	CertFileName  = "ca.crt"    // the signing certificate, then any intermediates
	KeyFileName   = "ca.key"    // the signing key, PKCS#8
	RootsFileName = "roots.pem" // the trust bundle: one or more roots
)

// Material is a CA in PEM form, as persisted.
type Material struct {
	Cert  []byte // the signing certificate, then any intermediates up to a root
	Key   []byte // the signing key (PKCS#8, or SEC 1 / PKCS#1)
	Roots []byte // the trust bundle; empty means the chain's last certificate, if self-signed
}

// CA parses the material into a CA for td.
func (m *Material) CA(td spiffeid.TrustDomain, opts Options) (*CA, error) {
	chain, err := ParseCertificates(m.Cert)
	if err != nil {
		return nil, fmt.Errorf("ca certificate: %w", err)
	}
	if len(chain) == 0 {
		return nil, errors.New("ca certificate: no certificate")
	}
	key, err := parseKey(m.Key)
	if err != nil {
		return nil, fmt.Errorf("ca key: %w", err)
	}
	var roots []*x509.Certificate
	if len(bytes.TrimSpace(m.Roots)) > 0 {
		if roots, err = ParseCertificates(m.Roots); err != nil {
			return nil, fmt.Errorf("ca roots: %w", err)
		}
	} else if last := chain[len(chain)-1]; isSelfSigned(last) {
		roots = []*x509.Certificate{last}
	} else {
		return nil, errors.New("ca roots: none given and the chain does not end in a root")
	}
	// The chain sent with leaves stops below the root.
	inter := chain[1:]
	if n := len(inter); n > 0 && isSelfSigned(inter[n-1]) {
		inter = inter[:n-1]
	}
	return NewCA(td, chain[0], key, inter, roots, opts)
}

// Material returns the CA in PEM form (with its private key).
func (ca *CA) Material() (*Material, error) {
	keyDER, err := x509.MarshalPKCS8PrivateKey(ca.signer)
	if err != nil {
		return nil, fmt.Errorf("marshal ca key: %w", err)
	}
	m := &Material{Key: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})}
	m.Cert = EncodeCertificates(append([]*x509.Certificate{ca.cert}, ca.chain...))
	m.Roots = EncodeCertificates(ca.roots)
	return m, nil
}

// LoadCAFiles loads an operator-provided root or intermediate: certFile holds
// the signing certificate followed by any intermediates, keyFile its key, and
// rootsFile (optional when certFile ends in a root) the trust bundle, which
// may hold several roots.
func LoadCAFiles(td spiffeid.TrustDomain, certFile, keyFile, rootsFile string, opts Options) (*CA, error) {
	var m Material
	var err error
	if m.Cert, err = os.ReadFile(certFile); err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	if m.Key, err = os.ReadFile(keyFile); err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	if rootsFile != "" {
		if m.Roots, err = os.ReadFile(rootsFile); err != nil {
			return nil, fmt.Errorf("load ca: %w", err)
		}
	}
	ca, err := m.CA(td, opts)
	if err != nil {
		return nil, fmt.Errorf("load ca from %s: %w", certFile, err)
	}
	return ca, nil
}

// RootStore persists a generated CA: a Kubernetes Secret in cluster mode
// (istiod-lite/ca.SecretStore), a directory in local mode (FileStore).
type RootStore interface {
	// Load returns the stored CA, or an error wrapping ErrNotFound.
	Load(ctx context.Context) (*Material, error)
	// Create stores m unless a CA is stored already (then an error wrapping
	// ErrExists).
	Create(ctx context.Context, m *Material) error
}

// LoadOrCreateCA loads the CA from store, or generates a self-signed root
// and stores it on first start. When another replica creates one first, it
// loads and uses that one (Create -> ErrExists -> Load).
func LoadOrCreateCA(ctx context.Context, store RootStore, td spiffeid.TrustDomain, opts Options, log *slog.Logger) (*CA, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m, err := store.Load(ctx)
	if err == nil {
		return m.CA(td, opts)
	}
	if !errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	ca, err := NewSelfSignedCA(td, opts)
	if err != nil {
		return nil, err
	}
	if m, err = ca.Material(); err != nil {
		return nil, err
	}
	err = store.Create(ctx, m)
	if errors.Is(err, ErrExists) {
		log.Info("ca created concurrently by another replica; using it")
		if m, err = store.Load(ctx); err != nil {
			return nil, fmt.Errorf("load ca after create race: %w", err)
		}
		return m.CA(td, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("store ca: %w", err)
	}
	log.Info("generated a new root CA", "trustDomain", td.String(), "notAfter", ca.cert.NotAfter)
	return ca, nil
}

// FileStore keeps a CA in a directory (ca.crt, ca.key, roots.pem), for local
// mode. Create is atomic: the files are written to a temporary directory that
// is then renamed to Dir.
type FileStore struct {
	Dir string // required
}

// Load implements RootStore.
func (s FileStore) Load(context.Context) (*Material, error) {
	var m Material
	var err error
	if m.Cert, err = os.ReadFile(filepath.Join(s.Dir, CertFileName)); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w in %s", ErrNotFound, s.Dir)
		}
		return nil, err
	}
	if m.Key, err = os.ReadFile(filepath.Join(s.Dir, KeyFileName)); err != nil {
		return nil, err
	}
	if m.Roots, err = os.ReadFile(filepath.Join(s.Dir, RootsFileName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	return &m, nil
}

// Create implements RootStore.
func (s FileStore) Create(_ context.Context, m *Material) error {
	dir := filepath.Clean(s.Dir)
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), "."+filepath.Base(dir)+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	for name, data := range map[string][]byte{CertFileName: m.Cert, KeyFileName: m.Key, RootsFileName: m.Roots} {
		if err := os.WriteFile(filepath.Join(tmp, name), data, 0o600); err != nil {
			return err
		}
	}
	if err := os.Chmod(tmp, 0o700); err != nil {
		return err
	}
	// rename(2) replaces an empty directory but fails on a non-empty one.
	if err := os.Rename(tmp, dir); err != nil {
		if _, statErr := os.Stat(filepath.Join(dir, CertFileName)); statErr == nil {
			return fmt.Errorf("%w in %s", ErrExists, dir)
		}
		return fmt.Errorf("create %s: %w", dir, err)
	}
	return nil
}

// ParseCertificates parses every CERTIFICATE block of a PEM bundle.
func ParseCertificates(pemData []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, pemData = pem.Decode(pemData)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return out, nil
}

// EncodeCertificates returns certs as PEM.
func EncodeCertificates(certs []*x509.Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return buf.Bytes()
}

func parseKey(pemData []byte) (crypto.Signer, error) {
	for {
		var b *pem.Block
		b, pemData = pem.Decode(pemData)
		if b == nil {
			return nil, errors.New("no PEM private key found")
		}
		var k any
		var err error
		switch b.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(b.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, err
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("key type %T cannot sign", k)
		}
		return s, nil
	}
}
