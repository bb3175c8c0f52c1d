package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
)

// copyBufSize is the size of Join's pooled copy buffers: a few TLS records,
// or several HTTP/2 frames' worth of payload.
const copyBufSize = 64 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// closeWriter is a connection that can half-close (TCP, TLS, Stream).
type closeWriter interface{ CloseWrite() error }

// Join copies a->b and b->a concurrently. When one side's reads end, the
// other side's writes are half-closed (CloseWrite, where supported; else it
// is closed), so EOF propagates both ways. When both directions are done, or
// ctx ends, or a copy fails, it closes a and b and returns the bytes copied
// each way and the first error other than EOF or the close it caused.
//
// Between two TCP connections the kernel splices; otherwise the copies use
// pooled buffers.
func Join(ctx context.Context, a, b net.Conn) (aToB, bToA int64, err error) {
	type result struct {
		n   int64
		err error
	}
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	stop := context.AfterFunc(ctx, closeBoth)
	defer stop()

	done := make(chan result, 1)
	go func() {
		n, err := copyHalf(b, a)
		if err != nil {
			closeBoth() // unblock the other direction
		}
		done <- result{n, err}
	}()
	n, err1 := copyHalf(a, b)
	bToA = n
	if err1 != nil {
		closeBoth() // unblock the other direction
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

// copyHalf copies src to dst until src's EOF, then half-closes dst (or
// closes it, if it cannot half-close).
func copyHalf(dst, src net.Conn) (int64, error) {
	n, err := copyConn(dst, src)
	if err != nil {
		return n, err
	}
	if cw, ok := dst.(closeWriter); ok {
		if err := cw.CloseWrite(); err != nil {
			return n, err
		}
		return n, nil
	}
	return n, dst.Close()
}

// copyConn is io.Copy: spliced between TCP sockets, else through a pooled
// buffer (hiding ReadFrom/WriteTo, whose generic fallbacks allocate).
func copyConn(dst, src net.Conn) (int64, error) {
	if _, ok := dst.(*net.TCPConn); ok {
		if _, ok := src.(*net.TCPConn); ok {
			return io.Copy(dst, src)
		}
	}
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	return io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *bp)
}

type writerOnly struct{ io.Writer }
type readerOnly struct{ io.Reader }
