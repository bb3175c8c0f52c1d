// Package relay is the one copy loop of ambit's proxies: it joins two
// connections (a client's and an upstream's, a tunnel stream and a socket)
// both ways, with half-close, and tells a hook about bytes as they move. The
// ztunnel, hbone and the waypoint's TCP path use it.
//
// Join copies a→b on a new goroutine and b→a on the caller's. When a
// direction's source reaches EOF, its destination is half-closed
// (CloseWrite, where the connection has it: TCP, TLS, HBONE streams; else it
// is closed), so a client's shutdown(SHUT_WR) reaches the server while the
// reply still flows back. A read or write error closes both connections, so
// the other direction ends too. Join returns when both directions are done,
// after closing both connections.
//
// Join keeps a connection as long as its peers do. A proxy facing untrusted
// peers uses a Joiner instead, to close connections silent for its
// IdleTimeout, to bound how long one stays half-closed (HalfCloseTimeout),
// and to notice at once a reset of a TCP peer that had sent its FIN.
//
// Between two *net.TCPConn the kernel splices (io.Copy uses splice(2): no
// copy through user space); otherwise each direction copies through pooled
// buffers: a small one (SmallBufSize) while the source trickles or is
// silent, so that an idle connection holds little memory, and a large one
// (BufSize) from the first read that fills the small one until the reads
// fit in the small one again, so that bulk transfers take few system calls.
// A TCP socket among them is read and written with raw system calls
// (Socket), as are the HBONE connections' sockets: the Go runtime's
// accounted ones wake its monitor thread on every request of an otherwise
// idle proxy.
package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Direction is one way through a Join.
type Direction uint8

const (
	AToB Direction = iota // from a to b (Join's first connection to its second)
	BToA
)

// String returns "a->b" or "b->a".
func (d Direction) String() string {
	if d == AToB {
		return "a->b"
	}
	return "b->a"
}

// BufSize is the size of the pooled copy buffers of a direction moving
// bulk data: 16 TLS records, or one large HTTP/2 frame's payload.
const BufSize = 256 << 10

// SmallBufSize is the size of the pooled buffer a direction reads with
// while its source is silent or sends small messages (a request or a
// response of a few KiB fits): what an idle connection holds per direction.
const SmallBufSize = 2 << 10

// SpliceChunk is how many bytes a spliced direction moves between two
// calls of the byte hook (the copy in the kernel cannot report as it goes):
// a spliced connection's counts may lag by up to this much until its end.
const SpliceChunk = 256 << 10

var (
	bufs      = sync.Pool{New: func() any { b := make([]byte, BufSize); return &b }}
	smallBufs = sync.Pool{New: func() any { b := make([]byte, SmallBufSize); return &b }}
)

// Deliverer is a source that writes what it receives to dst itself, as it
// arrives, until its EOF (nil), an error, or its read deadline
// (os.ErrDeadlineExceeded); it returns the bytes written and calls
// onBytes (if not nil) as it writes, possibly from another goroutine. An
// HBONE stream is one: its connection's read loop writes each frame into
// dst's socket, without waking the direction's goroutine. A direction whose
// source is a Deliverer calls it instead of copying.
type Deliverer interface {
	DeliverTo(dst net.Conn, onBytes func(n int64)) (int64, error)
}

// closeWriter is a connection that can half-close.
type closeWriter interface{ CloseWrite() error }

// Join copies a->b and b->a until both directions end, or one fails, or ctx
// ends; then it closes a and b and returns the bytes copied each way and
// the first error other than EOF or the close Join itself caused; ctx's
// error if ctx ended first. It keeps a silent connection forever: see
// Joiner for bounds.
//
// onBytes, if not nil, is called as bytes are written to the destination,
// with their direction; the two directions call it concurrently.
func Join(ctx context.Context, a, b net.Conn, onBytes func(d Direction, n int64)) (aToB, bToA int64, err error) {
	return run(ctx, a, b, onBytes, nil)
}

