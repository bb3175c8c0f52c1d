package gate

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/credentials"

	"github.com/ambit-mesh/ambit/istiod-lite/monitoring"
)

// Limit gives the calls whose :path starts with Prefix (e.g.
// "/ambit.ca.v1.CertificateService/") a request size limit: the DATA a
// client sends on one such call, framing and padding included, until the
// server ends the call. MaxBytes must be at least the server's per-stream
// receive window: a client may send that much on a call before the server
// refuses it, and that is not held against it.
type Limit struct {
	Prefix   string
	MaxBytes int
}

// ErrRequestTooLarge is the error a guarded connection fails with when a
// call sends more than its Limit.
var ErrRequestTooLarge = errors.New("request larger than its method's limit")

// Constants shared with gRPC's own HTTP/2 reader (which the guard must
// read exactly as): gRPC servers advertise neither a larger frame size nor
// a larger header table.
const (
	maxFrameSize   = 16384 // http2MaxFrameLen in grpc-go
	headerTableLen = 4096  // http2InitHeaderTableSize in grpc-go
	// maxOpenLimited bounds a connection's limited calls whose request has
	// not ended: unary calls end their request at once.
	maxOpenLimited = 256
)

// Creds returns server transport credentials that complete tc's handshake
// and then read the connection through a guard enforcing limits (see the
// package doc). maxHeaderList is the server's grpc.MaxHeaderListSize (0:
// gRPC's default, 16 MiB). Stats, if not nil, counts what was read.
func Creds(tc credentials.TransportCredentials, limits []Limit, maxHeaderList uint32, stats *Stats) credentials.TransportCredentials {
	if maxHeaderList == 0 {
		maxHeaderList = 16 << 20
	}
	return &guardCreds{TransportCredentials: tc, limits: limits, maxHeaderList: maxHeaderList, stats: stats}
}

// Stats counts what guarded connections read.
type Stats struct {
	// BytesRead is what the guard passed on to gRPC (after TLS).
	BytesRead atomic.Int64
	// TooLarge counts connections closed for a call over its limit.
	TooLarge atomic.Int64
	// Metrics, if set, counts the connections closed for a call over its
	// limit (reason monitoring.RefusedRequestTooLarge).
	Metrics *monitoring.Metrics
}

type guardCreds struct {
	credentials.TransportCredentials
	limits        []Limit
	maxHeaderList uint32
	stats         *Stats
}

func (c *guardCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return nil, nil, err
	}
	g := &guardConn{Conn: conn, limits: c.limits, stats: c.stats, open: map[uint32]openCall{}}
	g.fr = http2.NewFramer(io.Discard, &g.rec)
	g.rec.r = conn
	g.fr.SetMaxReadFrameSize(maxFrameSize)
	g.fr.MaxHeaderListSize = c.maxHeaderList
	g.fr.ReadMetaHeaders = hpack.NewDecoder(headerTableLen, nil)
	return g, info, nil
}

func (c *guardCreds) Clone() credentials.TransportCredentials {
	return &guardCreds{TransportCredentials: c.TransportCredentials.Clone(), limits: c.limits, maxHeaderList: c.maxHeaderList, stats: c.stats}
}

// recorder keeps what is read through it until taken.
type recorder struct {
	r   io.Reader
	buf bytes.Buffer
}

func (r *recorder) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.buf.Write(p[:n])
	return n, err
}

// take returns the bytes read since the last take; they stay valid until
// the next read through r.
func (r *recorder) take() []byte {
	b := r.buf.Bytes()
	r.buf.Reset()
	return b
}

type openCall struct {
	path string
	left int // bytes the call may still send
}

