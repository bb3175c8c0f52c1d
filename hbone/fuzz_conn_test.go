package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// FuzzServerConn feeds arbitrary bytes, after the client preface, to a
// Server's HTTP/2 connection: the real Serve, TLS handshake, read loop,
// stream handling and handlers, over an in-memory pipe. The input ends
// with the client's close_notify (it goes on reading). It checks that
// nothing panics, that the server closes the connection and every
// goroutine of it ends within a deadline after the input ends, and that
// Close then leaves no goroutine behind.
//
//	go test -run '^$' -fuzz FuzzServerConn -fuzztime 3m ./hbone/
func FuzzServerConn(f *testing.F) {
	for _, seed := range fuzzConnSeeds(f) {
		f.Add(seed)
	}
	fx := newFuzzConnEnv(f)
	f.Fuzz(func(t *testing.T, input []byte) {
		fx.run(t, input)
	})
}

// fuzzConnEnv is what the fuzz inputs share: the CA, identities and the
// client's TLS configuration.
type fuzzConnEnv struct {
	certs  *testCerts
	srvID  spiffeid.ID
	client *tls.Config
}

// fuzzLocal and fuzzRemote are the TCP addresses the pipe reports: the
// server takes fuzzLocal as the workload's address (:authority must name
// it).
var (
	fuzzLocal  = netip.MustParseAddrPort("127.0.0.1:15008")
	fuzzRemote = netip.MustParseAddrPort("127.0.0.2:40000")
)

func newFuzzConnEnv(f *testing.F) *fuzzConnEnv {
	ca := newCA(f, "cluster.local", nil)
	certs := newTestCerts(ca)
	cliID := workloadID(f, "cluster.local", "shop", "client")
	srvID := workloadID(f, "cluster.local", "shop", "server")
	svid, err := certs.GetX509SVID(context.Background(), cliID)
	if err != nil {
		f.Fatal(err)
	}
	if _, err := certs.GetX509SVID(context.Background(), srvID); err != nil {
		f.Fatal(err)
	}
	return &fuzzConnEnv{certs: certs, srvID: srvID, client: clientTLSConfig(svid, certs, []spiffeid.ID{srvID})}
}

// fuzzConnDeadline bounds each phase of one input: the handshake and
// writes, then the server's teardown after the input ends.
const fuzzConnDeadline = 5 * time.Second

func (fx *fuzzConnEnv) run(t *testing.T, input []byte) {
	before := runtime.NumGoroutine()
	s := &Server{
		Certs: fx.certs,
		LocalIdentity: func(dst netip.Addr) (spiffeid.ID, bool) {
			return fx.srvID, dst == fuzzLocal.Addr()
		},
		Handler:          HandlerFunc(fuzzEcho),
		HandshakeTimeout: fuzzConnDeadline,
		KeepAlive:        -1,
	}
	ln := newPipeListener()
	serveErr := make(chan error, 1)
	go func() { serveErr <- s.Serve(ln) }()
	cc, sc := net.Pipe()
	t.Cleanup(func() { // on failure too, without hanging on a stuck connection
		cc.Close()
		closed := make(chan struct{})
		go func() { s.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(fuzzConnDeadline):
			t.Errorf("Server.Close did not return within %v\n%s", fuzzConnDeadline, hboneStacks())
		}
	})
	srv := &pipeConn{Conn: sc, local: fuzzLocal, remote: fuzzRemote, closed: make(chan struct{})}
	ln.conns <- srv
	tc := tls.Client(&pipeConn{Conn: cc, local: fuzzRemote, remote: fuzzLocal, closed: make(chan struct{})}, fx.client)
	tc.SetDeadline(time.Now().Add(fuzzConnDeadline))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	// The server's frames are read and dropped until it closes.
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		io.Copy(io.Discard, tc)
	}()
	// Writes may fail: the server closes on protocol errors.
	if _, err := tc.Write(append([]byte(http2.ClientPreface), input...)); err == nil {
		tc.CloseWrite() // the input ends: close_notify
	}

	// The server ends the connection and everything it started.
	select {
	case <-srv.closed:
	case <-time.After(fuzzConnDeadline):
		t.Fatalf("the server did not close the connection within %v of the input's end\n%s", fuzzConnDeadline, hboneStacks())
	}
	cc.Close()
	<-drained
	waitGoroutines(t, before+1, "after the input ended") // the Serve loop is left
	s.Close()
	if err := <-serveErr; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v, want ErrServerClosed", err)
	}
	waitGoroutines(t, before, "after Close")
}

