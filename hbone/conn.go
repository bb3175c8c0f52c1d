package hbone

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// conn is one HBONE connection (client or server side): HTTP/2 over a TLS
// connection, carrying CONNECT streams only. Frames are parsed and written by
// http2.Framer; streams, flow control and settings are handled here.
//
// Goroutines: one read loop per conn; stream users (Read, Write, Close) write
// their own frames under wmu. The read loop never waits for wmu: a writer
// blocked in write(2) by a peer that does not read holds it, and the read
// loop must go on reading (the peer's frames reach their streams, its PINGs
// and SETTINGS are answered once the write goes through). It queues the
// control frames it answers with (SETTINGS and PING acks, RST_STREAM,
// refusals, WINDOW_UPDATE) in ctl: whoever holds wmu writes them before
// releasing it, and a short-lived flusher goroutine takes wmu to write them
// when nobody does.
type conn struct {
	nc     net.Conn // the TLS connection
	raw    net.Conn // the TCP connection under nc: closing it never blocks
	server bool
	peer   spiffeid.ID // the peer's verified identity
	local  spiffeid.ID // the identity we presented
	log    *slog.Logger
	// onClose runs once, after the conn is closed and no longer usable (the
	// pool forgets it; the server untracks it). It must not block.
	onClose func(*conn)
	// onStream runs on the read loop for each new stream (server side). It
	// must not block.
	onStream    func(*stream, *http2.MetaHeadersFrame)
	idleTimeout time.Duration
	keepAlive   time.Duration // PING after this long without a frame; 0: never
	frames      atomic.Uint64 // frames read: the keep-alive's sign of life
	maxStreams  int           // our own cap on concurrent streams (server: advertised; client: pool limit)
	maxHeader   int           // our cap on a received header list, in bytes

	fr *http2.Framer // reading: the read loop only; writing: under wmu

	// out is the TCP connection under nc; it gathers the TLS records of
	// one batch of writes (see lockWrite) into one write(2).
	out *batchConn
	// writers counts goroutines waiting for wmu: the last one flushes.
	writers atomic.Int32
	// wg tracks the read loop and the control-frame flushers (set by start).
	wg *sync.WaitGroup

	// ctlMu guards ctl, ctlSpare and ctlFlusher; ctlLen is len(ctl), read
	// without ctlMu by unlockWrite. Never held while writing.
	ctlMu      sync.Mutex
	ctl        []ctlFrame // queued by the read loop, written under wmu
	ctlSpare   []ctlFrame // the other buffer of ctl
	ctlFlusher bool       // a flusher goroutine runs: set while ctl is not empty
	ctlLen     atomic.Int32

	// wmu guards the writing side of fr, henc and hbuf, and (client side)
	// the order of stream IDs on the wire. Take it with lockWrite and
	// release it with unlockWrite.
	wmu     sync.Mutex
	henc    *hpack.Encoder
	hbuf    bytes.Buffer
	dataHdr [9]byte // a DATA frame's header (writeDataDirectLocked)

	// mu guards the fields below and the mu-guarded fields of every stream.
	mu             sync.Mutex
	connBlocked    []*stream // streams whose writer waits for the connection's send window only
	streams        map[uint32]*stream
	nextID         uint32 // client: next stream ID to open
	lastPeerID     uint32 // server: highest stream ID the client opened
	reserved       int    // client: streams reserved by Dial but not open yet
	handlers       int    // server: handlers running (a reset stream's may outlive it)
	sendWindow     int64  // connection-level send window
	inflow         int64  // connection-level bytes the peer may still send
	unackedConn    int64  // bytes consumed and not yet returned with WINDOW_UPDATE
	peerInitWindow int64  // peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerMaxFrame   int    // peer's SETTINGS_MAX_FRAME_SIZE
	peerMaxStreams int    // peer's SETTINGS_MAX_CONCURRENT_STREAMS
	peerMaxHeader  int    // peer's SETTINGS_MAX_HEADER_LIST_SIZE
	goingAway      bool   // GOAWAY sent or received: no new streams
	err            error  // set once when the conn dies
	idleTimer      *time.Timer
	pingTimer      *time.Timer
	pingFrames     uint64 // frames at the last keep-alive check
	pinged         bool   // a keep-alive PING is unanswered
	closeOnce      sync.Once
	done           chan struct{} // closed when the read loop has exited
}

// errConnClosed is the stream error after the local side closed the conn.
var errConnClosed = errors.New("hbone: connection closed")

// errPeerClosed is the stream error when the peer closed the connection
// before the stream ended.
var errPeerClosed = errors.New("hbone: connection closed by peer")

