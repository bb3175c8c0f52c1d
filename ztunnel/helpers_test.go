package ztunnel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/ambit-mesh/ambit/certs"
	"github.com/ambit-mesh/ambit/hbone"
	"github.com/ambit-mesh/ambit/model"
)

// testCerts is a CertSource over a certs.CA: one SVID per identity, issued on
// first use.
type testCerts struct {
	ca  *certs.CA
	ttl time.Duration

	mu    sync.Mutex // guards svids and asked
	svids map[spiffeid.ID]*x509svid.SVID
	asked []spiffeid.ID // SetIdentities calls' last argument
}

func newTestCerts(t testing.TB, td string) *testCerts {
	t.Helper()
	ca, err := certs.NewSelfSignedCA(spiffeid.RequireTrustDomainFromString(td), certs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return &testCerts{ca: ca, svids: map[spiffeid.ID]*x509svid.SVID{}}
}

func (c *testCerts) GetX509SVID(_ context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.svids[id]; s != nil {
		return s, nil
	}
	s, err := c.ca.IssueSVID(id, c.ttl)
	if err != nil {
		return nil, err
	}
	c.svids[id] = s
	return s, nil
}

func (c *testCerts) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != c.ca.TrustDomain() {
		return nil, fmt.Errorf("no bundle for trust domain %s", td)
	}
	return c.ca.Bundle(), nil
}

func (c *testCerts) SetIdentities(ids []spiffeid.ID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.asked = ids
}

// testNet hands out loopback addresses in a /24 of 127/8 chosen at random,
// so that concurrent test binaries on the machine do not collide.
type testNet struct{ base [3]byte }

func newTestNet() testNet {
	return testNet{base: [3]byte{127, byte(1 + rand.IntN(250)), byte(1 + rand.IntN(250))}}
}

func (n testNet) ip(host byte) netip.Addr {
	return netip.AddrFrom4([4]byte{n.base[0], n.base[1], n.base[2], host})
}

// node is one ztunnel under test.
type node struct {
	p      *Proxy
	cancel context.CancelFunc
	done   chan error
	logs   *logBuffer
}

