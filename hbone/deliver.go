package hbone

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"github.com/ambit-mesh/ambit/relay"
)

// DeliverTo writes what the stream receives to dst until the peer ends its
// side (it returns nil), the stream fails (its error), its read deadline
// passes (os.ErrDeadlineExceeded, as Read) or a write to dst fails; it
// returns the bytes written either way. It is relay.Deliverer: relay.Join
// calls it instead of reading the stream into a buffer.
//
// While dst (a socket: a syscall.Conn) takes the data at once, the
// connection's read loop writes the payload of each DATA frame under 32 KiB
// into it itself, with non-blocking write(2)s: no hand-off to this
// goroutine (no wake-up per frame: requests and responses) and no copy
// through the stream's buffer. What the socket does not take at once, and
// larger frames (bulk transfers), are kept in the stream's buffer and
// written here, blocking, several frames per writev(2); once the buffer is
// empty the read loop writes again. onBytes, if not nil, is
// called with the bytes written, from either goroutine; it must not block.
//
// Do not call Read while DeliverTo runs.
func (st *Stream) DeliverTo(dst net.Conn, onBytes func(n int64)) (total int64, err error) {
	var rc syscall.RawConn
	if sc, ok := dst.(syscall.Conn); ok && st.ext == nil {
		rc, _ = sc.SyscallConn()
	}
	if rc == nil {
		return copyTo(dst, st, onBytes)
	}
	s, c := st.s, st.s.c
	sk := &delivery{rc: rc, onBytes: onBytes}
	sk.writeFn = sk.writeFD
	c.mu.Lock()
	if s.sink != nil {
		c.mu.Unlock()
		return 0, errors.New("hbone: concurrent DeliverTo")
	}
	s.sink = sk
	c.mu.Unlock()
	return st.deliverLoop(sk, dst)
}

// DeliverAsync is DeliverTo without a goroutine of its own while the
// read loop delivers: it returns at once, and the delivery runs until what
// ends DeliverTo ends it; then done is called with what DeliverTo would
// return, on a goroutine of its own (never the read loop's). A goroutine
// runs only while dst does not take what arrives at once (bulk transfers,
// a slow reader) or to end the delivery: an idle tunnelled connection holds
// none. It returns false, and does nothing, where DeliverTo would not
// deliver from the read loop (dst is not a socket, the stream is not
// HTTP/2's) or a delivery already runs. onBytes as for DeliverTo. It is
// relay's AsyncDeliverer.
func (st *Stream) DeliverAsync(dst net.Conn, onBytes func(n int64), done func(total int64, err error)) bool {
	if st.ext != nil {
		return false
	}
	sc, ok := dst.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	s, c := st.s, st.s.c
	sk := &delivery{rc: rc, onBytes: onBytes, async: true, done: done, dst: dst, st: st}
	sk.writeFn = sk.writeFD
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.sink != nil {
		return false
	}
	s.sink = sk
	// The read loop may write itself only once nothing is buffered: with
	// bytes buffered, the goroutine writes them first and sets direct when
	// it has emptied the buffer (order; and the read loop never blocks on a
	// socket the goroutine is writing to).
	sk.direct = s.recv.Len() == 0
	s.kickLocked()
	return true
}

// kickLocked starts the goroutine of s's asynchronous delivery (if it has
// one and it is not running) when there is work for it: buffered bytes to
// write, or the end of the delivery. Every wake-up of s's readers goes
// through it. c.mu must be held.
func (s *stream) kickLocked() {
	sk := s.sink
	if sk == nil || !sk.async || sk.running {
		return
	}
	if s.recv.Len() == 0 && sk.err == nil && !s.rclosed && s.err == nil && !s.rdl.expired {
		return
	}
	sk.running = true
	go sk.run()
}

// run is an asynchronous delivery's goroutine: it writes what is buffered
// and returns once the read loop can deliver again, or ends the delivery.
func (sk *delivery) run() {
	total, err, ended := sk.st.deliverSome(sk, sk.dst)
	if ended {
		sk.done(total, err)
	}
}

// wakeLocked wakes s's readers: a Read, a DeliverTo, or the goroutine of
// an asynchronous delivery. c.mu must be held.
func (s *stream) wakeLocked() {
	s.rcond.Broadcast()
	s.kickLocked()
}

// deliverLoop is DeliverTo's loop, after its sink is installed.
func (st *Stream) deliverLoop(sk *delivery, dst net.Conn) (int64, error) {
	total, err, _ := st.deliverSome(sk, dst)
	return total, err
}