// errRefusedStream fails streams the peer did not process (REFUSED_STREAM,
// or above a GOAWAY's last stream ID): Dial retries them.
var errRefusedStream = errors.New("hbone: stream refused")

// errStreamClosed is returned by operations on a closed stream; it is
// net.ErrClosed, as for any net.Conn.
var errStreamClosed = fmt.Errorf("hbone: stream closed: %w", net.ErrClosed)

// errWriteClosed is returned by Write after CloseWrite.
var errWriteClosed = errors.New("hbone: write after CloseWrite")

// newConn makes a conn on nc, a TLS connection over out.
func newConn(nc net.Conn, out *batchConn, server bool, log *slog.Logger) *conn {
	c := &conn{
		nc:             nc,
		raw:            out.Conn,
		out:            out,
		server:         server,
		log:            log,
		streams:        make(map[uint32]*stream),
		nextID:         1,
		sendWindow:     65535,
		inflow:         65535,
		peerInitWindow: 65535,
		peerMaxFrame:   16384,
		peerMaxStreams: math.MaxInt32,
		peerMaxHeader:  math.MaxInt32,
		done:           make(chan struct{}),
	}
	c.fr = http2.NewFramer(nc, nc)
	c.fr.SetMaxReadFrameSize(maxFrameSize)
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// setHeaderLimit makes the framer decode header blocks. Lists over max
// bytes (RFC 9113 size: names, values and 32 per field) are answered 431
// (server) or fail the stream (client). The framer itself stops decoding at
// 4*max, and a single field over 4*max is a connection error.
func (c *conn) setHeaderLimit(max int) {
	c.maxHeader = max
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = uint32(min(4*max, math.MaxInt32))
}

// headerListSize is the RFC 9113 size of a header list.
func headerListSize(fields []hpack.HeaderField) int {
	n := 0
	for _, f := range fields {
		n += int(f.Size())
	}
	return n
}

// writePreface writes the client preface (client side), our SETTINGS and
// the connection window update.
func (c *conn) writePreface(settings []http2.Setting) error {
	c.lockWrite()
	err := c.writePrefaceLocked(settings)
	if ferr := c.unlockWrite(); err == nil && ferr != nil {
		err = fmt.Errorf("write preface: %w", ferr)
	}
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.inflow = connWindow
	c.mu.Unlock()
	return nil
}

func (c *conn) writePrefaceLocked(settings []http2.Setting) error {
	if !c.server {
		if _, err := io.WriteString(c.nc, http2.ClientPreface); err != nil {
			return fmt.Errorf("write preface: %w", err)
		}
	}
	if err := c.fr.WriteSettings(settings...); err != nil {
		return fmt.Errorf("write settings: %w", err)
	}
	if err := c.fr.WriteWindowUpdate(0, connWindow-65535); err != nil {
		return fmt.Errorf("write window update: %w", err)
	}
	return nil
}

// lockWrite takes wmu and opens a batch: the frames written until
// unlockWrite go out with one write(2).
func (c *conn) lockWrite() {
	c.writers.Add(1)
	c.wmu.Lock()
	c.writers.Add(-1)
	c.out.hold()
}

// unlockWrite writes the queued control frames, sends the batch, unless
// another writer is waiting for wmu (it will send its frames and these
// together), and releases wmu. The error is the socket's.
func (c *conn) unlockWrite() error {
	var err error
	if c.ctlLen.Load() > 0 {
		err = c.writeCtlLocked()
	}
	if c.writers.Load() == 0 {
		if ferr := c.out.flush(); err == nil {
			err = ferr
		}
	}
	c.wmu.Unlock()
	return err
}

// ctlFrame is a control frame the read loop queued (see conn).
type ctlFrame struct {
	kind ctlKind
	id   uint32
	val  uint32 // RST_STREAM: the error code; WINDOW_UPDATE: the increment; table size
	data [8]byte
}

type ctlKind uint8

const (
	ctlRST          ctlKind = iota // RST_STREAM id val
	ctlWindowUpdate                // WINDOW_UPDATE id val
	ctlPingAck                     // PING ack with data
	ctlSettingsAck                 // SETTINGS ack
	ctlTableSize                   // not a frame: the encoder's dynamic table limit, applied before the ack that follows
)

// maxQueuedCtl bounds the control frames queued while wmu is held: a peer
// that makes us answer more without reading is flooding us (x/net's
// server has the same bound).
const maxQueuedCtl = 10000

// queueCtl queues f for the holder of wmu or a flusher goroutine to write.
// It never blocks on writes. The error (a flood) is the connection's.
func (c *conn) queueCtl(f ctlFrame) error {
	c.ctlMu.Lock()
	if len(c.ctl) >= maxQueuedCtl {
		c.ctlMu.Unlock()
		return http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)
	}
	c.ctl = append(c.ctl, f)
	c.ctlLen.Store(int32(len(c.ctl)))
	start := !c.ctlFlusher
	c.ctlFlusher = true
	c.ctlMu.Unlock()
	if start {
		c.wg.Add(1) // the read loop's own count is held: Close waits for this too
		go c.flushCtl()
	}
	return nil
}

