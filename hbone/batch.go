package hbone

import (
	"io"
	"net"
	"sync"

	"github.com/ambit-mesh/ambit/relay"
)

// batchLimit is how many bytes of TLS records a batch gathers before it
// sends them without waiting for its end: a few 16 KiB records.
const batchLimit = 128 << 10

var batchBufs = sync.Pool{New: func() any { b := make([]byte, 0, batchLimit+16<<10+64); return &b }}

// batchConn is the TCP connection under an HBONE connection's TLS. crypto/tls
// writes every record (at most 16 KiB) with its own write(2); while a batch
// is open, batchConn gathers the records instead and flush sends them with
// one. The conn opens a batch when it takes wmu and flushes it when no other
// writer is waiting for wmu, so a frame and the frames queued behind it
// (DATA of other streams, WINDOW_UPDATEs, acks) leave together. Outside a
// batch, writes go straight through: the handshake, and whatever crypto/tls
// writes on its own (close_notify, a KeyUpdate answered by the reader).
type batchConn struct {
	net.Conn

	// sock reads and writes Conn with raw system calls when it is a TCP
	// connection (relay.Socket), else nil; r and w are sock or Conn.
	sock *relay.Socket
	r    io.Reader
	w    io.Writer

	// mu guards the fields below and is held across every write to the
	// socket, so records keep their order (TLS sequence numbers).
	mu       sync.Mutex
	batching bool
	buf      *[]byte // gathered records; nil when empty

	// The read side, used by the TLS connection's reader only (crypto/tls
	// serializes its reads): crypto/tls asks for about one record (16 KiB)
	// per Read, so ahead holds what one read(2) brought beyond it, from
	// readAheadBufs, until it is read (nil when empty: an idle connection
	// holds none).
	ahead    *[]byte
	aheadOff int
}

// newBatchConn returns a batchConn on nc.
func newBatchConn(nc net.Conn) *batchConn {
	b := &batchConn{Conn: nc, r: nc, w: nc}
	if b.sock = relay.NewSocket(nc); b.sock != nil {
		b.r, b.w = b.sock, b.sock
	}
	return b
}

// readAhead is how much Read asks the socket for at once: a burst of
// records takes one read(2) instead of one per record.
const readAhead = 64 << 10

var readAheadBufs = sync.Pool{New: func() any { b := make([]byte, readAhead); return &b }}

// Read returns what was read ahead, or reads up to readAhead bytes from the
// socket and returns the first len(p).
func (b *batchConn) Read(p []byte) (int, error) {
	if b.ahead == nil {
		if len(p) >= readAhead {
			return b.r.Read(p)
		}
		ahead := readAheadBufs.Get().(*[]byte)
		n, err := b.r.Read((*ahead)[:readAhead])
		if n <= len(p) {
			copy(p, (*ahead)[:n])
			readAheadBufs.Put(ahead)
			return n, err
		}
		// n > 0: err is nil (a socket reports an error on a read of its own).
		*ahead = (*ahead)[:n]
		b.ahead, b.aheadOff = ahead, 0
	}
	k := copy(p, (*b.ahead)[b.aheadOff:])
	b.aheadOff += k
	if b.aheadOff == len(*b.ahead) {
		*b.ahead = (*b.ahead)[:readAhead]
		readAheadBufs.Put(b.ahead)
		b.ahead = nil
	}
	return k, nil
}

// Write sends p now, or gathers it while a batch is open.
func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.batching {
		return b.w.Write(p)
	}
	if b.buf == nil {
		b.buf = batchBufs.Get().(*[]byte)
	}
	if len(*b.buf)+len(p) > batchLimit && len(*b.buf) > 0 {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
		b.buf = batchBufs.Get().(*[]byte)
	}
	if len(*b.buf) == 0 && len(p) >= batchLimit {
		return b.w.Write(p)
	}
	*b.buf = append(*b.buf, p...)
	return len(p), nil
}

// hold opens a batch (if none is open).
func (b *batchConn) hold() {
	b.mu.Lock()
	b.batching = true
	b.mu.Unlock()
}

// flush closes the batch and sends what it gathered.
func (b *batchConn) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.batching = false
	if b.buf == nil {
		return nil
	}
	return b.flushLocked()
}

// flushLocked sends the gathered records and returns the buffer to the
// pool. b.mu must be held; b.buf is not nil.
func (b *batchConn) flushLocked() error {
	buf := b.buf
	b.buf = nil
	var err error
	if len(*buf) > 0 {
		_, err = b.w.Write(*buf)
	}
	*buf = (*buf)[:0]
	batchBufs.Put(buf)
	return err
}
