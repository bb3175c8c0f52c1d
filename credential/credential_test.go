package credential

import (
	"os"
	"path/filepath"
	"testing"
)

// The token file is read at every call: kubelet rotates projected tokens.
func TestFileReadAtEachCall(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	b := &Bearer{File: path, Token: "ignored"}
	if !b.RequireTransportSecurity() {
		t.Fatal("the token may go out in clear")
	}
	if _, err := b.GetRequestMetadata(t.Context()); err == nil {
		t.Fatal("no error for a missing token file")
	}
	for _, tok := range []string{"first-token", "rotated-token"} {
		if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		md, err := b.GetRequestMetadata(t.Context())
		if err != nil || md["authorization"] != "Bearer "+tok {
			t.Fatalf("metadata %v, %v; want Bearer %s", md, err, tok)
		}
	}
	if err := os.WriteFile(path, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := b.GetRequestMetadata(t.Context()); err == nil {
		t.Fatal("an empty token file was sent")
	}
}

func TestStaticAndZero(t *testing.T) {
	md, err := (&Bearer{Token: " secret "}).GetRequestMetadata(t.Context())
	if err != nil || md["authorization"] != "Bearer secret" {
		t.Fatalf("metadata %v, %v", md, err)
	}
	var zero *Bearer
	if !zero.IsZero() || !(&Bearer{}).IsZero() || (&Bearer{Token: "x"}).IsZero() {
		t.Fatal("IsZero wrong")
	}
	if _, err := (&Bearer{}).GetRequestMetadata(t.Context()); err == nil {
		t.Fatal("a zero Bearer sent a token")
	}
}