// flushCtl takes wmu to write the queued control frames, until the queue
// is found empty.
func (c *conn) flushCtl() {
	defer c.wg.Done()
	for {
		c.lockWrite()
		if err := c.unlockWrite(); err != nil {
			c.close(fmt.Errorf("hbone: write: %w", err))
		}
		c.ctlMu.Lock()
		if len(c.ctl) == 0 {
			c.ctlFlusher = false
			c.ctlMu.Unlock()
			return
		}
		c.ctlMu.Unlock()
	}
}

// writeCtlLocked writes the queued control frames into the batch; after an
// error the rest are dropped (the conn is dead). c.wmu must be held.
func (c *conn) writeCtlLocked() error {
	c.ctlMu.Lock()
	q := c.ctl
	c.ctl, c.ctlSpare = c.ctlSpare, nil
	c.ctlLen.Store(0)
	c.ctlMu.Unlock()
	var err error
	for _, f := range q {
		if err != nil {
			break
		}
		switch f.kind {
		case ctlRST:
			err = c.fr.WriteRSTStream(f.id, http2.ErrCode(f.val))
		case ctlWindowUpdate:
			err = c.fr.WriteWindowUpdate(f.id, f.val)
		case ctlPingAck:
			err = c.fr.WritePing(true, f.data)
		case ctlSettingsAck:
			err = c.fr.WriteSettingsAck()
		case ctlTableSize:
			c.henc.SetMaxDynamicTableSizeLimit(f.val)
		}
	}
	c.ctlMu.Lock()
	if c.ctlSpare == nil {
		c.ctlSpare = q[:0]
	}
	c.ctlMu.Unlock()
	return err
}

// queueRST queues RST_STREAM (read loop).
func (c *conn) queueRST(id uint32, code http2.ErrCode) error {
	return c.queueCtl(ctlFrame{kind: ctlRST, id: id, val: uint32(code)})
}

// queueConnUpdate queues a connection WINDOW_UPDATE of inc, if inc > 0
// (read loop).
func (c *conn) queueConnUpdate(inc uint32) error {
	if inc == 0 {
		return nil
	}
	return c.queueCtl(ctlFrame{kind: ctlWindowUpdate, val: inc})
}

// start runs the read loop (wg tracks it) and arms the idle timer.
func (c *conn) start(wg *sync.WaitGroup) {
	c.mu.Lock()
	if c.idleTimeout > 0 {
		c.idleTimer = time.AfterFunc(c.idleTimeout, c.onIdle)
	}
	if c.keepAlive > 0 {
		c.pingTimer = time.AfterFunc(c.keepAlive, c.onKeepAlive)
	}
	c.mu.Unlock()
	c.wg = wg
	wg.Add(1)
	go func() {
		defer wg.Done()
		c.readLoop()
	}()
}

func (c *conn) onIdle() {
	c.mu.Lock()
	idle := c.err == nil && c.activeLocked() == 0
	if idle {
		c.goingAway = true // no reservations from now on
	}
	c.mu.Unlock()
	if idle {
		c.log.Debug("hbone: closing idle connection", "peer", c.peer, "remote", c.nc.RemoteAddr())
		c.goAwayAndClose(http2.ErrCodeNo, errConnClosed)
	}
}

// onKeepAlive runs every keepAlive: if no frame arrived since the last
// run it sends a PING, and if none arrived after the PING either, the peer
// is gone: close.
func (c *conn) onKeepAlive() {
	n := c.frames.Load()
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	alive := n != c.pingFrames
	c.pingFrames = n
	dead := !alive && c.pinged
	ping := !alive && !c.pinged
	c.pinged = ping
	if !dead {
		c.pingTimer.Reset(c.keepAlive)
	}
	c.mu.Unlock()
	switch {
	case dead:
		c.log.Debug("hbone: peer does not answer pings", "peer", c.peer, "remote", c.nc.RemoteAddr())
		c.close(errors.New("hbone: keep-alive timeout"))
	case ping:
		c.writeFrame(func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{'h', 'b', 'o', 'n', 'e'}) })
	}
}

// activeLocked reports streams open or reserved. c.mu must be held.
func (c *conn) activeLocked() int { return len(c.streams) + c.reserved }

