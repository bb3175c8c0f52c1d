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
// Between two *net.TCPConn the kernel splices (io.Copy uses splice(2): no
// copy through user space); otherwise each direction copies through a
// pooled 64 KiB buffer, taken only while that direction runs.
package relay

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
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

// BufSize is the size of the pooled copy buffers: a few TLS records, or
// several HTTP/2 frames' worth of payload.
const BufSize = 64 << 10

// SpliceChunk is how many bytes a spliced direction moves between two
// calls of the byte hook (the copy in the kernel cannot report as it goes):
// a spliced connection's counts may lag by up to this much until its end.
const SpliceChunk = 256 << 10

var bufs = sync.Pool{New: func() any { b := make([]byte, BufSize); return &b }}

// closeWriter is a connection that can half-close.
type closeWriter interface{ CloseWrite() error }

// Join copies a->b and b->a until both directions end, or one fails, or ctx
// ends; then it closes a and b and returns the bytes copied each way and
// the first error other than EOF or the close Join itself caused; ctx's
// error if ctx ended first.
//
// onBytes, if not nil, is called as bytes are written to the destination,
// with their direction; the two directions call it concurrently.
func Join(ctx context.Context, a, b net.Conn, onBytes func(d Direction, n int64)) (aToB, bToA int64, err error) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	stop := context.AfterFunc(ctx, closeBoth)
	defer stop()

	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := half(b, a, AToB, onBytes)
		if err != nil {
			closeBoth() // unblock the other direction
		}
		done <- result{n, err}
	}()
	bToA, err1 := half(a, b, BToA, onBytes)
	if err1 != nil {
		closeBoth()
	}
	r := <-done
	aToB = r.n
	closeBoth()
	for _, e := range []error{r.err, err1} {
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
func half(dst, src net.Conn, d Direction, onBytes func(Direction, int64)) (int64, error) {
	n, err := copyConn(dst, src, d, onBytes)
	if err != nil {
		return n, err
	}
	if cw, ok := dst.(closeWriter); ok && cw.CloseWrite() == nil {
		return n, nil
	}
	dst.Close()
	return n, nil
}

// copyConn copies src to dst until src's EOF: spliced between TCP sockets,
// else through a pooled buffer.
func copyConn(dst, src net.Conn, d Direction, onBytes func(Direction, int64)) (int64, error) {
	if dt, ok := dst.(*net.TCPConn); ok {
		if st, ok := src.(*net.TCPConn); ok {
			return splice(dt, st, d, onBytes)
		}
	}
	bp := bufs.Get().(*[]byte)
	defer bufs.Put(bp)
	buf := *bp
	var total int64
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
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
	}
}

// splice lets the kernel copy, SpliceChunk bytes at a time when there is a
// hook to tell.
func splice(dst, src *net.TCPConn, d Direction, onBytes func(Direction, int64)) (int64, error) {
	if onBytes == nil {
		return io.Copy(dst, src)
	}
	var total int64
	lr := &io.LimitedReader{R: src}
	for {
		lr.N = SpliceChunk
		n, err := dst.ReadFrom(lr)
		total += n
		if n > 0 {
			onBytes(d, n)
		}
		if err != nil || n < SpliceChunk {
			return total, err // short of a chunk without error: EOF
		}
	}
}