// guardConn passes the client's HTTP/2 bytes to gRPC one whole frame at a
// time, after parsing each with the same framer and header decoder gRPC
// uses (so the dynamic header table stays in step and :path is known for
// every stream). It also scans the frame headers gRPC writes, to forget the
// calls the server has ended (answered, or refused before reading them).
// Reads happen on gRPC's one reader goroutine and writes on its one writer
// goroutine.
type guardConn struct {
	net.Conn
	limits []Limit
	stats  *Stats

	// Used by the reader only.
	rec     recorder
	fr      *http2.Framer
	preface bool // the client preface was passed on
	pending []byte
	err     error

	// Used by the writer only.
	whdr  [9]byte // the frame header being written
	wn    int     // bytes of whdr seen
	wskip int     // payload bytes of the current frame still to pass

	mu   sync.Mutex          // guards open
	open map[uint32]openCall // limited calls neither side has ended
}

func (g *guardConn) Read(p []byte) (int, error) {
	for len(g.pending) == 0 {
		if g.err != nil {
			return 0, g.err
		}
		g.err = g.next()
		g.pending = g.rec.take()
	}
	n := copy(p, g.pending)
	g.pending = g.pending[n:]
	if g.stats != nil {
		g.stats.BytesRead.Add(int64(n))
	}
	return n, nil
}

// next reads the preface or one frame (with its CONTINUATIONs) and checks
// it; what it read is in g.rec.
func (g *guardConn) next() error {
	if !g.preface {
		g.preface = true
		_, err := io.ReadFull(&g.rec, make([]byte, len(http2.ClientPreface)))
		return err
	}
	f, err := g.fr.ReadFrame()
	if err != nil {
		var se http2.StreamError
		if errors.As(err, &se) {
			return nil // gRPC's reader sees the same and resets that stream
		}
		return err
	}
	id := f.Header().StreamID
	g.mu.Lock()
	defer g.mu.Unlock()
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		if c, ok := g.open[id]; ok { // trailers
			if f.StreamEnded() {
				delete(g.open, id)
			} else {
				g.open[id] = c
			}
			return nil
		}
		path := f.PseudoValue("path")
		for _, l := range g.limits {
			if strings.HasPrefix(path, l.Prefix) && !f.StreamEnded() {
				if len(g.open) >= maxOpenLimited {
					return fmt.Errorf("gate: more than %d open %s calls on one connection", maxOpenLimited, l.Prefix)
				}
				g.open[id] = openCall{path: path, left: l.MaxBytes}
				break
			}
		}
	case *http2.DataFrame:
		c, ok := g.open[id]
		if !ok {
			return nil
		}
		c.left -= int(f.Header().Length)
		if c.left < 0 {
			if g.stats != nil {
				g.stats.TooLarge.Add(1)
				g.stats.Metrics.Refused(monitoring.RefusedRequestTooLarge)
			}
			return fmt.Errorf("gate: %s: %w", c.path, ErrRequestTooLarge)
		}
		if f.StreamEnded() {
			delete(g.open, id)
		} else {
			g.open[id] = c
		}
	case *http2.RSTStreamFrame:
		delete(g.open, id)
	}
	return nil
}

// Write scans the frame headers gRPC writes: a call the server ends (its
// trailers, or a reset) is no longer limited; what its client still sends
// gRPC discards.
func (g *guardConn) Write(p []byte) (int, error) {
	for b := p; len(b) > 0; {
		if g.wskip > 0 {
			k := min(g.wskip, len(b))
			g.wskip, b = g.wskip-k, b[k:]
			continue
		}
		k := copy(g.whdr[g.wn:], b)
		g.wn, b = g.wn+k, b[k:]
		if g.wn < len(g.whdr) {
			break
		}
		g.wn = 0
		h := g.whdr
		g.wskip = int(h[0])<<16 | int(h[1])<<8 | int(h[2])
		typ, flags, id := http2.FrameType(h[3]), http2.Flags(h[4]), binary.BigEndian.Uint32(h[5:])&(1<<31-1)
		if typ == http2.FrameRSTStream || (typ == http2.FrameHeaders || typ == http2.FrameData) && flags.Has(http2.FlagDataEndStream) {
			g.mu.Lock()
			delete(g.open, id)
			g.mu.Unlock()
		}
	}
	return g.Conn.Write(p)
}
