package auth

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"
)

// maxJWTLen bounds the tokens JWTFilter decodes (kubelet's projected
// tokens are about 1 KiB).
const maxJWTLen = 16 << 10

// JWTFilter is a cheap local check of a Kubernetes service-account token,
// run before a TokenReview (Cache.Precheck): the token must be a JWT
// (three base64url parts, a JSON payload) issued by one of Issuers, for one
// of Audiences, and not expired. It does not verify the signature: the
// TokenReview stays the authority, the filter only keeps tokens that cannot
// be valid (garbage, another cluster's, another audience's, expired ones)
// from costing one. The zero value checks the audience DefaultAudience and
// any issuer.
type JWTFilter struct {
	// Issuers the token's iss claim must be one of (any if empty).
	Issuers []string
	// Audiences the token's aud claim must include one of
	// ([DefaultAudience] if empty).
	Audiences []string
	// Now is the clock (time.Now if nil).
	Now func() time.Time
}

// Check returns nil if token may be valid; otherwise an error wrapping
// ErrUnauthenticated.
func (f *JWTFilter) Check(token string) error {
	if len(token) > maxJWTLen {
		return fmt.Errorf("%w: token longer than %d bytes", ErrUnauthenticated, maxJWTLen)
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return fmt.Errorf("%w: token is not a JWT", ErrUnauthenticated)
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return fmt.Errorf("%w: token is not a JWT: payload: %v", ErrUnauthenticated, err)
	}
	var claims struct {
		Iss string          `json:"iss"`
		Aud json.RawMessage `json:"aud"`
		Exp *json.Number    `json:"exp"`
	}
	if err := json.Unmarshal(raw, &claims); err != nil {
		return fmt.Errorf("%w: token is not a JWT: payload: %v", ErrUnauthenticated, err)
	}
	if len(f.Issuers) > 0 && !slices.Contains(f.Issuers, claims.Iss) {
		return fmt.Errorf("%w: token issuer %q, want one of %v", ErrUnauthenticated, claims.Iss, f.Issuers)
	}
	var auds []string
	if json.Unmarshal(claims.Aud, &auds) != nil {
		var one string
		if json.Unmarshal(claims.Aud, &one) != nil {
			return fmt.Errorf("%w: token has no audience", ErrUnauthenticated)
		}
		auds = []string{one}
	}
	want := f.Audiences
	if len(want) == 0 {
		want = []string{DefaultAudience}
	}
	if !slices.ContainsFunc(auds, func(a string) bool { return slices.Contains(want, a) }) {
		return fmt.Errorf("%w: token audiences %v, want one of %v", ErrUnauthenticated, auds, want)
	}
	if claims.Exp == nil {
		return fmt.Errorf("%w: token has no expiry", ErrUnauthenticated)
	}
	sec, err := claims.Exp.Int64()
	if err != nil {
		return fmt.Errorf("%w: token expiry %q", ErrUnauthenticated, claims.Exp.String())
	}
	now := time.Now
	if f.Now != nil {
		now = f.Now
	}
	if exp := time.Unix(sec, 0); !now().Before(exp) {
		return fmt.Errorf("%w: token expired at %s", ErrUnauthenticated, exp.UTC().Format(time.RFC3339))
	}
	return nil
}
