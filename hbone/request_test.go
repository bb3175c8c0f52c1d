package hbone

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseAuthority(t *testing.T) {
	good := map[string]string{
		"10.0.0.1:80":          "10.0.0.1:80",
		"[fd00::1]:8080":       "[fd00::1]:8080",
		"[::ffff:10.0.0.1]:80": "10.0.0.1:80",
		"127.0.0.1:65535":      "127.0.0.1:65535",
	}
	for in, want := range good {
		got, err := ParseAuthority(in)
		if err != nil || got.String() != want {
			t.Errorf("ParseAuthority(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, in := range []string{"", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536", "fd00::1:80", "[fd00::1]",
		"reviews:9080", "[fe80::1%eth0]:80", "10.0.0.1:80/", " 10.0.0.1:80", "10.0.0.1:-1", "[10.0.0.1]:80"} {
		if got, err := ParseAuthority(in); err == nil {
			t.Errorf("ParseAuthority(%q) = %v, want an error", in, got)
		}
	}
}

func TestForwarded(t *testing.T) {
	tests := []struct {
		in   string
		want Forwarded
	}{
		{`for="10.1.2.3:4567"`, Forwarded{For: netip.MustParseAddrPort("10.1.2.3:4567")}},
		{`for="[fd00::7]:4567";host=reviews.shop.svc.cluster.local`, Forwarded{For: netip.MustParseAddrPort("[fd00::7]:4567"), Host: "reviews.shop.svc.cluster.local"}},
		{`For=10.1.2.3 ; proto=https;HOST="a\"b"`, Forwarded{For: netip.MustParseAddrPort("10.1.2.3:0"), Host: `a"b`}},
		{`for="[fd00::7]"`, Forwarded{For: netip.MustParseAddrPort("[fd00::7]:0")}},
		{`for=unknown, for=10.9.9.9`, Forwarded{}},
		{`for=_hidden;host=x`, Forwarded{Host: "x"}},
		{``, Forwarded{}},
	}
	for _, tt := range tests {
		got, err := ParseForwarded(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("ParseForwarded(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
	}
	for _, in := range []string{`for="10.1.2.3:4567`, `for=`, `=x`, `for=fd00::1`, `for="[fe80::1%25eth0]:1"`, `for=1.2.3.4 x`, `for=a"b`, "host=\"a\x01\""} {
		if got, err := ParseForwarded(in); err == nil {
			t.Errorf("ParseForwarded(%q) = %+v, want an error", in, got)
		}
	}
	src := netip.MustParseAddrPort("[fd00::7]:4567")
	if got := FormatForwarded(src, "reviews.shop.svc.cluster.local"); got != `for="[fd00::7]:4567";host=reviews.shop.svc.cluster.local` {
		t.Errorf("FormatForwarded = %s", got)
	}
	if got := FormatForwarded(netip.AddrPort{}, `we"ird host`); got != `host="we\"ird host"` {
		t.Errorf("FormatForwarded = %s", got)
	}
}

func TestBaggage(t *testing.T) {
	in := "k8s.cluster.name=c1, k8s.namespace.name=shop,k8s.deployment.name=cart-v2;p=1,service.name=cart,service.version=v%202,other=x,broken"
	want := Baggage{ClusterName: "c1", Namespace: "shop", WorkloadKind: "deployment", WorkloadName: "cart-v2", ServiceName: "cart", Version: "v 2"}
	if got := ParseBaggage(in); got != want {
		t.Errorf("ParseBaggage = %+v, want %+v", got, want)
	}
	if s := want.String(); s != "k8s.cluster.name=c1,k8s.namespace.name=shop,k8s.deployment.name=cart-v2,service.name=cart,service.version=v%202" {
		t.Errorf("String = %s", s)
	}
}

func TestTraceParent(t *testing.T) {
	a, b := newTraceParent(), newTraceParent()
	if len(a) != 55 || !strings.HasPrefix(a, "00-") || !strings.HasSuffix(a, "-01") || a == b {
		t.Errorf("traceparents %q, %q", a, b)
	}
}

func FuzzParseAuthority(f *testing.F) {
	for _, s := range []string{"10.0.0.1:80", "[fd00::1]:8080", "[::ffff:10.0.0.1]:80", "10.0.0.1:0", "[fe80::1%eth0]:80",
		"reviews:9080", "", ":", "[]:1", "1.2.3.4:65536", "[::]:1", "0.0.0.0:00080"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := ParseAuthority(s)
		if err != nil {
			return
		}
		if ap.Port() == 0 || ap.Addr().Zone() != "" || ap.Addr().Is4In6() {
			t.Fatalf("ParseAuthority(%q) = %v", s, ap)
		}
		again, err := ParseAuthority(ap.String())
		if err != nil || again != ap {
			t.Fatalf("round trip of %q: %v -> %v, %v", s, ap, again, err)
		}
	})
}

func FuzzParseForwarded(f *testing.F) {
	for _, s := range []string{`for="10.1.2.3:4567"`, `for="[fd00::7]:4567";host=reviews.shop.svc.cluster.local`,
		`For=10.1.2.3 ; proto=https;HOST="a\"b"`, `for=unknown, for=10.9.9.9`, `for=_x`, `for="`, `;;`, `host="\`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		fw, err := ParseForwarded(s)
		if err != nil {
			return
		}
		for i := 0; i < len(fw.Host); i++ {
			if c := fw.Host[i]; c < 0x20 && c != '\t' || c == 0x7f {
				t.Fatalf("ParseForwarded(%q): control character in host %q", s, fw.Host)
			}
		}
		out := FormatForwarded(fw.For, fw.Host)
		again, err := ParseForwarded(out)
		if err != nil {
			t.Fatalf("ParseForwarded(FormatForwarded(%+v) = %q): %v", fw, out, err)
		}
		// A for= without a port formats with port 0 and stays equal.
		if again != fw {
			t.Fatalf("round trip of %q: %+v -> %q -> %+v", s, fw, out, again)
		}
	})
}

func FuzzParseBaggage(f *testing.F) {
	for _, s := range []string{"k8s.cluster.name=c1,k8s.namespace.name=shop,k8s.deployment.name=cart-v2,service.name=cart,service.version=v%202",
		"a=b;c=d,,=,%zz=%", "k8s..name=x,k8s.a b.name=%20"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b := ParseBaggage(s)
		if again := ParseBaggage(b.String()); again != b {
			t.Fatalf("round trip of %q: %+v -> %q -> %+v", s, b, b.String(), again)
		}
	})
}