// deliverSome writes what s buffers to dst until the delivery ends (ended:
// the sink is removed, total and err are DeliverTo's results) or, for an
// asynchronous delivery, until the buffer is empty and the read loop can
// deliver again (not ended: the goroutine leaves; total counts nothing).
func (st *Stream) deliverSome(sk *delivery, dst net.Conn) (total int64, err error, ended bool) {
	s, c := st.s, st.s.c
	onBytes := sk.onBytes
	defer func() {
		if !ended {
			return
		}
		c.mu.Lock()
		sk.direct = false
		sk.leaving = true
		for sk.busy { // the read loop's write ends at once: it never blocks
			s.rcond.Wait()
		}
		s.sink = nil
		total += sk.n
		c.mu.Unlock()
		if err == io.EOF {
			err = nil
		}
	}()
	for {
		c.mu.Lock()
		for s.recv.Len() == 0 {
			switch {
			case sk.err != nil:
				err = sk.err
			case s.rclosed:
				err = io.EOF
			case s.err != nil:
				err = s.err
			case s.rdl.expired:
				err = os.ErrDeadlineExceeded
			}
			if err != nil {
				c.mu.Unlock()
				return total, err, true
			}
			sk.direct = true // the read loop writes; it wakes us with what it cannot
			if sk.async {
				// What this goroutine wrote is counted at the end, with
				// the read loop's.
				sk.n += total
				sk.running = false
				c.mu.Unlock()
				return 0, nil, false
			}
			s.rcond.Wait()
		}
		// Everything gathered (up to maxGather chunks), with one writev(2).
		var chunks [maxGather]*[]byte
		var bufs [maxGather][]byte
		k, m := 0, 0
		for ; k < maxGather && s.recv.Len() > 0; k++ {
			chunk, off := s.recv.next()
			chunks[k], bufs[k] = chunk, (*chunk)[off:]
			m += len(bufs[k])
		}
		inc, connInc := c.consumedLocked(s, m)
		c.mu.Unlock()
		c.sendWindowUpdates(s.id, inc, connInc)
		copy(sk.gatherArr[:], bufs[:k])
		sk.gather = sk.gatherArr[:k]
		n, werr := sk.gather.WriteTo(dst) // consumes sk.gather
		for _, chunk := range chunks[:k] {
			*chunk = (*chunk)[:0]
			recvChunks.Put(chunk)
		}
		total += n
		if n > 0 && onBytes != nil {
			onBytes(n)
		}
		if werr != nil {
			return total, werr, true
		}
	}
}

// maxGather is how many of the stream's buffered chunks DeliverTo writes
// at once: 256 KiB of 64 KiB chunks.
const maxGather = 4

// delivery is a stream's DeliverTo destination. Its fields are guarded by the
// conn's mu, except that the read loop writes to rc while busy.
type delivery struct {
	rc      syscall.RawConn
	onBytes func(int64)
	direct  bool  // the read loop writes to rc (the stream's buffer is empty)
	busy    bool  // the read loop is writing to rc, outside mu
	leaving bool  // DeliverTo returns: it waits for busy to clear
	n       int64 // bytes the read loop wrote, not yet counted by DeliverTo
	err     error // the read loop's write error

	// DeliverTo's writev, in the delivery: a net.Buffers per write would
	// escape to the heap.
	gather    net.Buffers
	gatherArr [maxGather][]byte

	// An asynchronous delivery's (DeliverAsync): its goroutine runs (set
	// and cleared under mu), and what it needs.
	async   bool
	running bool
	done    func(int64, error)
	dst     net.Conn
	st      *Stream

	// write's state, read loop only.
	writeFn func(fd uintptr) bool
	wp      []byte
	wn      int
	werr    error
}

// write writes what the socket takes of p without waiting: the bytes
// written, and an error other than EAGAIN. Read loop only (while busy).
func (sk *delivery) write(p []byte) (int, error) {
	sk.wp, sk.wn, sk.werr = p, 0, nil
	if err := sk.rc.Write(sk.writeFn); sk.werr == nil {
		sk.werr = err
	}
	n, err := sk.wn, sk.werr
	sk.wp, sk.werr = nil, nil
	return n, err
}

// writeFD is write's RawConn.Write callback (sk.writeFn, made once: a
// closure per write would be an allocation per frame). It never waits:
// the rest is left to DeliverTo. The write is a raw system call
// (relay.WriteNow): a runtime-accounted one would wake the runtime's
// monitor thread on every request of an otherwise idle proxy.
func (sk *delivery) writeFD(fd uintptr) bool {
	n, err := relay.WriteNow(fd, sk.wp)
	sk.wn += n
	sk.wp = sk.wp[n:]
	if err != nil {
		sk.werr = err
	}
	return true
}

// deliverLocked hands p, received for s, to its DeliverTo sink when the
// read loop may write it itself: it writes what the socket takes at once
// (releasing c.mu meanwhile; c.mu is held again on return) and returns the
// rest, for the stream's buffer, with the window increments to send. ok is
// false when s was closed or reset meanwhile: the caller drops the rest.
// c.mu must be held; read loop only.
func (c *conn) deliverLocked(s *stream, p []byte) (rest []byte, inc, connInc uint32, ok bool) {
	sk := s.sink
	if sk == nil || !sk.direct || len(p) == 0 || s.recv.Len() > 0 {
		return p, 0, 0, true
	}
	sk.busy = true
	c.mu.Unlock()
	n, err := sk.write(p)
	if n > 0 && sk.onBytes != nil {
		sk.onBytes(int64(n))
	}
	c.mu.Lock()
	sk.busy = false
	if sk.leaving {
		s.rcond.Broadcast()
	}
	sk.n += int64(n)
	if err != nil {
		sk.err = err
	}
	if err != nil || n < len(p) {
		sk.direct = false
	}
	inc, connInc = c.consumedLocked(s, n)
	return p[n:], inc, connInc, c.streams[s.id] == s
}

// queueWindowUpdates queues WINDOW_UPDATEs for stream id and the connection
// (read loop).
func (c *conn) queueWindowUpdates(id, inc, connInc uint32) error {
	if inc > 0 {
		if err := c.queueCtl(ctlFrame{kind: ctlWindowUpdate, id: id, val: inc}); err != nil {
			return err
		}
	}
	return c.queueConnUpdate(connInc)
}

// copyTo copies src to dst until src's EOF (nil), through a pooled buffer.
func copyTo(dst net.Conn, src *Stream, onBytes func(int64)) (int64, error) {
	bp := recvChunks.Get().(*[]byte)
	defer recvChunks.Put(bp)
	buf := (*bp)[:cap(*bp)]
	var total int64
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			total += int64(nw)
			if nw > 0 && onBytes != nil {
				onBytes(int64(nw))
			}
			if werr != nil {
				return total, werr
			}
			if nw != nr {
				return total, io.ErrShortWrite
			}
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}
