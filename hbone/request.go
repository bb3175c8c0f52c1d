package hbone

import (
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"net/url"
	"strings"
)

// ParseAuthority parses a CONNECT :authority: an IP literal (IPv6 in
// brackets, no zone) and a port in 1..65535. IPv4-mapped IPv6 addresses are
// unmapped.
func ParseAuthority(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("authority %q: %w", s, err)
	}
	if ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("authority %q: zone not allowed", s)
	}
	if ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("authority %q: port 0", s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// FormatForwarded returns the forwarded header value for a connection from
// src (omitted if invalid), addressed to the service host (omitted if empty):
// for="<ip:port>";host=<host>.
func FormatForwarded(src netip.AddrPort, host string) string {
	var b strings.Builder
	if src.IsValid() {
		b.WriteString(`for="`)
		b.WriteString(src.String())
		b.WriteByte('"')
	}
	if host != "" {
		if b.Len() > 0 {
			b.WriteByte(';')
		}
		b.WriteString("host=")
		if isToken(host) {
			b.WriteString(host)
		} else { // quoted-string
			b.WriteByte('"')
			for i := 0; i < len(host); i++ {
				if host[i] == '"' || host[i] == '\\' {
					b.WriteByte('\\')
				}
				b.WriteByte(host[i])
			}
			b.WriteByte('"')
		}
	}
	return b.String()
}

// ParseForwarded parses the first element of a forwarded header (RFC 7239):
// its "for" (an IP, or ip:port, IPv6 in brackets; "unknown" and obfuscated
// identifiers give a zero address) and "host" parameters. Other parameters
// are ignored.
func ParseForwarded(s string) (Forwarded, error) {
	var fw Forwarded
	rest := strings.TrimSpace(s)
	for rest != "" {
		var key, val string
		i := strings.IndexByte(rest, '=')
		if i <= 0 {
			return Forwarded{}, fmt.Errorf("forwarded %q: want key=value", s)
		}
		key = strings.ToLower(strings.TrimSpace(rest[:i]))
		if !isToken(key) {
			return Forwarded{}, fmt.Errorf("forwarded %q: bad parameter name", s)
		}
		rest = strings.TrimLeft(rest[i+1:], " \t")
		var err error
		val, rest, err = cutValue(rest)
		if err != nil {
			return Forwarded{}, fmt.Errorf("forwarded %q: %w", s, err)
		}
		switch key {
		case "for":
			fw.For, err = parseForwardedNode(val)
			if err != nil {
				return Forwarded{}, fmt.Errorf("forwarded %q: %w", s, err)
			}
		case "host":
			fw.Host = val
		}
		rest = strings.TrimLeft(rest, " \t")
		if rest == "" {
			break
		}
		if rest[0] == ',' { // the next proxy's element
			break
		}
		if rest[0] != ';' {
			return Forwarded{}, fmt.Errorf("forwarded %q: want ';' or ','", s)
		}
		rest = strings.TrimLeft(rest[1:], " \t")
	}
	return fw, nil
}

// cutValue splits a token or quoted-string off the front of s.
func cutValue(s string) (val, rest string, err error) {
	if s == "" || s[0] != '"' {
		i := strings.IndexAny(s, ";, \t")
		if i < 0 {
			i = len(s)
		}
		if i == 0 || !isToken(s[:i]) {
			return "", "", errors.New("bad token")
		}
		return s[:i], s[i:], nil
	}
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		c := s[i]
		if c == '\\' && i+1 < len(s) { // quoted-pair
			i++
			c = s[i]
		} else if c == '"' {
			return b.String(), s[i+1:], nil
		}
		if c < 0x20 && c != '\t' || c == 0x7f {
			return "", "", errors.New("control character in quoted string")
		}
		b.WriteByte(c)
	}
	return "", "", errors.New("unterminated quoted string")
}