// busyLocked stops the idle timer. c.mu must be held.
func (c *conn) busyLocked() {
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
}

// maybeIdleLocked re-arms the idle timer, or closes a conn that is going
// away, once nothing is active. c.mu must be held.
func (c *conn) maybeIdleLocked() {
	if c.activeLocked() != 0 || c.err != nil {
		return
	}
	if c.goingAway {
		c.raw.Close() // the read loop fails and closes the conn
		return
	}
	if c.idleTimer != nil {
		c.idleTimer.Reset(c.idleTimeout)
	}
}

// close closes the conn with err (once) and fails its streams.
func (c *conn) close(err error) {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.err = err
		if c.idleTimer != nil {
			c.idleTimer.Stop()
		}
		if c.pingTimer != nil {
			c.pingTimer.Stop()
		}
		for _, s := range c.streams {
			s.failLocked(err)
		}
		c.wakeConnBlockedLocked()
		c.mu.Unlock()
		// Not nc.Close: its close_notify could wait behind a blocked Write.
		c.raw.Close()
		if c.onClose != nil {
			c.onClose(c)
		}
	})
}

// goAwayAndClose sends GOAWAY (best effort, bounded) and closes.
func (c *conn) goAwayAndClose(code http2.ErrCode, err error) {
	c.sendGoAway(code)
	c.close(err)
}

// sendGoAway writes GOAWAY with code (best effort, bounded) unless the
// conn is dead.
func (c *conn) sendGoAway(code http2.ErrCode) {
	c.mu.Lock()
	dead := c.err != nil
	last := c.lastPeerID
	c.mu.Unlock()
	if !dead {
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.lockWrite()
		c.fr.WriteGoAway(last, code, nil)
		c.unlockWrite()
	}
}

// protocolErrorLinger bounds how long a conn that broke the protocol is
// read (and discarded) after its GOAWAY before it is closed.
const protocolErrorLinger = 250 * time.Millisecond

// shutdown sends GOAWAY: no new streams; the conn closes when its streams
// are done.
func (c *conn) shutdown() {
	c.mu.Lock()
	if c.goingAway || c.err != nil {
		c.mu.Unlock()
		return
	}
	c.goingAway = true
	last := c.lastPeerID
	c.mu.Unlock()
	c.lockWrite()
	err := c.fr.WriteGoAway(last, http2.ErrCodeNo, nil)
	if ferr := c.unlockWrite(); err == nil {
		err = ferr
	}
	if err != nil {
		c.close(err)
		return
	}
	c.mu.Lock()
	c.maybeIdleLocked()
	c.mu.Unlock()
}

// writeFrame runs f under wmu; a write error kills the conn.
func (c *conn) writeFrame(f func(*http2.Framer) error) error {
	c.lockWrite()
	err := f(c.fr)
	if ferr := c.unlockWrite(); err == nil {
		err = ferr
	}
	if err != nil {
		c.close(fmt.Errorf("hbone: write: %w", err))
	}
	return err
}

// writeData writes one DATA frame.
func (c *conn) writeData(id uint32, end bool, p []byte) error {
	c.lockWrite()
	var err error
	if len(p) >= directWriteMin {
		err = c.writeDataDirectLocked(id, end, p)
	} else {
		err = c.fr.WriteData(id, end, p)
	}
	if ferr := c.unlockWrite(); err == nil {
		err = ferr
	}
	if err != nil {
		c.close(fmt.Errorf("hbone: write: %w", err))
	}
	return err
}

// directWriteMin is the smallest DATA payload writeDataDirectLocked sends:
// below it, copying the payload into the framer's buffer costs less than
// the TLS record of its own the frame header then takes.
const directWriteMin = 16 << 10

// writeDataDirectLocked writes a DATA frame's header and its payload with
// two writes to the TLS connection, so that the payload is sealed from the
// caller's buffer instead of being copied into the framer's first (the
// header goes in a small record of its own). c.wmu must be held.
func (c *conn) writeDataDirectLocked(id uint32, end bool, p []byte) error {
	var flags http2.Flags
	if end {
		flags = http2.FlagDataEndStream
	}
	n := len(p)
	c.dataHdr = [9]byte{byte(n >> 16), byte(n >> 8), byte(n), byte(http2.FrameData), byte(flags),
		byte(id >> 24 & 0x7f), byte(id >> 16), byte(id >> 8), byte(id)}
	if _, err := c.nc.Write(c.dataHdr[:]); err != nil {
		return err
	}
	_, err := c.nc.Write(p)
	return err
}

func (c *conn) writeRST(id uint32, code http2.ErrCode) {
	c.writeFrame(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, code) })
}

