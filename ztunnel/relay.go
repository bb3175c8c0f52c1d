package ztunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// closeWriter is a connection that can half-close (TCP, TLS, HBONE streams).
type closeWriter interface{ CloseWrite() error }

// relay copies client->upstream and upstream->client until both directions
// end, half-closing each side's write half as its source reaches EOF so that
// a client's shutdown(SHUT_WR) reaches the server and the reply still flows
// back. Bytes are added to received (client to upstream) and sent (upstream
// to client) as they move. When ctx ends both connections are closed at once.
// relay closes both connections before returning and reports the errors
// other than EOF or a close caused by the other direction.
func relay(ctx context.Context, client, upstream net.Conn, received, sent *atomic.Int64, onBytes func(rx, tx int64)) error {
	stop := context.AfterFunc(ctx, func() {
		client.Close()
		upstream.Close()
	})
	defer stop()

	var wg sync.WaitGroup
	errs := make([]error, 2)
	wg.Add(2)
	go func() {
		defer wg.Done()
		errs[0] = pipe(upstream, client, received, func(n int64) { onBytes(n, 0) })
	}()
	go func() {
		defer wg.Done()
		errs[1] = pipe(client, upstream, sent, func(n int64) { onBytes(0, n) })
	}()
	wg.Wait()
	client.Close()
	upstream.Close()
	return errors.Join(errs...)
}

// pipe copies src to dst, then half-closes dst (or closes it when it cannot
// half-close). On a read or write error it closes both so the other
// direction ends too.
func pipe(dst, src net.Conn, count *atomic.Int64, onBytes func(int64)) error {
	bufp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bufp)
	buf := *bufp
	var err error
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				err = werr
				break
			}
			count.Add(int64(n))
			if onBytes != nil {
				onBytes(int64(n))
			}
		}
		if rerr != nil {
			if rerr != io.EOF {
				err = rerr
			}
			break
		}
	}
	if err != nil {
		src.Close()
		dst.Close()
		if errors.Is(err, net.ErrClosed) {
			return nil // the other direction closed the connection
		}
		return err
	}
	if cw, ok := dst.(closeWriter); ok {
		if cerr := cw.CloseWrite(); cerr == nil {
			return nil
		}
	}
	dst.Close()
	return nil
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}