// Joiner is Join with bounds on how long a silent connection is kept: a
// proxy facing untrusted peers sets them, so that connections whose peers
// went quiet (or half-closed and then went quiet) are reclaimed. Its zero
// value is Join: no bounds.
type Joiner struct {
	// IdleTimeout closes both connections (Join returns ErrIdle) when no
	// byte moved either way for this long; 0: never. Sources are read with
	// deadlines; a direction the kernel splices reports its bytes when its
	// deadline passes, so a connection is closed between IdleTimeout and
	// about twice that after its last byte.
	IdleTimeout time.Duration
	// HalfCloseTimeout bounds a half-closed connection: once one direction
	// ended (its source sent EOF and its destination was half-closed), the
	// other has this long to end too, then both are closed (Join returns
	// ErrHalfClosed); 0: no bound.
	HalfCloseTimeout time.Duration
}

// Errors Joiner.Join returns when it closed a connection for its bounds.
var (
	ErrIdle       = errors.New("relay: idle timeout")
	ErrHalfClosed = errors.New("relay: half-closed too long")
)

// Join is the package's Join with j's bounds. With any bound set, a
// half-closed TCP source is still watched (a TCP connection that sent its
// FIN can still be reset): its reset closes both connections at once.
func (j Joiner) Join(ctx context.Context, a, b net.Conn, onBytes func(d Direction, n int64)) (aToB, bToA int64, err error) {
	if j.IdleTimeout <= 0 && j.HalfCloseTimeout <= 0 {
		return run(ctx, a, b, onBytes, nil)
	}
	w := &watch{j: j, src: [2]net.Conn{AToB: a, BToA: b}, onBytes: onBytes}
	w.last.Store(time.Now().UnixNano())
	return run(ctx, a, b, onBytes, w)
}

// result is one direction's outcome: bytes copied and error.
type result struct {
	n   int64
	err error
}

func run(ctx context.Context, a, b net.Conn, onBytes func(d Direction, n int64), w *watch) (aToB, bToA int64, err error) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	stop := context.AfterFunc(ctx, closeBoth)
	defer stop()
	if w != nil {
		w.closeBoth = closeBoth
		defer w.resets.Wait() // after closeBoth: the reset watchers end
	}

	// Each direction runs on a goroutine of its own, except one whose
	// source delivers asynchronously (an HBONE stream: its connection's
	// read loop writes into the destination), which needs a goroutine only
	// while its destination is full or at its end: an idle connection
	// through a node proxy holds one goroutine, its socket's reader.
	done := make(chan result, 1)
	var errAB, errBA error
	switch {
	case startAsync(a, b, BToA, onBytes, w, closeBoth, done):
		aToB, errAB = half(b, a, AToB, onBytes, w)
		if errAB != nil {
			closeBoth()
		}
		r := <-done
		bToA, errBA = r.n, r.err
	case startAsync(b, a, AToB, onBytes, w, closeBoth, done):
		bToA, errBA = half(a, b, BToA, onBytes, w)
		if errBA != nil {
			closeBoth()
		}
		r := <-done
		aToB, errAB = r.n, r.err
	default:
		go func() {
			n, err := half(b, a, AToB, onBytes, w)
			if err != nil {
				closeBoth() // unblock the other direction
			}
			done <- result{n, err}
		}()
		bToA, errBA = half(a, b, BToA, onBytes, w)
		if errBA != nil {
			closeBoth()
		}
		r := <-done
		aToB, errAB = r.n, r.err
	}
	closeBoth()
	errs := []error{errAB, errBA}
	if w != nil {
		w.mu.Lock()
		errs = append(errs, w.reset)
		w.mu.Unlock()
	}
	for _, e := range errs {
		if e != nil && err == nil && !errors.Is(e, net.ErrClosed) {
			err = e
		}
	}
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	return aToB, bToA, err
}

// half copies src to dst until src's EOF, then half-closes dst (or closes
// it, if it cannot half-close or the half-close fails: the peer is gone).
func half(dst, src net.Conn, d Direction, onBytes func(Direction, int64), w *watch) (int64, error) {
	var n int64
	var err error
	if w == nil {
		n, err = copyConn(dst, src, d, onBytes, false)
	} else {
		n, err = w.copy(dst, src, d)
	}
	if err != nil {
		return n, err
	}
	endHalf(dst, d, w)
	return n, nil
}

// endHalf half-closes dst after its direction d reached its source's EOF
// (or closes it, if it cannot half-close or the half-close fails: the peer
// is gone).
func endHalf(dst net.Conn, d Direction, w *watch) {
	if cw, ok := dst.(closeWriter); ok && cw.CloseWrite() == nil {
		if w != nil {
			w.ended(d)
		}
		return
	}
	dst.Close()
}