// fuzzEcho accepts and echoes until the client half-closes.
func fuzzEcho(_ context.Context, r *Request) {
	st, err := r.Accept()
	if err != nil {
		return
	}
	io.Copy(st, st)
	st.CloseWrite()
}

// waitGoroutines waits until at most n goroutines run.
func waitGoroutines(t *testing.T, n int, when string) {
	t.Helper()
	deadline := time.Now().Add(fuzzConnDeadline)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			t.Fatalf("goroutine leak %s: %d running, want at most %d\n%s", when, runtime.NumGoroutine(), n, hboneStacks())
		}
		time.Sleep(time.Millisecond)
	}
}

func hboneStacks() string {
	buf := make([]byte, 1<<20)
	return relevantStacks(string(buf[:runtime.Stack(buf, true)]))
}

// pipeListener hands out the connections sent on conns.
type pipeListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return net.TCPAddrFromAddrPort(fuzzLocal) }

// pipeConn is one end of a net.Pipe that reports TCP addresses and
// whether it was closed.
type pipeConn struct {
	net.Conn
	local, remote netip.AddrPort
	once          sync.Once
	closed        chan struct{}
}

func (c *pipeConn) LocalAddr() net.Addr  { return net.TCPAddrFromAddrPort(c.local) }
func (c *pipeConn) RemoteAddr() net.Addr { return net.TCPAddrFromAddrPort(c.remote) }

func (c *pipeConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.closed) })
	return err
}