// writeHeaders encodes fields and writes them as one header block.
// c.wmu must be held.
func (c *conn) writeHeadersLocked(id uint32, endStream bool, fields []hpack.HeaderField) error {
	c.hbuf.Reset()
	for _, f := range fields {
		c.henc.WriteField(f)
	}
	block := c.hbuf.Bytes()
	c.mu.Lock()
	max := c.peerMaxFrame
	c.mu.Unlock()
	first := true
	for first || len(block) > 0 {
		chunk := block
		if len(chunk) > max {
			chunk = chunk[:max]
		}
		block = block[len(chunk):]
		var err error
		if first {
			err = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: chunk, EndStream: endStream, EndHeaders: len(block) == 0})
			first = false
		} else {
			err = c.fr.WriteContinuation(id, len(block) == 0, chunk)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// readLoop reads frames until the conn dies.
func (c *conn) readLoop() {
	defer close(c.done)
	err := c.readFrames()
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		c.log.Debug("hbone: protocol error", "remote", c.nc.RemoteAddr(), "err", err)
		c.sendGoAway(http2.ErrCode(ce))
		// Closing with the peer's frames unread in the kernel would send an
		// RST, which can destroy the GOAWAY before the peer reads it: read
		// what is left (bounded) first. Only this goroutine reads c.raw.
		c.raw.SetReadDeadline(time.Now().Add(protocolErrorLinger))
		io.Copy(io.Discard, c.raw)
		c.close(err)
		return
	}
	if errors.Is(err, io.EOF) {
		err = errPeerClosed
	}
	c.close(err)
}

func (c *conn) readFrames() error {
	// A server's handshake deadline lasts until the first request's headers
	// (a client that connects and then dribbles is cut off); a client has
	// none.
	deadline := c.server
	for first := true; ; first = false {
		f, err := c.readFrame(first)
		c.frames.Add(1)
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				if err := c.resetStream(se.StreamID, se.Code, se); err != nil {
					return err
				}
				continue
			}
			return err
		}
		if f == nil {
			continue // DATA read straight into its stream
		}
		if first {
			sf, ok := f.(*http2.SettingsFrame)
			if !ok || sf.IsAck() {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
		}
		if _, ok := f.(*http2.MetaHeadersFrame); ok && deadline {
			c.nc.SetReadDeadline(time.Time{})
			deadline = false
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			err = c.onHeaders(f)
		case *http2.DataFrame:
			err = c.onData(f)
		case *http2.WindowUpdateFrame:
			err = c.onWindowUpdate(f)
		case *http2.RSTStreamFrame:
			c.mu.Lock()
			idle := c.isIdleIDLocked(f.StreamID)
			c.mu.Unlock()
			if idle { // RFC 9113 5.1, 6.4
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			var rerr error = http2.StreamError{StreamID: f.StreamID, Code: f.ErrCode}
			if f.ErrCode == http2.ErrCodeRefusedStream {
				rerr = errRefusedStream
			}
			err = c.resetStream(f.StreamID, 0, rerr)
		case *http2.SettingsFrame:
			err = c.onSettings(f)
		case *http2.PingFrame:
			if !f.IsAck() {
				err = c.queueCtl(ctlFrame{kind: ctlPingAck, data: f.Data})
			}
		case *http2.GoAwayFrame:
			c.mu.Lock()
			c.goingAway = true
			for id, s := range c.streams {
				// Streams we opened above the last one the peer processed
				// can be retried elsewhere.
				if !c.server && id > f.LastStreamID {
					s.failLocked(errRefusedStream)
					c.removeLocked(s)
				}
			}
			c.maybeIdleLocked()
			c.mu.Unlock()
		case *http2.PriorityFrame:
			if f.StreamDep == f.StreamID { // RFC 9113 5.3.1
				err = http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol}
			}
		case *http2.PushPromiseFrame:
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				if err := c.resetStream(se.StreamID, se.Code, se); err != nil {
					return err
				}
				continue
			}
			return err
		}
	}
}

// readFrame reads the next frame, or reads a large DATA frame's payload
// straight into its stream's buffer and returns nil.
func (c *conn) readFrame(first bool) (http2.Frame, error) {
	fh, err := c.fr.ReadFrameHeader()
	if err != nil {
		return nil, err
	}
	if !first && fh.Type == http2.FrameData {
		if ok, err := c.readDataDirect(fh); ok || err != nil {
			return nil, err
		}
	}
	return c.fr.ReadFrameForHeader(fh)
}

// directDataMin is the smallest DATA payload readDataDirect reads into
// chunks of its own: each chunk of a stream's buffer then holds at least
// half a chunk, whatever the frame sizes.
const directDataMin = recvChunkSize / 2

