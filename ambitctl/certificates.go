package ambitctl

import (
	"fmt"
	"io"
	"strconv"
	"strings"
)

// ztCert is one identity of a ztunnel's /debug/certificates (ztunnel/admin.go):
// its SVID's status, chain (leaf first) and its trust domain's roots, each
// certificate also in PEM (in -o json and -o yaml).
type ztCert struct {
	Identity    string       `json:"identity"`
	Serial      string       `json:"serial,omitempty"`
	NotBefore   string       `json:"notBefore,omitempty"`
	NotAfter    string       `json:"notAfter,omitempty"`
	ExpiresIn   string       `json:"expiresIn,omitempty"`
	Expired     bool         `json:"expired"`
	Chain       int          `json:"chainLength,omitempty"`
	RenewAt     string       `json:"renewAt,omitempty"`
	Failures    int          `json:"failures,omitempty"`
	Error       string       `json:"error,omitempty"`
	CertChain   []ztCertInfo `json:"certChain,omitempty"`
	ChainPEM    string       `json:"chainPem,omitempty"`
	TrustDomain string       `json:"trustDomain,omitempty"`
	Roots       []ztCertInfo `json:"roots,omitempty"`
	RootsPEM    string       `json:"rootsPem,omitempty"`
	BundleError string       `json:"bundleError,omitempty"`
}

// ztCertInfo is one X.509 certificate of the dump.
type ztCertInfo struct {
	Serial    string   `json:"serial"`
	Subject   string   `json:"subject,omitempty"`
	Issuer    string   `json:"issuer,omitempty"`
	URIs      []string `json:"uris,omitempty"`
	IsCA      bool     `json:"isCA"`
	NotBefore string   `json:"notBefore"`
	NotAfter  string   `json:"notAfter"`
	PEM       string   `json:"pem"`
}

// printZtCerts prints one row per identity (its certificate's state and
// validity, the length of its chain, its trust domain's roots), then one
// row per root of each trust bundle. The PEM of chains and roots is in
// -o json / -o yaml (chainPem, rootsPem), for openssl or go-spiffe.
func printZtCerts(out io.Writer, cs []ztCert) error {
	rows := [][]string{}
	type root struct{ td, serial, subject, notAfter string }
	var roots []root
	seen := map[string]bool{}
	for _, c := range cs {
		state := "VALID"
		switch {
		case c.Error != "":
			state = "ERROR: " + c.Error
		case c.Serial == "":
			state = "PENDING"
		case c.Expired:
			state = "EXPIRED"
		}
		if c.Failures > 0 && c.Error == "" {
			state += fmt.Sprintf(" (%d failed renewals)", c.Failures)
		}
		chain := ""
		if c.Chain > 0 {
			chain = strconv.Itoa(c.Chain)
		}
		bundle := c.TrustDomain
		if c.BundleError != "" {
			bundle += " (no bundle: " + c.BundleError + ")"
		} else if len(c.Roots) > 0 {
			bundle += fmt.Sprintf(" (%d roots)", len(c.Roots))
		}
		rows = append(rows, []string{c.Identity, state, c.Serial, c.NotBefore, c.NotAfter, c.ExpiresIn, c.RenewAt, chain, bundle})
		for _, r := range c.Roots {
			if k := c.TrustDomain + "/" + r.Serial; !seen[k] {
				seen[k] = true
				roots = append(roots, root{c.TrustDomain, r.Serial, r.Subject, r.NotAfter})
			}
		}
	}
	if err := printTable(out, []string{"IDENTITY", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER", "EXPIRES IN", "RENEW AT", "CHAIN", "TRUST BUNDLE"}, rows); err != nil {
		return err
	}
	if len(roots) == 0 {
		return nil
	}
	rows = rows[:0]
	for _, r := range roots {
		rows = append(rows, []string{r.td, r.serial, strings.TrimSpace(r.subject), r.notAfter})
	}
	fmt.Fprintln(out)
	return printTable(out, []string{"TRUST DOMAIN", "ROOT SERIAL", "ROOT SUBJECT", "NOT AFTER"}, rows)
}