// startNode starts a proxy for node name with every listener on an ephemeral
// port of 0.0.0.0 (HBONE and inbound capture accept any local destination, so
// a pod IP on the loopback reaches them and LocalAddr is the pod IP).
func startNode(t testing.TB, name string, store *model.Store, cs hbone.CertSource, mod func(*Config)) *node {
	t.Helper()
	logs := &logBuffer{}
	cfg := Config{
		Store:        store,
		Certs:        cs,
		Node:         name,
		InboundAddr:  "0.0.0.0:0",
		HBONEAddr:    "0.0.0.0:0",
		SOCKS5Addr:   "127.0.0.1:0",
		AdminAddr:    "127.0.0.1:0",
		MetricsAddr:  "127.0.0.1:0",
		ReadyAddr:    "127.0.0.1:0",
		Transparent:  true,
		DrainTimeout: 5 * time.Second,
		Logger:       slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithCancel(t.Context())
	p, err := New(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	n := &node{p: p, cancel: cancel, done: make(chan error, 1), logs: logs}
	go func() { n.done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		p.Close()
		<-n.done
	})
	waitFor(t, "node ready", func() bool { return p.serving.Load() })
	return n
}

func (n *node) port(name string) uint16 { return addrPort(n.p.Addr(name)).Port() }

// hboneTo maps every pod IP:15008 in pods to the node's HBONE port.
func hboneTo(routes map[netip.Addr]*node) func(netip.AddrPort) netip.AddrPort {
	return func(a netip.AddrPort) netip.AddrPort {
		if n := routes[a.Addr()]; n != nil {
			return netip.AddrPortFrom(a.Addr(), n.port(ListenerHBONE))
		}
		return a
	}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// logBuffer collects log lines, safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// socksDial connects to dst through the SOCKS5 listener at proxy, from src
// (port 0: any). dst is "ip:port" or "name:port". It returns the connection
// after a successful reply, or the reply code as an error.
func socksDial(proxy net.Addr, src netip.Addr, dst string) (net.Conn, error) {
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", proxy.String())
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(15 * time.Second))
	host, portStr, _ := strings.Cut(dst, ":")
	var port uint16
	fmt.Sscan(portStr, &port)
	req := []byte{5, 1, 0, 5, 1, 0}
	if a, err := netip.ParseAddr(host); err == nil && a.Is4() {
		req = append(req, 1)
		req = append(req, a.AsSlice()...)
	} else {
		req = append(req, 3, byte(len(host)))
		req = append(req, host...)
	}
	req = binary.BigEndian.AppendUint16(req, port)
	if _, err := c.Write(req); err != nil {
		c.Close()
		return nil, err
	}
	var resp [12]byte
	if _, err := io.ReadFull(c, resp[:12]); err != nil {
		c.Close()
		return nil, fmt.Errorf("read socks reply: %w", err)
	}
	if resp[0] != 5 || resp[1] != 0 || resp[2] != 5 || resp[3] != 0 {
		c.Close()
		return nil, &socksReplyError{code: resp[3]}
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

type socksReplyError struct{ code byte }

func (e *socksReplyError) Error() string { return fmt.Sprintf("socks reply %d", e.code) }

// server is a TCP server at a pod address. For each connection it reads
// a request header (8 bytes: how many bytes to send back), then sends that
// many deterministic bytes and half-closes, while hashing everything the
// client sends until EOF; it records the hash, byte count and the peer.
type server struct {
	ln net.Listener

	mu      sync.Mutex // guards results
	results []serverResult
	wg      sync.WaitGroup
}

type serverResult struct {
	peer  netip.AddrPort
	n     int64
	sum   [32]byte
	err   error
	local netip.AddrPort
}

func startServer(t testing.TB, addr netip.AddrPort) *server {
	t.Helper()
	ln, err := net.Listen("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	return serveOn(t, ln)
}

func serveOn(t testing.TB, ln net.Listener) *server {
	s := &server{ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.handle(c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *server) handle(c net.Conn) {
	defer c.Close()
	r := serverResult{peer: addrPort(c.RemoteAddr()), local: addrPort(c.LocalAddr())}
	var hdr [8]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		r.err = err
		s.record(r)
		return
	}
	want := int64(binary.BigEndian.Uint64(hdr[:]))
	var wg sync.WaitGroup
	wg.Add(1)
	var werr error
	go func() {
		defer wg.Done()
		_, werr = io.Copy(c, io.LimitReader(patternReader(7), want))
		if werr == nil {
			werr = c.(*net.TCPConn).CloseWrite()
		}
	}()
	h := sha256.New()
	r.n, r.err = io.Copy(h, c)
	wg.Wait()
	if r.err == nil {
		r.err = werr
	}
	copy(r.sum[:], h.Sum(nil))
	s.record(r)
}

func (s *server) record(r serverResult) {
	s.mu.Lock()
	s.results = append(s.results, r)
	s.mu.Unlock()
}

func (s *server) all() []serverResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]serverResult(nil), s.results...)
}

// patternReader returns an endless deterministic reader.
func patternReader(seed uint64) io.Reader {
	return &prng{r: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

type prng struct {
	r   *rand.Rand
	buf [8]byte
	n   int // unread bytes at the end of buf
}

func (p *prng) Read(b []byte) (int, error) {
	for i := range b {
		if p.n == 0 {
			binary.LittleEndian.PutUint64(p.buf[:], p.r.Uint64())
			p.n = 8
		}
		b[i] = p.buf[8-p.n]
		p.n--
	}
	return len(b), nil
}

// exchange runs one client exchange on c: it asks for down bytes, sends up
// bytes of a pattern seeded with seed, half-closes, reads the reply to EOF,
// and checks the reply's hash. It returns the hash of what it sent.
func exchange(c net.Conn, up, down int64, seed uint64) ([32]byte, error) {
	defer c.Close()
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(down))
	errc := make(chan error, 1)
	sent := sha256.New()
	go func() {
		if _, err := c.Write(hdr[:]); err != nil {
			errc <- err
			return
		}
		_, err := io.Copy(c, io.TeeReader(io.LimitReader(patternReader(seed), up), sent))
		if err == nil {
			err = c.(interface{ CloseWrite() error }).CloseWrite()
		}
		errc <- err
	}()
	got := sha256.New()
	n, rerr := io.Copy(got, c)
	werr := <-errc
	var sum [32]byte
	copy(sum[:], sent.Sum(nil))
	if err := errors.Join(werr, rerr); err != nil {
		return sum, err
	}
	if n != down {
		return sum, fmt.Errorf("received %d bytes, want %d", n, down)
	}
	want := sha256.New()
	io.Copy(want, io.LimitReader(patternReader(7), down))
	if !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
		return sum, errors.New("reply hash mismatch")
	}
	return sum, nil
}

func httpGet(t testing.TB, addr net.Addr, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + addr.String() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