// readDataDirect reads the payload of a DATA frame that onData would accept
// straight into its stream's buffer, in pooled chunks, saving the copy
// through the framer's buffer. It returns false, having read nothing, for
// the frames it leaves to ReadFrameForHeader and onData: small or padded
// ones, and any that onData would refuse.
func (c *conn) readDataDirect(fh http2.FrameHeader) (bool, error) {
	if fh.Length < directDataMin || fh.Flags.Has(http2.FlagDataPadded) || fh.StreamID == 0 {
		return false, nil
	}
	n := int(fh.Length)
	c.mu.Lock()
	s := c.streams[fh.StreamID]
	if int64(n) > c.inflow || s == nil || s.rclosed || (!c.server && !s.answered) || int64(n) > s.inflow {
		c.mu.Unlock()
		return false, nil
	}
	c.inflow -= int64(n)
	s.inflow -= int64(n)
	c.mu.Unlock()
	// Only this loop adds to s.recv, so the payload is read outside mu and
	// added piece by piece; a piece too small for a chunk of its own is
	// copied into the buffer's last chunk.
	for n > 0 {
		chunk := recvChunks.Get().(*[]byte)
		k := min(n, recvChunkSize)
		*chunk = (*chunk)[:k]
		if _, err := io.ReadFull(c.nc, *chunk); err != nil {
			*chunk = (*chunk)[:0]
			recvChunks.Put(chunk)
			return true, err
		}
		n -= k
		c.mu.Lock()
		// Large frames go through the stream's buffer even to a DeliverTo:
		// its goroutine, woken once per frame of 32 KiB or more, writes
		// what has gathered with one writev(2), fewer system calls than
		// the read loop writing frame by frame.
		var connInc uint32
		switch {
		case c.streams[fh.StreamID] != s: // closed or reset meanwhile: drop
			c.creditConnLocked(int64(k))
			connInc = c.takeConnUpdateLocked()
			*chunk = (*chunk)[:0]
			recvChunks.Put(chunk)
		case k >= directDataMin:
			s.recv.appendChunk(chunk)
		default:
			s.recv.Write(*chunk)
			*chunk = (*chunk)[:0]
			recvChunks.Put(chunk)
		}
		if s.sink != nil {
			s.sink.direct = false // what follows queues behind this
		}
		var eof func()
		if n == 0 && fh.Flags.Has(http2.FlagDataEndStream) && c.streams[fh.StreamID] == s {
			s.rclosed = true
			c.maybeDoneLocked(s)
			eof = s.takeEOFLocked()
		}
		s.wakeLocked()
		c.mu.Unlock()
		if eof != nil {
			eof()
		}
		if err := c.queueConnUpdate(connInc); err != nil {
			return true, err
		}
	}
	return true, nil
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	c.mu.Lock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - c.peerInitWindow
			c.peerInitWindow = int64(s.Val)
			for _, st := range c.streams {
				st.sendWindow += delta
				if st.sendWindow > math.MaxInt32 {
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
				st.wcond.Broadcast()
			}
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = int(s.Val)
		case http2.SettingMaxHeaderListSize:
			c.peerMaxHeader = int(min(s.Val, math.MaxInt32))
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = int(min(s.Val, math.MaxInt32))
		case http2.SettingHeaderTableSize:
			// Applied by the writer of the ack, before the ack.
			return c.queueCtl(ctlFrame{kind: ctlTableSize, val: min(s.Val, 4096)})
		}
		return nil
	})
	c.mu.Unlock()
	if err != nil {
		return err
	}
	return c.queueCtl(ctlFrame{kind: ctlSettingsAck})
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	overflow := false
	if f.StreamID == 0 {
		c.sendWindow += int64(f.Increment)
		if c.sendWindow > math.MaxInt32 {
			c.mu.Unlock()
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		c.wakeConnBlockedLocked()
	} else if c.isIdleIDLocked(f.StreamID) { // RFC 9113 5.1, 6.9
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol)
	} else if s := c.streams[f.StreamID]; s != nil {
		s.sendWindow += int64(f.Increment)
		if overflow = s.sendWindow > math.MaxInt32; overflow {
			s.failLocked(http2.StreamError{StreamID: s.id, Code: http2.ErrCodeFlowControl})
			c.removeLocked(s)
		}
		s.wcond.Broadcast() // only its own writer
	}
	c.mu.Unlock()
	if overflow {
		return c.queueRST(f.StreamID, http2.ErrCodeFlowControl)
	}
	return nil
}