// AsyncDeliverer is a Deliverer that can deliver without the caller's
// goroutine: DeliverAsync returns at once (false: it cannot, nothing was
// started) and calls done once, with what DeliverTo would return, on a
// goroutine that may block (not one the source needs to make progress).
// An HBONE stream is one.
type AsyncDeliverer interface {
	Deliverer
	DeliverAsync(dst net.Conn, onBytes func(n int64), done func(total int64, err error)) bool
}

// startAsync starts direction d, src to dst, as an asynchronous delivery
// if src is an AsyncDeliverer (and dst not a TCP connection the other
// would splice to: never, a stream is not one) that accepts: its result
// (as half's) goes to out. It reports whether it started.
func startAsync(dst, src net.Conn, d Direction, onBytes func(Direction, int64), w *watch, closeBoth func(), out chan<- result) bool {
	ad, ok := src.(AsyncDeliverer)
	if !ok {
		return false
	}
	hook := func(n int64) {
		if w != nil {
			w.last.Store(time.Now().UnixNano())
		}
		if onBytes != nil {
			onBytes(d, n)
		}
	}
	if onBytes == nil && w == nil {
		hook = nil
	}
	if w != nil {
		w.mu.Lock()
		w.armLocked(d, time.Now())
		w.mu.Unlock()
	}
	var total int64
	var start func() bool
	finish := func(n int64, err error) {
		total += n
		if w != nil && err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			if err = w.expired(d, n > 0); err == nil {
				if start() {
					return
				}
				err = errors.New("relay: delivery could not restart")
			}
		}
		if err == nil {
			endHalf(dst, d, w)
		} else {
			closeBoth()
		}
		out <- result{total, err}
	}
	start = func() bool { return ad.DeliverAsync(dst, hook, finish) }
	return start()
}

// watch is the state of a Joiner's bounds for one Join.
type watch struct {
	j         Joiner
	src       [2]net.Conn // each direction's source, by Direction
	onBytes   func(Direction, int64)
	closeBoth func()
	last      atomic.Int64   // unix nanoseconds of the last byte either way (or the start)
	resets    sync.WaitGroup // reset watchers

	// mu guards the fields below and the read deadlines of src.
	mu      sync.Mutex
	done    [2]bool   // the direction reached EOF and half-closed
	doneAt  time.Time // when the first direction did
	asker   int       // 1+the direction that found the connection idle and asks the other to confirm; 0: none
	askedAt int64     // unix nanoseconds of the ask
	reset   error     // a half-closed source's reset
}

// copy is copyConn that tells w about bytes and returns to w when src's
// read deadline passes.
func (w *watch) copy(dst, src net.Conn, d Direction) (int64, error) {
	hook := func(d Direction, n int64) {
		w.last.Store(time.Now().UnixNano())
		if w.onBytes != nil {
			w.onBytes(d, n)
		}
	}
	w.mu.Lock()
	w.armLocked(d, time.Now())
	w.mu.Unlock()
	var total int64
	for {
		n, err := copyConn(dst, src, d, hook, true)
		total += n
		if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			return total, err
		}
		if err := w.expired(d, n > 0); err != nil {
			return total, err
		}
	}
}

// armLocked sets direction d's read deadline: the idle bound from the last
// byte, and the half-close bound if the other direction ended. w.mu must
// be held.
func (w *watch) armLocked(d Direction, now time.Time) {
	var dl time.Time
	if idle := w.j.IdleTimeout; idle > 0 {
		dl = time.Unix(0, w.last.Load()).Add(idle)
		if !dl.After(now) {
			dl = now.Add(idle)
		}
	}
	if w.done[1-d] && w.j.HalfCloseTimeout > 0 {
		if hd := w.doneAt.Add(w.j.HalfCloseTimeout); dl.IsZero() || hd.Before(dl) {
			dl = hd
		}
	}
	w.src[d].SetReadDeadline(dl)
}

