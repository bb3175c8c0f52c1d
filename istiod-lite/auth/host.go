package auth

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/identity"
)

// MinHostSecretLen is the shortest secret HostAuthenticator accepts.
const MinHostSecretLen = 16

// HostCredentials are local mode's credentials, by secret's owner.
type HostCredentials struct {
	// Hosts maps a host name to its secret: NodeProxy callers whose node is
	// the host name.
	Hosts map[string]string
	// Waypoints maps a waypoint to its secret: Waypoint callers whose
	// identity is spiffe://<TrustDomain>/ns/<namespace>/sa/<name>.
	Waypoints map[WaypointRef]string
	// TrustDomain of waypoints' identities (identity.DefaultTrustDomain if
	// zero).
	TrustDomain spiffeid.TrustDomain
}

// HostAuthenticator authenticates local-mode hosts and waypoints (no
// cluster) by a bearer secret each. Create it with NewHostAuthenticator,
// HostCredentials.Authenticator or LoadHostCredentials.
type HostAuthenticator struct {
	callers map[[sha256.Size]byte]*Caller       // sha256(secret) -> caller (read-only); lookups by hash do not leak secret prefixes through timing
	revoke  map[[sha256.Size]byte]chan struct{} // sha256(secret) -> its callers' Revoked; closed by HostFile when the secret goes
}

// NewHostAuthenticator takes host name -> secret. Secrets must be at least
// MinHostSecretLen bytes and distinct.
func NewHostAuthenticator(secrets map[string]string) (*HostAuthenticator, error) {
	return HostCredentials{Hosts: secrets}.Authenticator()
}

// Authenticator checks c and returns its authenticator. Secrets must be at
// least MinHostSecretLen bytes and distinct.
func (c HostCredentials) Authenticator() (*HostAuthenticator, error) {
	td := c.TrustDomain
	if td.IsZero() {
		td = identity.DefaultTrustDomain
	}
	n := len(c.Hosts) + len(c.Waypoints)
	a := &HostAuthenticator{callers: make(map[[sha256.Size]byte]*Caller, n), revoke: make(map[[sha256.Size]byte]chan struct{}, n)}
	add := func(secret string, caller *Caller) error {
		if len(secret) < MinHostSecretLen {
			return fmt.Errorf("host credentials: secret of %s is shorter than %d bytes", caller.Name, MinHostSecretLen)
		}
		h := sha256.Sum256([]byte(secret))
		if other, dup := a.callers[h]; dup {
			return fmt.Errorf("host credentials: %s and %s share a secret", caller.Name, other.Name)
		}
		a.callers[h] = caller
		a.revoke[h] = make(chan struct{})
		return nil
	}
	for host, secret := range c.Hosts {
		if host == "" {
			return nil, errors.New("host credentials: empty host name")
		}
		if err := add(secret, &Caller{Kind: NodeProxy, Name: "host " + host, Node: host}); err != nil {
			return nil, err
		}
	}
	for wp, secret := range c.Waypoints {
		id, err := identity.Workload(td, wp.Namespace, wp.Name)
		if err != nil {
			return nil, fmt.Errorf("host credentials: waypoint %q: %w", wp, err)
		}
		if err := add(secret, &Caller{Kind: Waypoint, Name: "waypoint " + wp.String(), Identity: id, Waypoint: wp}); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// LoadHostCredentials reads a host credentials file (the format is in the
// package doc) and returns its authenticator; td is the trust domain of
// waypoints' identities (identity.DefaultTrustDomain if zero).
func LoadHostCredentials(path string, td spiffeid.TrustDomain) (*HostAuthenticator, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("host credentials: %w", err)
	}
	return parseHostCredentials(path, data, td)
}

// parseHostCredentials parses data, the content of the file at path.
func parseHostCredentials(path string, data []byte, td spiffeid.TrustDomain) (*HostAuthenticator, error) {
	c := HostCredentials{Hosts: map[string]string{}, Waypoints: map[WaypointRef]string{}, TrustDomain: td}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "waypoint" && strings.Contains(f[1], "/"):
			// "waypoint ns/name" with its secret missing would otherwise be
			// a node proxy called "waypoint" whose secret is a guessable name.
			return nil, fmt.Errorf("host credentials: %s:%d: want \"waypoint <namespace>/<name> <secret>\" (the secret is missing?)", path, n)
		case len(f) == 2 && strings.Contains(f[0], "/"):
			return nil, fmt.Errorf("host credentials: %s:%d: host %q: a host name has no \"/\"", path, n, f[0])
		case len(f) == 2:
			if _, dup := c.Hosts[f[0]]; dup {
				return nil, fmt.Errorf("host credentials: %s:%d: host %s listed twice", path, n, f[0])
			}
			c.Hosts[f[0]] = f[1]
		case len(f) == 3 && f[0] == "waypoint":
			ns, name, ok := strings.Cut(f[1], "/")
			if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
				return nil, fmt.Errorf("host credentials: %s:%d: want \"waypoint <namespace>/<name> <secret>\"", path, n)
			}
			wp := WaypointRef{Namespace: ns, Name: name}
			if _, dup := c.Waypoints[wp]; dup {
				return nil, fmt.Errorf("host credentials: %s:%d: waypoint %s listed twice", path, n, wp)
			}
			c.Waypoints[wp] = f[2]
		default:
			return nil, fmt.Errorf("host credentials: %s:%d: want \"<host> <secret>\" or \"waypoint <namespace>/<name> <secret>\"", path, n)
		}
	}
	return c.Authenticator()
}

// Authenticate implements Authenticator.
func (a *HostAuthenticator) Authenticate(_ context.Context, token string) (*Caller, error) {
	c, ok := a.callers[sha256.Sum256([]byte(token))]
	if !ok || token == "" {
		return nil, fmt.Errorf("%w: unknown host credential", ErrUnauthenticated)
	}
	cc := *c
	cc.Revoked = a.revoke[sha256.Sum256([]byte(token))]
	return &cc, nil
}