func (c *conn) onData(f *http2.DataFrame) error {
	n := int64(f.Header().Length)
	data := f.Data()
	c.mu.Lock()
	if n > c.inflow {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	c.inflow -= n
	s := c.streams[f.StreamID]
	if s == nil || s.rclosed || (!c.server && !s.answered) || n > s.inflow {
		// Not a stream we read: give the window back and refuse it.
		c.creditConnLocked(n)
		idle := c.isIdleIDLocked(f.StreamID)
		code := http2.ErrCodeStreamClosed
		if s != nil && n > s.inflow {
			code = http2.ErrCodeFlowControl
		}
		if s != nil && !c.server && !s.answered {
			code = http2.ErrCodeProtocol
		}
		if s != nil {
			s.failLocked(http2.StreamError{StreamID: s.id, Code: code})
			c.removeLocked(s)
		}
		upd := c.takeConnUpdateLocked()
		c.mu.Unlock()
		if idle {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if err := c.queueRST(f.StreamID, code); err != nil {
			return err
		}
		return c.queueConnUpdate(upd)
	}
	s.inflow -= n
	if pad := n - int64(len(data)); pad > 0 { // padding is consumed at once
		c.creditConnLocked(pad)
		s.unacked += pad
	}
	// Straight into a DeliverTo's socket, if it takes it.
	data, inc, connInc, ok := c.deliverLocked(s, data)
	if !ok { // closed or reset meanwhile: drop
		c.creditConnLocked(int64(len(data)))
		connInc += c.takeConnUpdateLocked()
		c.mu.Unlock()
		return c.queueConnUpdate(connInc)
	}
	if len(data) > 0 {
		s.recv.Write(data)
	}
	var eof func()
	if f.StreamEnded() {
		s.rclosed = true
		c.maybeDoneLocked(s)
		eof = s.takeEOFLocked()
	}
	if len(data) > 0 || f.StreamEnded() || s.sink != nil && s.sink.err != nil {
		s.wakeLocked()
	}
	c.mu.Unlock()
	if eof != nil {
		eof()
	}
	return c.queueWindowUpdates(s.id, inc, connInc)
}

// wakeConnBlockedLocked wakes the writers waiting for the connection's
// send window (and only them). c.mu must be held.
func (c *conn) wakeConnBlockedLocked() {
	for i, s := range c.connBlocked {
		s.connBlocked = false
		s.wcond.Broadcast()
		c.connBlocked[i] = nil
	}
	c.connBlocked = c.connBlocked[:0]
}

// isIdleIDLocked reports whether stream id was never opened: above the
// last one the client opened, or one the server would have opened (there
// are no pushes). Frames other than HEADERS and PRIORITY on it are a
// connection error (RFC 9113 5.1). c.mu must be held.
func (c *conn) isIdleIDLocked(id uint32) bool {
	if id == 0 {
		return false
	}
	if c.server {
		return id%2 == 0 || id > c.lastPeerID
	}
	return id%2 == 0 || id >= c.nextID
}

func (c *conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if f.HasPriority() && f.Priority.StreamDep == id { // RFC 9113 5.3.1
		if c.server {
			c.mu.Lock()
			c.lastPeerID = max(c.lastPeerID, id)
			c.mu.Unlock()
		}
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	}
	c.mu.Lock()
	s := c.streams[id]
	if s != nil {
		defer c.mu.Unlock()
		switch {
		case s.rclosed:
			// The peer ended its side: nothing may follow (RFC 9113 5.1,
			// half-closed (remote)).
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
		case c.server || s.answered && s.status/100 == 2:
			// Trailers on a CONNECT request or on an established tunnel:
			// only DATA and stream management may follow the headers
			// (RFC 9113 8.5), so it is reset, not taken for a FIN.
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
		case s.answered:
			// Trailers of a refusal: they must end the stream.
			if !f.StreamEnded() {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			s.rclosed = true
			c.maybeDoneLocked(s)
			s.wakeLocked()
			return nil
		}
		status, err := strconv.Atoi(f.PseudoValue("status"))
		if err != nil || status < 100 || status > 999 {
			s.failLocked(http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol})
			c.removeLocked(s)
			return c.queueRST(id, http2.ErrCodeProtocol)
		}
		if status < 200 && !f.StreamEnded() {
			return nil // interim response
		}
		s.status = status
		s.answered = true
		if f.StreamEnded() {
			s.rclosed = true
			c.maybeDoneLocked(s)
		}
		s.closeRespLocked()
		return nil
	}
	if !c.server || id%2 == 0 || id <= c.lastPeerID {
		late := !c.server && !c.isIdleIDLocked(id) // headers for a stream we closed
		closed := c.server && id%2 == 1 && id <= c.lastPeerID
		c.mu.Unlock()
		switch {
		case late:
			return nil
		case closed: // RFC 9113 5.1: a closed stream
			return http2.ConnectionError(http2.ErrCodeStreamClosed)
		}
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.lastPeerID = id
	// Handlers of reset streams may still run: bound them too, so that a
	// client opening and resetting streams quickly cannot pile them up.
	if c.goingAway || c.err != nil || len(c.streams) >= c.maxStreams || c.handlers >= 2*c.maxStreams {
		c.mu.Unlock()
		return c.queueRST(id, http2.ErrCodeRefusedStream)
	}
	s = c.newStreamLocked(id)
	s.rclosed = f.StreamEnded()
	c.mu.Unlock()
	c.onStream(s, f)
	return nil
}

// newStreamLocked registers a stream. c.mu must be held.
func (c *conn) newStreamLocked(id uint32) *stream {
	s := &stream{c: c, id: id, sendWindow: c.peerInitWindow, inflow: streamWindow}
	s.rcond.L = &c.mu
	s.wcond.L = &c.mu
	c.streams[id] = s
	c.busyLocked()
	return s
}

// removeLocked forgets s (it no longer counts against the stream limit).
// c.mu must be held.
func (c *conn) removeLocked(s *stream) {
	if c.streams[s.id] != s {
		return
	}
	delete(c.streams, s.id)
	c.maybeIdleLocked()
}

// maybeDoneLocked removes s once both directions have ended. c.mu must be
// held.
func (c *conn) maybeDoneLocked(s *stream) {
	if s.rclosed && s.wclosed {
		c.removeLocked(s)
	}
}

// resetStream handles RST_STREAM from the peer (code 0: sendCode unused) or
// a stream error found while reading (sendCode: the RST to queue). The
// error is the connection's.
func (c *conn) resetStream(id uint32, sendCode http2.ErrCode, err error) error {
	c.mu.Lock()
	s := c.streams[id]
	if s != nil {
		s.failLocked(err)
		c.removeLocked(s)
	}
	c.mu.Unlock()
	if sendCode != 0 {
		return c.queueRST(id, sendCode)
	}
	return nil
}

// creditConnLocked returns n consumed bytes to the connection window
// (sent later by takeConnUpdateLocked). c.mu must be held.
func (c *conn) creditConnLocked(n int64) { c.unackedConn += n }

// takeConnUpdateLocked returns the connection window increment to send now,
// if enough has been consumed. c.mu must be held.
func (c *conn) takeConnUpdateLocked() uint32 {
	if c.unackedConn < connWindow/4 || c.err != nil {
		return 0
	}
	n := c.unackedConn
	c.unackedConn = 0
	c.inflow += n
	return uint32(n)
}

// sendWindowUpdates writes WINDOW_UPDATE frames for the stream (if inc > 0)
// and the connection (if connInc > 0).
func (c *conn) sendWindowUpdates(id, inc, connInc uint32) {
	if inc == 0 && connInc == 0 {
		return
	}
	c.writeFrame(func(fr *http2.Framer) error {
		if inc > 0 {
			if err := fr.WriteWindowUpdate(id, inc); err != nil {
				return err
			}
		}
		if connInc > 0 {
			return fr.WriteWindowUpdate(0, connInc)
		}
		return nil
	})
}

// openStream opens a client stream: a CONNECT with fields. The caller has
// reserved a slot (c.reserved).
func (c *conn) openStream(fields []hpack.HeaderField) (*stream, error) {
	c.lockWrite()
	c.mu.Lock()
	c.reserved--
	if size := headerListSize(fields); size > c.peerMaxHeader {
		c.maybeIdleLocked()
		c.mu.Unlock()
		c.unlockWrite()
		return nil, fmt.Errorf("%w: %d bytes, the server accepts %d", ErrHeadersTooLarge, size, c.peerMaxHeader)
	}
	if c.err != nil || c.goingAway || c.nextID > math.MaxInt32 {
		err := c.err
		if err == nil {
			err = errors.New("hbone: connection going away")
		}
		c.goingAway = true
		c.maybeIdleLocked()
		c.mu.Unlock()
		c.unlockWrite()
		return nil, err
	}
	id := c.nextID
	c.nextID += 2
	s := c.newStreamLocked(id)
	s.resp = make(chan struct{})
	c.mu.Unlock()
	err := c.writeHeadersLocked(id, false, fields)
	if ferr := c.unlockWrite(); err == nil {
		err = ferr
	}
	if err != nil {
		err = fmt.Errorf("hbone: write headers: %w", err)
		c.close(err)
		return nil, err
	}
	return s, nil
}
