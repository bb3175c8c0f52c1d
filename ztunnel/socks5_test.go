package ztunnel

import (
	"bufio"
	"bytes"
	"errors"
	"net/netip"
	"testing"

	"github.com/ambit-mesh/ambit/model"
)

func socksSnapshot() *model.Snapshot {
	return model.NewSnapshot(nil, []*model.Service{
		{Name: "web", Namespace: "shop", Hostname: "web.shop.svc.cluster.local", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.5")}},
	}, nil, nil)
}

func TestReadSOCKSRequest(t *testing.T) {
	greet := []byte{5, 2, 2, 0} // offers user/pass and no-auth
	req := func(rest ...byte) []byte {
		return append(append([]byte{}, greet...), append([]byte{5, 1, 0}, rest...)...)
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want string
		rep  byte // reply code for a refused request; 0: success or a plain error
		err  bool
	}{
		{name: "IPv4", in: req(1, 10, 0, 0, 1, 0x1f, 0x90), want: "10.0.0.1:8080"},
		{name: "IPv6", in: req(4, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80), want: "[fd00::1]:80"},
		{name: "v4-mapped IPv6", in: req(4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2, 0, 80), want: "10.0.0.2:80"},
		{name: "service hostname", in: req(append(append([]byte{3, 26}, "web.shop.svc.cluster.local"...), 0, 80)...), want: "10.96.0.5:80"},
		{name: "short service name", in: req(append(append([]byte{3, 8}, "web.shop"...), 0, 80)...), want: "10.96.0.5:80"},
		{name: "address literal as a name", in: req(append(append([]byte{3, 8}, "10.1.2.3"...), 0, 80)...), want: "10.1.2.3:80"},
		{name: "unknown name", in: req(append(append([]byte{3, 7}, "example"...), 0, 80)...), rep: socksHostUnreachable},
		{name: "BIND", in: append(append([]byte{}, greet...), 5, 2, 0, 1, 1, 2, 3, 4, 0, 80), rep: socksCmdNotSupported},
		{name: "UDP ASSOCIATE by name", in: append(append([]byte{}, greet...), append([]byte{5, 3, 0, 3, 1, 'x'}, 0, 80)...), rep: socksCmdNotSupported},
		{name: "bad address type", in: req(2, 0, 0), rep: socksAddrTypeNotSupport},
		{name: "SOCKS4", in: []byte{4, 1, 0, 80, 1, 2, 3, 4, 0}, err: true},
		{name: "no acceptable method", in: []byte{5, 1, 2}, err: true},
		{name: "truncated", in: req(1, 10, 0), err: true},
		{name: "empty", in: nil, err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			got, err := readSOCKSRequest(bufio.NewReader(bytes.NewReader(tc.in)), &out, socksSnapshot())
			var se *errSOCKS
			switch {
			case tc.rep != 0:
				if !errors.As(err, &se) || se.rep != tc.rep {
					t.Fatalf("err %v, want reply %d", err, tc.rep)
				}
			case tc.err:
				if err == nil || errors.As(err, &se) {
					t.Fatalf("err %v, want a plain error", err)
				}
			default:
				if err != nil || got.String() != tc.want {
					t.Fatalf("got %s, %v; want %s", got, err, tc.want)
				}
				if !bytes.Equal(out.Bytes(), []byte{5, 0}) {
					t.Fatalf("method reply %v", out.Bytes())
				}
			}
		})
	}
}

func FuzzReadSOCKSRequest(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0, 80})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 3, 8, 'w', 'e', 'b', '.', 's', 'h', 'o', 'p', 0, 80})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 4, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80})
	snap := socksSnapshot()
	f.Fuzz(func(t *testing.T, in []byte) {
		var out bytes.Buffer
		got, err := readSOCKSRequest(bufio.NewReader(bytes.NewReader(in)), &out, snap)
		if err == nil && !got.IsValid() {
			t.Fatalf("no error and no destination for %x", in)
		}
		if out.Len() > 2 {
			t.Fatalf("wrote %d bytes before the reply", out.Len())
		}
	})
}