func parseForwardedNode(v string) (netip.AddrPort, error) {
	if v == "unknown" || strings.HasPrefix(v, "_") {
		return netip.AddrPort{}, nil
	}
	if ap, err := netip.ParseAddrPort(v); err == nil && ap.Addr().Zone() == "" {
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	host := v
	if strings.HasPrefix(v, "[") && strings.HasSuffix(v, "]") {
		host = v[1 : len(v)-1]
	} else if strings.Contains(v, ":") { // IPv6 must be bracketed
		return netip.AddrPort{}, fmt.Errorf("bad node %q", v)
	}
	a, err := netip.ParseAddr(host)
	if err != nil || a.Zone() != "" || (a.Is6() && host == v) {
		return netip.AddrPort{}, fmt.Errorf("bad node %q", v)
	}
	return netip.AddrPortFrom(a.Unmap(), 0), nil
}

// isToken reports whether s is a non-empty RFC 7230 token.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			continue
		}
		if !strings.ContainsRune("!#$%&'*+-.^_`|~", rune(c)) {
			return false
		}
	}
	return true
}

// ParseBaggage extracts Istio's keys from a W3C baggage header. Unknown
// keys, properties, empty values and malformed members are skipped; values
// are percent-decoded.
func ParseBaggage(s string) Baggage {
	var b Baggage
	for len(s) > 0 {
		var member string
		member, s, _ = strings.Cut(s, ",")
		member, _, _ = strings.Cut(member, ";") // drop properties
		k, v, ok := strings.Cut(member, "=")
		if !ok {
			continue
		}
		k = strings.TrimSpace(k)
		v = strings.TrimSpace(v)
		if dv, err := url.PathUnescape(v); err == nil {
			v = dv
		}
		if v == "" {
			continue
		}
		switch k {
		case "k8s.cluster.name":
			b.ClusterName = v
		case "k8s.namespace.name":
			b.Namespace = v
		case "service.name":
			b.ServiceName = v
		case "service.version":
			b.Version = v
		default:
			if kind, ok := strings.CutPrefix(k, "k8s."); ok {
				if kind, ok = strings.CutSuffix(kind, ".name"); ok && kind != "" && !strings.Contains(kind, ".") {
					b.WorkloadKind, b.WorkloadName = kind, v
				}
			}
		}
	}
	return b
}

// String formats b as a baggage header value (empty fields omitted).
func (b Baggage) String() string {
	var sb strings.Builder
	add := func(k, v string) {
		if v == "" {
			return
		}
		if sb.Len() > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(k)
		sb.WriteByte('=')
		sb.WriteString(escapeBaggage(v))
	}
	add("k8s.cluster.name", b.ClusterName)
	add("k8s.namespace.name", b.Namespace)
	if b.WorkloadKind != "" {
		add("k8s."+b.WorkloadKind+".name", b.WorkloadName)
	}
	add("service.name", b.ServiceName)
	add("service.version", b.Version)
	return sb.String()
}

// escapeBaggage percent-encodes what is not a W3C baggage-octet, and '%'.
func escapeBaggage(v string) string {
	const hexd = "0123456789ABCDEF"
	var sb strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c > 0x20 && c < 0x7f && c != '"' && c != ',' && c != ';' && c != '\\' && c != '%' {
			sb.WriteByte(c)
			continue
		}
		sb.WriteByte('%')
		sb.WriteByte(hexd[c>>4])
		sb.WriteByte(hexd[c&15])
	}
	return sb.String()
}

// newTraceParent returns a fresh W3C traceparent with a random trace and
// span ID, sampled.
func newTraceParent() string {
	var raw [24]byte
	for i := 0; i < 24; i += 8 {
		v := rand.Uint64()
		for j := range 8 {
			raw[i+j] = byte(v >> (8 * j))
		}
	}
	var out [55]byte
	copy(out[:], "00-")
	hex.Encode(out[3:35], raw[:16])
	out[35] = '-'
	hex.Encode(out[36:52], raw[16:])
	copy(out[52:], "-01")
	return string(out[:])
}