// expired decides, when direction d's read deadline passed (progressed:
// it moved bytes since its last report), whether a bound is reached; if
// not it re-arms d's deadline. A direction that finds the connection idle
// asks the other to confirm (its deadline is set to now, so a spliced
// direction reports bytes it moved): the connection is closed when the
// other finds no bytes either.
func (w *watch) expired(d Direction, progressed bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	other := 1 - d
	if w.done[other] && w.j.HalfCloseTimeout > 0 && !now.Before(w.doneAt.Add(w.j.HalfCloseTimeout)) {
		return ErrHalfClosed
	}
	if idle := w.j.IdleTimeout; idle > 0 && !progressed {
		last := w.last.Load()
		if now.UnixNano()-last >= int64(idle) {
			switch {
			case w.done[other]: // it moves no more bytes
				return ErrIdle
			case w.asker == int(other)+1 && w.askedAt >= last: // confirmed
				return ErrIdle
			case w.asker == 0 || w.askedAt < last:
				w.asker, w.askedAt = int(d)+1, now.UnixNano()
				w.src[other].SetReadDeadline(now)
			}
		}
	}
	w.armLocked(d, now)
	return nil
}

// ended records that direction d reached EOF and half-closed its
// destination: the other direction gets the half-close bound, and a TCP
// source is watched for a reset.
func (w *watch) ended(d Direction) {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	w.done[d] = true
	if !w.done[1-d] {
		w.doneAt = now
		w.armLocked(1-d, now)
	}
	src := w.src[d]
	src.SetReadDeadline(time.Time{})
	if sc, ok := src.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			w.resets.Add(1)
			go func() {
				defer w.resets.Done()
				if err := waitReset(rc); err != nil {
					w.mu.Lock()
					w.reset = fmt.Errorf("relay: %s source reset after its EOF: %w", d, err)
					w.mu.Unlock()
					w.closeBoth()
				}
			}()
		}
	}
}

// copyConn copies src to dst until src's EOF: spliced between TCP sockets,
// delivered by a Deliverer source, else through pooled buffers.
// chunked: splice in SpliceChunk steps even without a hook.
func copyConn(dst, src net.Conn, d Direction, onBytes func(Direction, int64), chunked bool) (int64, error) {
	if dt, ok := dst.(*net.TCPConn); ok {
		if st, ok := src.(*net.TCPConn); ok {
			return splice(dt, st, d, onBytes, chunked)
		}
	}
	if dl, ok := src.(Deliverer); ok {
		var hook func(int64)
		if onBytes != nil {
			hook = func(n int64) { onBytes(d, n) }
		}
		return dl.DeliverTo(dst, hook)
	}
	// TCP sockets are read and written with raw system calls (Socket).
	var r io.Reader = src
	var w io.Writer = dst
	if s := NewSocket(src); s != nil {
		r = s
	}
	if s := NewSocket(dst); s != nil {
		w = s
	}
	var total int64
	b := copyBuf{}
	defer b.release()
	for {
		buf := b.get()
		nr, rerr := r.Read(buf)
		if nr > 0 {
			nw, werr := w.Write(buf[:nr])
			total += int64(nw)
			if nw > 0 && onBytes != nil {
				onBytes(d, int64(nw))
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
		b.read(nr)
	}
}

// copyBuf is a direction's buffer: small until a read fills it, then
// large until a read fits in a small one (see the package doc).
type copyBuf struct {
	small, large *[]byte
}

func (b *copyBuf) get() []byte {
	if b.large != nil {
		return *b.large
	}
	if b.small == nil {
		b.small = smallBufs.Get().(*[]byte)
	}
	return *b.small
}

// read adapts the buffer to the size of the last read, n bytes.
func (b *copyBuf) read(n int) {
	switch {
	case b.large == nil && n == SmallBufSize:
		b.large = bufs.Get().(*[]byte)
		smallBufs.Put(b.small)
		b.small = nil
	case b.large != nil && n <= SmallBufSize:
		bufs.Put(b.large)
		b.large = nil
	}
}

func (b *copyBuf) release() {
	if b.small != nil {
		smallBufs.Put(b.small)
	}
	if b.large != nil {
		bufs.Put(b.large)
	}
}

// splice lets the kernel copy, SpliceChunk bytes at a time when there is a
// hook to tell.
func splice(dst, src *net.TCPConn, d Direction, onBytes func(Direction, int64), chunked bool) (int64, error) {
	if onBytes == nil && !chunked {
		return io.Copy(dst, src)
	}
	var total int64
	lr := &io.LimitedReader{R: src}
	for {
		lr.N = SpliceChunk
		n, err := dst.ReadFrom(lr)
		total += n
		if n > 0 && onBytes != nil {
			onBytes(d, n)
		}
		if err != nil || n < SpliceChunk {
			return total, err // short of a chunk without error: EOF
		}
	}
}