// fuzzConnSeeds are frame sequences (after the preface), valid and not,
// written with http2.Framer.
func fuzzConnSeeds(f *testing.F) [][]byte {
	authority := netip.AddrPortFrom(fuzzLocal.Addr(), 8080).String()
	block := func(fields ...string) []byte {
		var buf bytes.Buffer
		enc := hpack.NewEncoder(&buf)
		for i := 0; i+1 < len(fields); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
		}
		return buf.Bytes()
	}
	connect := block(":method", "CONNECT", ":authority", authority, "forwarded", `for="10.1.2.3:4567"`)
	frames := func(write func(fr *http2.Framer)) []byte {
		var buf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		fr.AllowIllegalWrites = true
		write(fr)
		return buf.Bytes()
	}
	settings := func(fr *http2.Framer) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	}
	open := func(fr *http2.Framer, id uint32) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: connect, EndHeaders: true})
	}
	var seeds [][]byte
	add := func(write func(fr *http2.Framer)) { seeds = append(seeds, frames(write)) }

	// Valid exchanges.
	add(func(fr *http2.Framer) { settings(fr) })
	add(func(fr *http2.Framer) {
		settings(fr)
		fr.WriteSettingsAck()
		open(fr, 1)
		fr.WriteData(1, false, []byte("hello"))
		fr.WriteWindowUpdate(0, 1<<20)
		fr.WriteWindowUpdate(1, 1<<16)
		fr.WriteData(1, true, []byte("world"))
	})
	add(func(fr *http2.Framer) {
		settings(fr)
		open(fr, 1)
		open(fr, 3)
		fr.WriteRSTStream(1, http2.ErrCodeCancel)
		fr.WriteDataPadded(3, false, []byte("padded"), make([]byte, 17))
		fr.WritePing(false, [8]byte{1, 2, 3})
		fr.WritePing(true, [8]byte{4})
		fr.WriteGoAway(0, http2.ErrCodeNo, []byte("bye"))
		fr.WriteData(3, true, bytes.Repeat([]byte{'x'}, 40000))
	})
	add(func(fr *http2.Framer) { // a header block split over CONTINUATIONs
		settings(fr)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: connect[:3]})
		fr.WriteContinuation(1, false, connect[3:7])
		fr.WriteContinuation(1, true, connect[7:])
		fr.WriteData(1, true, nil)
	})
	add(func(fr *http2.Framer) { // refused requests: not CONNECT, wrong authority, too many fields
		settings(fr)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":method", "GET", ":path", "/", ":scheme", "https", ":authority", authority), EndHeaders: true, EndStream: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block(":method", "CONNECT", ":authority", "10.9.9.9:80"), EndHeaders: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, BlockFragment: block(":method", "CONNECT", ":authority", authority, "x", string(bytes.Repeat([]byte{'y'}, 20000))), EndHeaders: true})
		fr.WritePriority(7, http2.PriorityParam{StreamDep: 1, Weight: 3})
	})
	// Malformed or out of order.
	add(func(fr *http2.Framer) { open(fr, 1) }) // no SETTINGS first
	add(func(fr *http2.Framer) {
		settings(fr)
		fr.WriteData(0, false, []byte("on stream 0"))
	})
	add(func(fr *http2.Framer) {
		settings(fr)
		open(fr, 2) // even: a server's ID
		open(fr, 1)
		open(fr, 1) // reused
	})
	add(func(fr *http2.Framer) {
		settings(fr)
		fr.WriteWindowUpdate(0, 0)
		fr.WriteWindowUpdate(0, 1<<31-1)
		fr.WriteWindowUpdate(9, 5) // idle stream
		fr.WriteRSTStream(11, http2.ErrCodeCancel)
	})
	add(func(fr *http2.Framer) { // trailers, and HEADERS after the stream ended
		settings(fr)
		open(fr, 1)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block("x-trailer", "1"), EndHeaders: true, EndStream: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block("x-late", "1"), EndHeaders: true, EndStream: true})
		fr.WriteData(1, false, []byte("after the end"))
	})
	add(func(fr *http2.Framer) { // CONTINUATION without HEADERS, and interleaved
		settings(fr)
		fr.WriteContinuation(1, true, connect)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: connect[:4]})
		fr.WritePing(false, [8]byte{})
	})
	add(func(fr *http2.Framer) {
		settings(fr)
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31})
		fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 100})
		fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 1 << 30}, http2.Setting{ID: http2.SettingEnablePush, Val: 2})
		fr.WriteRawFrame(http2.FrameSettings, 0, 0, []byte{1, 2, 3}) // not a multiple of 6
		fr.WriteRawFrame(http2.FrameType(0xfa), 0xff, 1, []byte("unknown type"))
	})
	add(func(fr *http2.Framer) {
		settings(fr)
		open(fr, 1)
		fr.WriteData(1, false, make([]byte, streamWindow/4)) // beyond the default frame size
		fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: connect, EndHeaders: true})
	})
	add(func(fr *http2.Framer) {
		settings(fr)
		open(fr, 1)
		fr.WriteRawFrame(http2.FrameData, http2.FlagDataPadded, 1, []byte{200, 'a'}) // padding longer than the payload
		fr.WriteRawFrame(http2.FrameWindowUpdate, 0, 1, []byte{0, 0})                // short
		fr.WriteRawFrame(http2.FrameRSTStream, 0, 0, []byte{0, 0, 0, 8})
		fr.WriteRawFrame(http2.FramePing, 0, 1, make([]byte, 8))
		fr.WriteRawFrame(http2.FrameGoAway, 0, 0, []byte{0})
	})
	add(func(fr *http2.Framer) { // a rapid reset burst
		settings(fr)
		for id := uint32(1); id < 400; id += 2 {
			open(fr, id)
			fr.WriteRSTStream(id, http2.ErrCodeCancel)
		}
	})
	seeds = append(seeds, nil, []byte{0, 0, 0, 4, 0, 0, 0, 0, 0}, []byte("garbage that is no frame"))
	return seeds
}
