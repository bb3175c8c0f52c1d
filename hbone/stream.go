package hbone

import (
	"context"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
)

// Stream is one tunnelled connection: an HTTP/2 CONNECT stream used as a
// net.Conn. CloseWrite half-closes it (END_STREAM); the peer then reads
// io.EOF. Close resets the stream unless both directions already ended.
// Read and Write may be called concurrently with each other.
type Stream struct {
	s *stream

	// Set instead of s for another transport's stream (WrapStream).
	ext       Tunnel
	transport string
}

// stream is the state of one HTTP/2 stream, shared by the conn's read loop
// and the Stream's user.
type stream struct {
	c      *conn
	id     uint32
	resp   chan struct{}      // client: closed when the response arrives or the stream fails
	cancel context.CancelFunc // server: cancels the handler's context; may be nil

	// Guarded by c.mu:
	status     int     // client: the response status
	answered   bool    // the response was sent (server) or received (client)
	respClosed bool    // resp is closed
	sendWindow int64   // bytes we may send
	inflow     int64   // bytes the peer may send
	unacked    int64   // bytes consumed, not yet returned with WINDOW_UPDATE
	recv       recvBuf // received, unread
	rclosed    bool    // END_STREAM received
	wclosed    bool    // END_STREAM sent
	closed     bool    // Close called
	err        error
	rcond      sync.Cond // readers; on c.mu
	wcond      sync.Cond // writers waiting for send window; on c.mu
	// connBlocked: the writer waits for the connection's send window
	// (s is in c.connBlocked).
	connBlocked bool
	sink        *delivery // DeliverTo's destination while it runs
	rdl, wdl    deadline
	onEOF       func() // OnReadEOF's, until called
}

// OnReadEOF arranges for f to be called once, when the stream's reads are
// at their end: the peer ended its side (END_STREAM) and every byte before
// it was read, so that a Read would return io.EOF (at once if that is
// already so). A server that reads no further (net/http's background
// read) learns so that its client is gone. f runs, with no lock held, on
// the connection's read loop or in Read; it must not block. A stream that
// is reset or closed first never calls it, nor does another transport's
// stream (WrapStream).
func (st *Stream) OnReadEOF(f func()) {
	if st.ext != nil {
		return
	}
	s := st.s
	s.c.mu.Lock()
	s.onEOF = f
	f = s.takeEOFLocked()
	s.c.mu.Unlock()
	if f != nil {
		f()
	}
}

// takeEOFLocked returns OnReadEOF's function if its time came (nil
// otherwise), once. c.mu must be held.
func (s *stream) takeEOFLocked() func() {
	f := s.onEOF
	if f == nil || !s.rclosed || s.recv.Len() > 0 || s.err != nil {
		return nil
	}
	s.onEOF = nil
	return f
}

// failLocked ends the stream with err: pending and future writes fail;
// reads return buffered data, then io.EOF if the peer had ended its side,
// else err. c.mu must be held.
func (s *stream) failLocked(err error) {
	if s.err != nil {
		return
	}
	s.err = err
	s.closeRespLocked()
	s.wakeLocked()
	s.wcond.Broadcast()
	if s.cancel != nil {
		s.cancel()
	}
}

func (s *stream) closeRespLocked() {
	if s.resp != nil && !s.respClosed {
		s.respClosed = true
		close(s.resp)
	}
}

// Read reads tunnelled bytes; io.EOF once the peer half-closed.
func (st *Stream) Read(p []byte) (int, error) {
	if st.ext != nil {
		return st.ext.Read(p)
	}
	s := st.s
	c := s.c
	c.mu.Lock()
	for s.recv.Len() == 0 {
		switch {
		case s.rclosed:
			c.mu.Unlock()
			return 0, io.EOF
		case s.err != nil:
			err := s.err
			c.mu.Unlock()
			return 0, err
		case s.rdl.expired:
			c.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		case len(p) == 0:
			c.mu.Unlock()
			return 0, nil
		}
		s.rcond.Wait()
	}
	n := s.recv.Read(p)
	inc, connInc := c.consumedLocked(s, n)
	eof := s.takeEOFLocked()
	c.mu.Unlock()
	c.sendWindowUpdates(s.id, inc, connInc)
	if eof != nil {
		eof()
	}
	return n, nil
}

// consumedLocked returns n bytes of s that were read (or delivered) to
// the windows, and the stream and connection increments to send now.
// c.mu must be held.
func (c *conn) consumedLocked(s *stream, n int) (inc, connInc uint32) {
	c.creditConnLocked(int64(n))
	connInc = c.takeConnUpdateLocked()
	if !s.rclosed && s.err == nil {
		s.unacked += int64(n)
		if s.unacked >= streamWindow/4 {
			inc = uint32(s.unacked)
			s.inflow += s.unacked
			s.unacked = 0
		}
	}
	return inc, connInc
}

