//go:build integration

package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/hbone/h3"
	"github.com/ambit-mesh/ambit/identity"
	"github.com/ambit-mesh/ambit/integration/delayline"
	"github.com/ambit-mesh/ambit/integration/netns"
)

// quicMarker fills the payloads: if it shows up in a capture of the
// underlay, something crossed in clear.
var quicMarker = []byte("AMBIT-PLAINTEXT-MARKER-0123456789")

// Target ports of the test server's handler.
const (
	portExchange = 1 // 8-byte length n, then the client's payload; the server sends n bytes back and reports the SHA-256 of what it read
	portEcho     = 2 // echo until EOF
)

// quicWorld is two netns nodes with a delay line in front of n2; n2 serves
// HBONE over HTTP/2 (TCP 15008) and HTTP/3 (UDP 15008) for the identity of
// its own address; n1 dials.
type quicWorld struct {
	t          *testing.T
	topo       *netns.Topology
	line       *delayline.Line
	mgr        *certs.Manager
	cli, srv   spiffeid.ID
	n1, n2     *netns.Node
	h2srv      *hbone.Server
	h3srv      *h3.Server
	serverSums chan [32]byte
}

func newQUICWorld(t *testing.T) *quicWorld {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces)")
	}
	topo, err := netns.Build(netns.Config{
		Prefix: fmt.Sprintf("q%d", os.Getpid()),
		Nodes:  []netns.NodeConfig{{Name: "n1"}, {Name: "n2"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	td := identity.DefaultTrustDomain
	ca, err := certs.NewSelfSignedCA(td, certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	w := &quicWorld{t: t, topo: topo, mgr: &certs.Manager{Issuer: ca}, n1: topo.Node("n1"), n2: topo.Node("n2"),
		serverSums: make(chan [32]byte, 64)}
	w.cli, _ = identity.Workload(td, "shop", "client")
	w.srv, _ = identity.Workload(td, "shop", "server")
	w.mgr.SetIdentities([]spiffeid.ID{w.cli, w.srv})
	if w.line, err = delayline.Insert(topo, w.n2, delayline.Config{}, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.line.Close() })

	local := func(dst netip.Addr) (spiffeid.ID, bool) { return w.srv, dst == w.n2.IP }
	w.h2srv = &hbone.Server{Certs: w.mgr, LocalIdentity: local, Handler: hbone.HandlerFunc(w.serve)}
	w.h3srv = &h3.Server{Certs: w.mgr, LocalIdentity: local, Handler: hbone.HandlerFunc(w.serve)}
	ln, err := w.n2.NS.Listen(t.Context(), nil, "tcp4", ":15008")
	if err != nil {
		t.Fatal(err)
	}
	pc := w.udp(w.n2.NS, ":15008")
	go w.h2srv.Serve(ln)
	go w.h3srv.Serve(pc)
	t.Cleanup(func() { w.h2srv.Close(); w.h3srv.Close() })
	return w
}

// udp opens a UDP socket in ns.
func (w *quicWorld) udp(ns *netns.NS, addr string) net.PacketConn {
	var pc net.PacketConn
	if err := ns.Do(func() error {
		var err error
		pc, err = net.ListenPacket("udp4", addr)
		return err
	}); err != nil {
		w.t.Fatal(err)
	}
	return pc
}

// serve is the "pod" behind the tunnel (see portExchange, portEcho).
func (w *quicWorld) serve(ctx context.Context, r *hbone.Request) {
	st, err := r.Accept()
	if err != nil {
		return
	}
	switch r.Target.Port() {
	case portExchange:
		var hdr [8]byte
		if _, err := io.ReadFull(st, hdr[:]); err != nil {
			return
		}
		var wg sync.WaitGroup
		wg.Go(func() {
			io.Copy(st, io.LimitReader(patterned(), int64(binary.BigEndian.Uint64(hdr[:]))))
			st.CloseWrite()
		})
		h := sha256.New()
		io.Copy(h, st)
		wg.Wait()
		var s [32]byte
		copy(s[:], h.Sum(nil))
		w.serverSums <- s
	case portEcho:
		io.Copy(st, st)
		st.CloseWrite()
	}
}

// patterned is an endless stream of the marker.
func patterned() io.Reader {
	return readerFunc(func(p []byte) (int, error) {
		for i := range p {
			p[i] = quicMarker[i%len(quicMarker)]
		}
		return len(p), nil
	})
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// dialers returns both transports' dialers from n1, and a Fallback.
func (w *quicWorld) dialers() (*hbone.Dialer, *h3.Dialer) {
	d2 := &hbone.Dialer{Certs: w.mgr, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return w.n1.NS.Dial(ctx, nil, network, addr)
	}}
	d3 := &h3.Dialer{Certs: w.mgr, ListenPacket: func(ctx context.Context, network, addr string) (net.PacketConn, error) {
		return w.udp(w.n1.NS, addr), nil
	}}
	w.t.Cleanup(func() { d2.Close(); d3.Close() })
	return d2, d3
}

func (w *quicWorld) request(port uint16) hbone.DialRequest {
	return hbone.DialRequest{Source: w.cli, Peers: []spiffeid.ID{w.srv},
		Addr: netip.AddrPortFrom(w.n2.IP, 15008), Target: netip.AddrPortFrom(w.n2.IP, port)}
}

type dialFunc func(ctx context.Context, r hbone.DialRequest) (*hbone.Stream, error)

// exchange sends up bytes and receives down bytes at once, both
// half-closed, and checks both SHA-256s.
func (w *quicWorld) exchange(dial dialFunc, up, down int64) error {
	ctx, cancel := context.WithTimeout(w.t.Context(), 60*time.Second)
	defer cancel()
	st, err := dial(ctx, w.request(portExchange))
	if err != nil {
		return err
	}
	defer st.Close()
	sent := sha256.New()
	errc := make(chan error, 1)
	go func() {
		var hdr [8]byte
		binary.BigEndian.PutUint64(hdr[:], uint64(down))
		if _, err := st.Write(hdr[:]); err != nil {
			errc <- err
			return
		}
		_, err := io.Copy(st, io.TeeReader(io.LimitReader(patterned(), up), sent))
		if err == nil {
			err = st.CloseWrite()
		}
		errc <- err
	}()
	got := sha256.New()
	n, rerr := io.Copy(got, st)
	if err := <-errc; err != nil || rerr != nil {
		return fmt.Errorf("write %v, read %v", err, rerr)
	}
	want := sha256.New()
	io.Copy(want, io.LimitReader(patterned(), down))
	if n != down || !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
		return fmt.Errorf("received %d bytes (want %d), SHA match %v", n, down, bytes.Equal(got.Sum(nil), want.Sum(nil)))
	}
	select {
	case s := <-w.serverSums:
		if !bytes.Equal(s[:], sent.Sum(nil)) {
			return fmt.Errorf("the server's SHA-256 of %d bytes differs", up)
		}
	case <-ctx.Done():
		return fmt.Errorf("no server result: %w", ctx.Err())
	}
	return nil
}

// TestQUICDelayLine: both transports across a delay line (none, 1 ms and
// 10 ms each way, 1% loss): SHA-checked payloads both ways with
// half-close; a new tunnel's latency and a request's, logged side by side;
// no plaintext on the underlay; with UDP 15008 dropped, h3.Fallback falls
// back to HTTP/2.
func TestQUICDelayLine(t *testing.T) {
	w := newQUICWorld(t)
	pcap := filepath.Join(t.TempDir(), "underlay.pcap")
	capt, err := w.n1.NS.StartCapture(netns.Uplink, pcap, "")
	if err != nil {
		t.Fatal(err)
	}
	d2, d3 := w.dialers()
	transports := []struct {
		name string
		dial dialFunc
		new  func() dialFunc // a fresh dialer: no pooled connection
	}{
		{"h2", d2.Dial, func() dialFunc { d, _ := w.dialers(); return d.Dial }},
		{"h3", d3.Dial, func() dialFunc { _, d := w.dialers(); return d.Dial }},
	}
	settings := []struct {
		name  string
		cfg   delayline.Config
		bytes int64
	}{
		{"0ms", delayline.Config{}, 8 << 20},
		{"1ms", delayline.Config{Delay: time.Millisecond}, 8 << 20},
		{"10ms", delayline.Config{Delay: 10 * time.Millisecond}, 4 << 20},
		{"1ms+1%loss", delayline.Config{Delay: time.Millisecond, Loss: 0.01}, 4 << 20},
	}
	type result struct{ newTunnel, request, mbps float64 }
	results := map[string]map[string]result{}
	for _, s := range settings {
		w.line.Set(s.cfg)
		results[s.name] = map[string]result{}
		for _, tr := range transports {
			if err := w.exchange(tr.dial, s.bytes, s.bytes/2); err != nil {
				t.Fatalf("%s %s: exchange: %v", s.name, tr.name, err)
			}
			var r result
			// New tunnel: a fresh dialer's first stream answered (handshake + CONNECT).
			var lat []time.Duration
			for range 5 {
				dial := tr.new()
				start := time.Now()
				st, err := dial(t.Context(), w.request(portEcho))
				if err != nil {
					t.Fatalf("%s %s: new tunnel: %v", s.name, tr.name, err)
				}
				lat = append(lat, time.Since(start))
				st.Close()
			}
			r.newTunnel = ms(median(lat))
			// Request: 1 KiB echoed on an open tunnel.
			st, err := tr.dial(t.Context(), w.request(portEcho))
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 1024)
			lat = lat[:0]
			for range 20 {
				start := time.Now()
				st.Write(buf)
				if _, err := io.ReadFull(st, buf); err != nil {
					t.Fatalf("%s %s: echo: %v", s.name, tr.name, err)
				}
				lat = append(lat, time.Since(start))
			}
			st.Close()
			r.request = ms(median(lat))
			// Throughput: one stream, one way.
			start := time.Now()
			if err := w.exchange(tr.dial, s.bytes, 0); err != nil {
				t.Fatalf("%s %s: bulk: %v", s.name, tr.name, err)
			}
			r.mbps = float64(s.bytes) * 8 / 1e6 / time.Since(start).Seconds()
			results[s.name][tr.name] = r
			if min := 2 * s.cfg.Delay; r.request < ms(min) {
				t.Errorf("%s %s: request latency %.2fms below the line's round trip %v", s.name, tr.name, r.request, min)
			}
		}
	}
	t.Logf("HBONE across the delay line (one stream; the forwarder is in-process, so throughput is the line's as much as the transport's)")
	t.Logf("%-12s %-4s %14s %12s %12s", "path", "", "new tunnel ms", "request ms", "Mbit/s")
	for _, s := range settings {
		for _, tr := range transports {
			r := results[s.name][tr.name]
			t.Logf("%-12s %-4s %14.2f %12.2f %12.0f", s.name, tr.name, r.newTunnel, r.request, r.mbps)
		}
	}

	// UDP 15008 dropped: QUIC gets no answer, HTTP/2 carries the tunnel.
	w.line.Set(delayline.Config{Delay: time.Millisecond, Drop: func(f []byte) bool {
		return len(f) > 37 && f[23] == 17 && binary.BigEndian.Uint16(f[36:]) == 15008
	}})
	h2b, h3b := w.dialers()
	h3b.HandshakeTimeout = time.Second
	var fallbacks atomic.Int32
	fb := &h3.Fallback{H2: h2b, H3: h3b, DialTimeout: time.Second, OnFallback: func(hbone.DialRequest, error) { fallbacks.Add(1) }}
	var transportsUsed []string
	for range 3 {
		st, err := fb.Dial(t.Context(), w.request(portEcho))
		if err != nil {
			t.Fatalf("fallback dial: %v", err)
		}
		transportsUsed = append(transportsUsed, st.Transport())
		st.Close()
	}
	if err := w.exchange(fb.Dial, 1<<20, 1<<20); err != nil {
		t.Fatalf("exchange after fallback: %v", err)
	}
	if fallbacks.Load() != 1 || slices.ContainsFunc(transportsUsed, func(s string) bool { return s != hbone.TransportH2 }) {
		t.Errorf("with UDP 15008 dropped: %d fallbacks, transports %v; want 1 fallback, all h2", fallbacks.Load(), transportsUsed)
	}
	if w.line.Stats().Dropped == 0 {
		t.Error("the line dropped no UDP 15008: the test proves nothing")
	}

	// Nothing in clear on the underlay, either transport.
	if _, err := capt.Stop(); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	if len(raw) < 1<<20 {
		t.Fatalf("the capture has %d bytes: it saw nothing", len(raw))
	}
	if bytes.Contains(raw, quicMarker[:16]) {
		t.Error("the payload's marker is on the underlay in clear")
	}
	t.Logf("line: %+v; capture %d bytes, no plaintext", w.line.Stats(), len(raw))
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