// Write sends p as DATA frames, waiting for flow-control window.
func (st *Stream) Write(p []byte) (int, error) {
	if st.ext != nil {
		return st.ext.Write(p)
	}
	s := st.s
	c := s.c
	total := 0
	for len(p) > 0 {
		c.mu.Lock()
		for {
			if s.err != nil {
				err := s.err
				c.mu.Unlock()
				return total, err
			}
			if s.wclosed {
				c.mu.Unlock()
				return total, errWriteClosed
			}
			if s.wdl.expired {
				c.mu.Unlock()
				return total, os.ErrDeadlineExceeded
			}
			if s.sendWindow > 0 && c.sendWindow > 0 {
				break
			}
			if s.sendWindow > 0 && !s.connBlocked {
				// Woken by the connection's WINDOW_UPDATE, not by every
				// stream's.
				s.connBlocked = true
				c.connBlocked = append(c.connBlocked, s)
			}
			s.wcond.Wait()
		}
		n := min(int64(len(p)), s.sendWindow, c.sendWindow, int64(c.peerMaxFrame))
		s.sendWindow -= n
		c.sendWindow -= n
		c.mu.Unlock()
		if err := c.writeData(s.id, false, p[:n]); err != nil {
			return total, err
		}
		total += int(n)
		p = p[n:]
	}
	return total, nil
}

// CloseWrite half-closes the stream: the peer reads io.EOF. Reading goes on.
func (st *Stream) CloseWrite() error {
	if st.ext != nil {
		return st.ext.CloseWrite()
	}
	s := st.s
	c := s.c
	c.mu.Lock()
	if s.err != nil || s.wclosed {
		err := s.err
		c.mu.Unlock()
		return err
	}
	s.wclosed = true
	s.wcond.Broadcast()
	c.mu.Unlock()
	err := c.writeData(s.id, true, nil)
	c.mu.Lock()
	c.maybeDoneLocked(s)
	c.mu.Unlock()
	return err
}

// Close ends the stream. If both directions had ended (or only the write
// side is open and everything was read), it ends cleanly; otherwise it
// resets the stream (RST_STREAM CANCEL), like closing a TCP socket with
// unread data.
func (st *Stream) Close() error {
	if st.ext != nil {
		return st.ext.Close()
	}
	st.s.close()
	return nil
}

func (s *stream) close() {
	c := s.c
	c.mu.Lock()
	if s.closed {
		c.mu.Unlock()
		return
	}
	s.closed = true
	drained := s.recv.Len() == 0
	var endStream, rst bool
	code := http2.ErrCodeCancel
	switch {
	case s.err != nil || (s.rclosed && s.wclosed):
	case s.rclosed && drained:
		endStream = true
	default:
		rst = true
		if s.wclosed {
			code = http2.ErrCodeNo
		}
	}
	c.creditConnLocked(int64(s.recv.Len()))
	s.recv.Reset()
	s.rdl.stop()
	s.wdl.stop()
	s.failLocked(errStreamClosed)
	c.removeLocked(s)
	connInc := c.takeConnUpdateLocked()
	c.mu.Unlock()
	switch {
	case endStream:
		c.writeData(s.id, true, nil)
	case rst:
		c.writeRST(s.id, code)
	}
	c.sendWindowUpdates(0, 0, connInc)
}

// Peer returns the other side's verified SPIFFE ID.
func (st *Stream) Peer() spiffeid.ID {
	if st.ext != nil {
		return st.ext.Peer()
	}
	return st.s.c.peer
}

// LocalAddr returns the local address of the HBONE connection.
func (st *Stream) LocalAddr() net.Addr {
	if st.ext != nil {
		return st.ext.LocalAddr()
	}
	return st.s.c.nc.LocalAddr()
}

// RemoteAddr returns the remote address of the HBONE connection.
func (st *Stream) RemoteAddr() net.Addr {
	if st.ext != nil {
		return st.ext.RemoteAddr()
	}
	return st.s.c.nc.RemoteAddr()
}

// SetDeadline sets the read and write deadlines.
func (st *Stream) SetDeadline(t time.Time) error {
	st.SetReadDeadline(t)
	return st.SetWriteDeadline(t)
}

// SetReadDeadline makes pending and future Reads fail with
// os.ErrDeadlineExceeded after t; zero means no deadline.
func (st *Stream) SetReadDeadline(t time.Time) error {
	if st.ext != nil {
		return st.ext.SetReadDeadline(t)
	}
	s := st.s
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	s.rdl.set(&s.c.mu, t, s.wakeLocked)
	return nil
}

// SetWriteDeadline makes pending and future Writes fail with
// os.ErrDeadlineExceeded after t; zero means no deadline.
func (st *Stream) SetWriteDeadline(t time.Time) error {
	if st.ext != nil {
		return st.ext.SetWriteDeadline(t)
	}
	s := st.s
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	s.wdl.set(&s.c.mu, t, s.wcond.Broadcast)
	return nil
}

// deadline is a read or write deadline. Its fields are guarded by the
// owning conn's mu.
type deadline struct {
	expired bool
	timer   *time.Timer
	gen     uint64 // invalidates the callbacks of replaced timers
}

// set arms the deadline; wake runs (under mu) when it expires. mu is held.
func (d *deadline) set(mu *sync.Mutex, t time.Time, wake func()) {
	d.stop()
	d.gen++
	d.expired = false
	if t.IsZero() {
		return
	}
	dur := time.Until(t)
	if dur <= 0 {
		d.expired = true
		wake()
		return
	}
	gen := d.gen
	d.timer = time.AfterFunc(dur, func() {
		mu.Lock()
		defer mu.Unlock()
		if d.gen == gen {
			d.expired = true
			wake()
		}
	})
}

func (d *deadline) stop() {
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
}

var _ net.Conn = (*Stream)(nil)
